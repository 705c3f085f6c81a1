"""A replica's death is invisible to clients: three `serve` replicas behind one Envoy
built by our renderer, one SIGKILLed under load, and no client sees a failed request
(the generated configs retry a check that could not connect or was reset on another
endpoint, and eject the endpoint that keeps failing)."""

from __future__ import annotations

import http.client
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from extauthz.app import Runtime
from extauthz.demo import EchoBackend
from extauthz.envoyconf import render
from extauthz.launcher import EnvoyProcess
from extauthz.model import TenantTier
from extauthz.settings import check_server, load_settings
from tests.e2e.conftest import sidecar_env, start_sidecar_ports, stop

pytestmark = pytest.mark.e2e

# Memory counters: each replica frees only the slots the access log brings back to it,
# so concurrency is unbounded here (exact limits across replicas: test_replicas.py).
POLICY = """
tenants:
  t_load:
    concurrent: 1000000000
    rate_limit: {requests_per_minute: 10000000, burst: 1000000}
"""


def _load(port: int, key: str, until: float, statuses: Counter[int]) -> None:
    """Requests back to back on one keep-alive connection (a new one after a close)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    while time.monotonic() < until:
        try:
            conn.request("GET", "/hello", headers={"x-api-key": key})
            reply = conn.getresponse()
            reply.read()
            statuses[reply.status] += 1
        except (OSError, http.client.HTTPException):
            statuses[0] += 1  # a connection error counts as a failed request too
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.close()


@pytest.mark.parametrize("mode", ["grpc", "http", "bridge"])
def test_a_replica_killed_under_load_fails_no_client_request(tmp_path: Path, mode: str) -> None:
    """4 clients send requests back to back for 4 s; 1 s in, one of the three replicas
    is SIGKILLed. Every request gets 200: Envoy retries on another replica what could
    not reach the dead one or was in flight on its connections (without the retry
    policy, 900-1,400 requests got 503 until the health checks took it out)."""
    env = sidecar_env(tmp_path, POLICY)
    runtime = Runtime.open(load_settings(environ=env))
    runtime.tenants.create_tenant("load", TenantTier.ENTERPRISE, "t_load")
    _, key = runtime.keys.create_key("t_load", "e2e")
    backend = EchoBackend().start()
    started = [start_sidecar_ports(env, tmp_path / f"replica{i}.log", mode) for i in range(3)]
    envoy = EnvoyProcess(
        render(
            listen=("127.0.0.1", 0),
            upstream=("127.0.0.1", backend.port),
            authz=[("127.0.0.1", ports[f"{check_server(mode)}_port"]) for _, ports in started],
            als=[("127.0.0.1", ports["als_port"]) for _, ports in started],
            admin=("127.0.0.1", 0),
            mode=mode,
        ),
        tmp_path / "envoy",
        concurrency=1,
    )
    statuses: Counter[int] = Counter()
    try:
        envoy.start()
        port = envoy.listener_port()
        until = time.monotonic() + 4
        clients = [
            threading.Thread(target=_load, args=(port, key, until, statuses)) for _ in range(4)
        ]
        for client in clients:
            client.start()
        time.sleep(1)
        victim = started[0][0]
        victim.kill()
        victim.wait(10)
        killed_at = sum(statuses.values())
        for client in clients:
            client.join(20)
    finally:
        envoy.stop()
        codes = [stop(proc) for proc, _ in started]
        backend.stop()
        runtime.close()
    print(f"\n{mode}: {dict(statuses)}; {killed_at} answered before the kill")
    assert killed_at > 0
    assert statuses[200] > killed_at, "requests went on after the kill"
    assert set(statuses) == {200}, dict(statuses)
    assert codes[1:] == [0, 0], "the survivors stop cleanly"
