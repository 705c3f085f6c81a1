"""`extauthz audit verify` ranges, and commands whose output is cut short by a pipe."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from extauthz.app import Runtime
from extauthz.settings import load_settings
from tests.unit.test_cli import data_dir, run  # noqa: F401 - data_dir is an autouse fixture


@pytest.fixture
def forty_rows(capsys: pytest.CaptureFixture[str], data_dir: Path) -> Path:  # noqa: F811
    """An intact audit log of exactly 40 rows (tenant creations)."""
    for i in range(40):
        code, _, err = run(capsys, "tenants", "create", f"t{i}")
        assert code == 0, err
    return data_dir / "extauthz.db"


def verify(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, object], str]:
    code, out, err = run(capsys, "audit", "verify", *args, "--json")
    return code, (json.loads(out) if out else {}), err


def test_a_range_past_the_end_is_clipped_not_a_tamper_alarm(
    capsys: pytest.CaptureFixture[str], forty_rows: Path
) -> None:
    """--to beyond the last row checks up to the end (and the signed head): OK, exit 0."""
    code, result, _ = verify(capsys, "--to", "999")
    assert code == 0
    assert result == {"ok": True, "checked": 40, "head_checked": True, "problem": ""}


def test_a_range_inside_the_log_checks_only_its_rows(
    capsys: pytest.CaptureFixture[str], forty_rows: Path
) -> None:
    """--from 5 --to 10 verifies six rows and needs no head; --to alone starts at 1."""
    assert verify(capsys, "--from", "5", "--to", "10")[1]["checked"] == 6
    code, result, _ = verify(capsys, "--to", "10")
    assert (code, result["checked"], result["head_checked"]) == (0, 10, False)
    code, out, _ = run(capsys, "audit", "verify", "--from", "30", "--to", "35")
    assert code == 0
    assert "6 rows verified (the range ends before the head)" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--from", "999"), "--from 999 is past the end of the audit log (the last row is 40)"),
        (("--from", "30", "--to", "10"), "--from 30 is after --to 10"),
        (("--from", "0"), "--from must be a row number from 1, not 0"),
        (("--to", "-3"), "--to must be a row number from 1, not -3"),
    ],
)
def test_an_impossible_range_is_a_usage_error_not_broken(
    capsys: pytest.CaptureFixture[str], forty_rows: Path, args: tuple[str, ...], message: str
) -> None:
    """Reversed, below 1 or wholly past the end: exit 2 with the reason, never BROKEN."""
    code, out, err = run(capsys, "audit", "verify", *args)
    assert code == 2
    assert message in err
    assert "BROKEN" not in out + err


def test_real_tampering_inside_a_range_still_says_broken(
    capsys: pytest.CaptureFixture[str], forty_rows: Path
) -> None:
    """Clipping never hides an edit: a row changed in the database breaks the range
    that covers it (exit 1), while a range before it stays OK."""
    with sqlite3.connect(forty_rows) as db:
        db.execute("UPDATE audit_events SET reason = 'edited' WHERE seq = 20")
    code, result, _ = verify(capsys, "--from", "10", "--to", "999")
    assert code == 1
    assert result["problem"] == "row 20: does not match its hash (edited or moved)"
    assert verify(capsys, "--to", "19")[0] == 0


def test_an_empty_log_has_nothing_to_range_over(
    capsys: pytest.CaptureFixture[str],
    data_dir: Path,  # noqa: F811
) -> None:
    """On a log with no rows, --from 1 is a usage error that says so."""
    run(capsys, "init")
    code, _, err = run(capsys, "audit", "verify", "--from", "1")
    assert code == 2
    assert "the log has no rows yet" in err


def test_output_cut_short_by_a_closed_pipe_ends_quietly(data_dir: Path) -> None:  # noqa: F811
    """`extauthz audit list | head -1`: the reader goes away after one line while the
    command still writes; it stops without "unexpected error" or a traceback, as Unix
    tools do."""
    runtime = Runtime.open(load_settings(environ={"EXTAUTHZ_DATA_DIR": str(data_dir)}))
    for i in range(3000):  # far more than a pipe's 64 KiB buffer holds
        runtime.audit.event("CONFIG_CHANGED", "success", actor="test", reason=f"r{i}")
    runtime.close()
    pipeline = subprocess.run(  # noqa: S602 - a fixed pipeline of our own command
        f"{sys.executable} -m extauthz audit list --limit 3000 | head -1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"EXTAUTHZ_DATA_DIR": str(data_dir), "PATH": "/usr/bin:/bin"},
    )
    assert pipeline.stdout.count("\n") == 1
    assert pipeline.stderr == ""
