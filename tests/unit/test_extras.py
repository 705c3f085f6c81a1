"""The shared backends' clients are extras: without them the sidecar runs on SQLite and
memory counters, and a URL that needs one names the extra to install."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

# Run in a fresh interpreter where the Redis and PostgreSQL client packages cannot be
# imported, as after a plain `pip install extauthz`.
_WITHOUT_CLIENTS = """
import importlib.abc, sys
class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("redis", "hiredis", "psycopg", "psycopg_pool"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Missing())
from pathlib import Path
from extauthz.app import Runtime
from extauthz.errors import ConfigError
from extauthz.settings import Settings
settings = Settings(data_dir=Path(sys.argv[1]), metrics_addr="off", **dict(
    item.split("=", 1) for item in sys.argv[2:]))
try:
    Runtime.open(settings).close()
except ConfigError as exc:
    print("error:", exc)
else:
    print("ok")
"""


def _open(tmp_path: Path, *settings: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_CLIENTS, str(tmp_path), *settings],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_the_default_backends_need_no_redis_or_postgres_client(tmp_path: Path) -> None:
    """SQLite and memory counters open with neither client importable."""
    assert _open(tmp_path) == "ok"


@pytest.mark.parametrize(
    ("setting", "extra"),
    [
        ("counters_url=redis://127.0.0.1:6379/0", "extauthz[redis]"),
        ("database_url=postgresql://user:SECRET@127.0.0.1:5432/db", "extauthz[postgres]"),
    ],
)
def test_a_url_whose_client_is_missing_names_the_extra(
    tmp_path: Path, setting: str, extra: str
) -> None:
    """A clear start-up error with the extra to install, and never the URL's password."""
    out = _open(tmp_path, setting)
    assert out.startswith("error: "), out
    assert f"pip install '{extra}'" in out
    assert "SECRET" not in out
