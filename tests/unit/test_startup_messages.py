"""What an operator reads when a backend is out of reach: one clear line, soon, naming
the backend that failed and what the service does about it."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from extauthz.app import Runtime
from extauthz.settings import Settings
from extauthz.sidecar import Sidecar
from extauthz.upkeep import Upkeep
from tests.services import free_port


def tenants_list(url: str, data_dir: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    """`extauthz --database-url URL tenants list` in a fresh process, and its seconds."""
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "extauthz", "--database-url", url, "tenants", "list"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={"EXTAUTHZ_DATA_DIR": str(data_dir), "PATH": "/usr/bin:/bin"},
    )
    return result, time.monotonic() - started


def test_a_postgresql_nobody_answers_is_one_line_and_fast(tmp_path: Path) -> None:
    """A refused PostgreSQL URL: exit 1 with a single `extauthz: error:` line naming
    the address and libpq's reason, no pool warnings, well within 2 s."""
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/test"
    result, took = tenants_list(url, tmp_path)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"extauthz: error: cannot connect to PostgreSQL at {url}")
    assert "Connection refused" in result.stderr
    assert took < 2.0


def test_a_silent_postgresql_gives_up_within_libpq_connect_timeout(tmp_path: Path) -> None:
    """A server that accepts the connection and never answers: the error comes after
    libpq's 2 s connect timeout, in one line, not after the pool's retries."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"postgresql://postgres@127.0.0.1:{silent.getsockname()[1]}/test"
        result, took = tenants_list(url, tmp_path)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert "timeout expired" in result.stderr
    assert took < 4.0


def test_redis_out_of_reach_at_start_is_said_at_start_with_each_tiers_mode(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Counters on a Redis nobody answers: the server starts (degraded mode) and warns
    at once, naming each tier's on_counters_down."""
    settings = Settings(
        data_dir=tmp_path,
        counters_url=f"redis://127.0.0.1:{free_port()}/0",
        http_addr="127.0.0.1:0",
        als_addr="127.0.0.1:0",
        metrics_addr="off",
    )
    runtime = Runtime.open(settings)
    sidecar = Sidecar(runtime, "http")
    with caplog.at_level(logging.WARNING, logger="extauthz"):
        sidecar.start()
    sidecar.stop()
    runtime.close()
    assert "unreachable" in caplog.text
    assert "free fail_closed, starter local, professional local, enterprise fail_open" in (
        caplog.text
    )


def test_upkeep_names_the_counters_when_they_fail(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A counters failure during upkeep is logged as the counters', not the store's."""
    from extauthz.errors import StoreError

    runtime = Runtime.open(Settings(data_dir=tmp_path, metrics_addr="off", flush_interval=0.01))

    def fails(keep: object = None) -> int:
        raise StoreError("Redis counters failed: timed out")

    monkeypatch.setattr(runtime.counters, "maintain", fails)
    upkeep = Upkeep(runtime)
    with caplog.at_level(logging.WARNING, logger="extauthz"):
        upkeep.start()
        deadline = time.monotonic() + 5
        while "upkeep: counters failed" not in caplog.text and time.monotonic() < deadline:
            threading.Event().wait(0.02)
        upkeep.stop()
    runtime.close()
    assert "upkeep: counters failed: Redis counters failed: timed out" in caplog.text
    assert "store upkeep" not in caplog.text


def test_the_pools_warnings_while_the_database_is_down_are_one_line_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """While PostgreSQL is down the connection pool keeps saying so (an outage is never
    silent), each time in one line instead of libpq's reason-and-hint paragraph."""
    import extauthz.store.postgres  # noqa: F401 - installs the filter

    pool_log = logging.getLogger("psycopg.pool")
    with caplog.at_level(logging.WARNING, logger="psycopg.pool"):
        pool_log.warning(
            "error connecting in %r: %s",
            "extauthz",
            'connection failed: connection to server at "127.0.0.1", port 5432 failed: '
            "Connection refused\n\tIs the server running on that host and accepting TCP/IP?",
        )
    (record,) = caplog.records
    assert "\n" not in record.getMessage()
    assert record.getMessage().endswith("Connection refused")
