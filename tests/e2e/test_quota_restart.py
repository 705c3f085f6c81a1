"""The daily quota survives the sidecar process: a clean stop writes the counts, and a
SIGKILL loses at most the last flush interval. Checks go straight to the HTTP-service
endpoint (the way Envoy sends them), so the sidecar can be restarted on its own."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from extauthz.app import Runtime
from extauthz.model import TenantTier
from extauthz.settings import load_settings
from tests.e2e.conftest import sidecar_env, start_sidecar, stop
from tests.e2e.http_util import get

pytestmark = pytest.mark.e2e


def checks(port: int, key: str, n: int) -> list[int]:
    """n checks as Envoy's http_service sends them; the statuses extauthz answers."""
    return [
        get(
            port, "/v1/chat", [("x-api-key", key), ("x-request-id", f"r{time.monotonic_ns()}")]
        ).status
        for _ in range(n)
    ]


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_a_restart_keeps_the_days_count(tmp_path: Path, how: str) -> None:
    """3 of a 3/day quota used, then the process is stopped (cleanly, or killed after
    one flush interval): the new process still refuses the 4th request."""
    env = sidecar_env(tmp_path, "tenants:\n  t_q: {requests_per_day: 3}\n")
    runtime = Runtime.open(load_settings(environ=env))
    runtime.tenants.create_tenant("q", TenantTier.FREE, "t_q")
    key = runtime.keys.create_key("t_q")[1]
    runtime.close()

    proc, port, _ = start_sidecar(env, tmp_path / "first.log", "http")
    try:
        assert checks(port, key, 3) == [200, 200, 200]
        if how == "SIGKILL":
            time.sleep(0.6)  # flush_interval is 0.2 s in these tests: past it, with margin
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
    finally:
        stop(proc)

    proc, port, _ = start_sidecar(env, tmp_path / "second.log", "http")
    try:
        assert checks(port, key, 1) == [429]
    finally:
        assert stop(proc) == 0
