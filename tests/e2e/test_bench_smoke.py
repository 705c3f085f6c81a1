"""`python -m bench --quick` as a smoke test: every setup runs and answers correctly.

It asserts no timing: numbers come from full benchmark runs, not from tests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.floors import nginx_path

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def test_quick_benchmark_runs_every_setup_without_errors(tmp_path: Path) -> None:
    """A, B, C, CB (gRPC through the bridge), D and the two transport floors (FG, a bare
    grpcio handler; FH, nginx when installed) each serve traffic with zero non-2xx
    answers; C, CB and D are reported against their floor and split by thread (checks,
    access log, writers), with the front Envoy's CPU per request; the
    sidecar-alone direct mode runs for HTTP and gRPC; results land in the JSON file."""
    if not (shutil.which("wrk") and shutil.which("h2load")):
        if os.environ.get("CI"):
            pytest.fail("CI must install wrk and nghttp2-client (see .ci/run)")
        pytest.skip("wrk/h2load not installed: sudo apt-get install -y wrk nghttp2-client")
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--output", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    record = json.loads(out.read_text())
    have_nginx = nginx_path() is not None
    if not have_nginx and os.environ.get("CI"):
        pytest.fail("CI must install nginx-light for the HTTP floor (see .ci/run)")
    floors = {"FG", "FH"} if have_nginx else {"FG"}
    assert set(record["summary"]) == {"A", "B", "C", "CB", "D"} | floors
    for setup, summary in record["summary"].items():
        assert summary["requests"] > 0, setup
        assert summary["bad_total"] == 0, setup
        assert summary["envoy_us_per_request"] > 0, setup
    for mode in ("http", "grpc"):
        assert record["direct"][mode]["checks_per_s"] > 0
        assert record["direct"][mode]["bad"] == 0
    assert record["core"]["decision_cache_hit_us"] > 0
    assert "A Envoy -> backend" in result.stdout
    for setup in ("C", "CB"):
        assert record["summary"][setup]["floor"] == "FG"
        assert record["summary"][setup]["vs_floor"] > 0
    for setup in ("C", "CB", "D"):
        split = record["summary"][setup]
        assert split["als_us_per_entry"] > 0, setup  # the access-log thread was found
        assert split["checks_us_per_request"] > 0, setup
    if have_nginx:
        assert record["summary"]["D"]["floor"] == "FH"
        assert "of FH req/s" in result.stdout
    else:
        assert "FH (the HTTP floor) skipped: nginx is not installed" in result.stdout
