"""Nothing acknowledged is lost on SIGTERM; SIGKILL loses at most the flush interval,
and the audit chain still verifies after a restart. Checks go straight to the
HTTP-service endpoint (as Envoy sends them), four clients at once."""

from __future__ import annotations

import http.client
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from extauthz.app import Runtime
from extauthz.model import TenantTier
from extauthz.settings import load_settings
from tests.e2e.conftest import extauthz_cmd, sidecar_env, start_sidecar, stop

pytestmark = pytest.mark.e2e
POLICY = (
    "tenants:\n  t_d: {requests_per_day: 100000000, concurrent: 100000,\n"
    "    rate_limit: {requests_per_minute: 100000000, burst: 100000000}}\n"
    "audit:\n  allowed: all\n"
)
# Refused: its AUTH_FAILURE is queued at the check, so SIGKILL can lose it.
BAD_KEY = "nk_" + "z" * 40


def load(port: int, key: str, stop_at: threading.Event, ok: list[float], want: int = 200) -> None:
    """Checks on one keep-alive connection until told to stop or the server goes away;
    records the time of each ``want`` status received (bounded: at most 5,000)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        while not stop_at.is_set() and len(ok) < 5_000:
            conn.request(
                "GET", "/v1", headers={"x-api-key": key, "x-request-id": str(uuid.uuid4())}
            )
            resp = conn.getresponse()
            resp.read()
            if resp.status == want:
                ok.append(time.monotonic())
    except (OSError, http.client.HTTPException):
        pass  # the server stopped
    finally:
        conn.close()


def run_and_stop(
    tmp_path: Path, how: signal.Signals, refused: bool = False
) -> tuple[dict[str, str], int, float, Runtime]:
    env = sidecar_env(tmp_path, POLICY)
    runtime = Runtime.open(load_settings(environ=env))
    runtime.tenants.create_tenant("d", TenantTier.FREE, "t_d")
    key = BAD_KEY if refused else runtime.keys.create_key("t_d")[1]
    proc, port, _ = start_sidecar(env, tmp_path / "sidecar.log", "http")
    ok: list[float] = []
    stop_at = threading.Event()
    want = 401 if refused else 200
    clients = [threading.Thread(target=load, args=(port, key, stop_at, ok, want)) for _ in range(4)]
    started = time.monotonic()
    for c in clients:
        c.start()
    time.sleep(1.0)
    proc.send_signal(how)
    killed_at = time.monotonic()
    proc.wait(20)
    stop_at.set()
    for c in clients:
        c.join(10)
    stop(proc)
    rate = len(ok) / max(killed_at - started, 1e-6)
    return env, len(ok), rate, runtime


def test_sigterm_under_load_loses_nothing(tmp_path: Path) -> None:
    """Every check answered 200 has its usage record and (audit.allowed: all) its
    API_REQUEST audit row, both incomplete since no Envoy reported it finished, once the
    process has exited 0."""
    _, answered, _, runtime = run_and_stop(tmp_path, signal.SIGTERM)
    assert answered > 50
    success = runtime.store.query_audit(action="API_REQUEST")
    assert all(e.outcome == "incomplete" for e in success)
    usage = runtime.store.query_usage(tenant_id="t_d")
    # At most one check per client can be allowed and recorded after its reply was lost.
    assert answered <= len(success) <= answered + 4
    assert answered <= len(usage) <= answered + 4
    assert all(r.incomplete for r in usage)
    assert runtime.audit.verify().ok
    runtime.close()


def test_sigkill_loses_at_most_the_flush_interval_and_the_chain_verifies(tmp_path: Path) -> None:
    """SIGKILL mid-load of refused checks (each queues its AUTH_FAILURE): the audit rows
    lost are at most what was answered in the last flush interval (0.2 s here; 0.5 s of
    checks allowed for scheduling), and after a restart the chain verifies, at start
    (tail) and with `audit verify`."""
    env, answered, rate, runtime = run_and_stop(tmp_path, signal.SIGKILL, refused=True)
    success = len(runtime.store.query_audit(action="AUTH_FAILURE"))
    lost = answered - success
    print(f"\nSIGKILL: {answered} answered at {rate:.0f}/s, {success} audited, {lost} lost")
    assert lost <= rate * 0.5
    proc, _, _ = start_sidecar(env, tmp_path / "restart.log", "http")
    assert stop(proc) == 0
    assert "audit chain tail verified" in (tmp_path / "restart.log").read_text()
    verify = subprocess.run(
        extauthz_cmd("audit", "verify"),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    runtime.close()
