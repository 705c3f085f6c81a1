"""`extauthz serve --workers N` behind one Envoy that lists each worker as an endpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from extauthz.app import Runtime
from extauthz.demo import EchoBackend
from extauthz.envoyconf import render
from extauthz.launcher import EnvoyProcess
from extauthz.settings import load_settings
from tests.e2e.conftest import extauthz_cmd, wait_until
from tests.e2e.http_util import get
from tests.services import redis_url

pytestmark = pytest.mark.e2e


def serve_workers(n: int, env: dict[str, str]) -> subprocess.Popen[str]:
    """`extauthz serve --workers N` on free ports; its first line lists them (JSON)."""
    return subprocess.Popen(
        extauthz_cmd(
            "serve",
            "--workers",
            str(n),
            "--grpc-addr",
            "127.0.0.1:0",
            "--als-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
            "--json",
        ),
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )


def test_two_workers_share_traffic_and_both_see_a_revocation(tmp_path: Path) -> None:
    """Both workers answer through Envoy (round robin), and a key revoked by the CLI is
    refused by every worker within a second."""
    env = {**os.environ, "EXTAUTHZ_DATA_DIR": str(tmp_path), "EXTAUTHZ_LOG_LEVEL": "warning"}
    for name in ("EXTAUTHZ_DATABASE_URL", "EXTAUTHZ_PEPPER", "EXTAUTHZ_CONFIG"):
        env.pop(name, None)
    runtime = Runtime.open(load_settings(environ=env))
    tenant = runtime.tenants.create_tenant("w", "starter")
    key_id, key = runtime.keys.create_key(tenant.id)
    workers = serve_workers(2, env)
    backend = EchoBackend().start()
    envoy = None
    try:
        assert workers.stdout is not None
        ports = json.loads(workers.stdout.readline())["grpc_ports"]
        assert len(set(ports)) == 2
        envoy = EnvoyProcess(
            render(
                listen=("127.0.0.1", 0),
                upstream=("127.0.0.1", backend.port),
                authz=[("127.0.0.1", p) for p in ports],
                admin=("127.0.0.1", 0),
            ),
            tmp_path / "envoy",
            concurrency=1,
        )
        envoy.start()
        port = envoy.listener_port()
        assert all(get(port, headers=[("x-api-key", key)]).status == 200 for _ in range(6))
        runtime.keys.revoke_key(key_id)

        def all_refuse() -> bool:
            return all(get(port, headers=[("x-api-key", key)]).status == 401 for _ in range(6))

        assert wait_until(all_refuse, 3) < 1.0
    finally:
        if envoy is not None:
            envoy.stop()
        backend.stop()
        workers.send_signal(signal.SIGTERM)
        code = workers.wait(30)
        if workers.stdout is not None:
            workers.stdout.close()
        runtime.close()
    assert code == 0


@pytest.mark.redis
def test_three_workers_on_redis_counters_enforce_one_limit(tmp_path: Path) -> None:
    """BAD_INPUTS #12 across processes: three workers behind one Envoy (round robin)
    sharing Redis counters; 100 concurrent requests against 5 slots held by a slow
    backend: exactly 5 reach it. The access-log stream reaches one worker, which frees
    slots taken by the others."""
    import threading
    import uuid
    from collections import Counter

    from tests.e2e.backends import TestBackend

    env = {
        **os.environ,
        "EXTAUTHZ_DATA_DIR": str(tmp_path),
        "EXTAUTHZ_LOG_LEVEL": "warning",
        "EXTAUTHZ_COUNTERS_URL": redis_url(),
        "EXTAUTHZ_POLICY_FILE": str(tmp_path / "policy.yaml"),
    }
    tenant_id = f"t_{uuid.uuid4().hex[:12]}"  # fresh counters in the shared Redis
    (tmp_path / "policy.yaml").write_text(
        f"tenants:\n  {tenant_id}: {{concurrent: 5, rate_limit: "
        "{requests_per_minute: 1000000, burst: 100000}}\n"
    )
    for name in ("EXTAUTHZ_DATABASE_URL", "EXTAUTHZ_PEPPER", "EXTAUTHZ_CONFIG"):
        env.pop(name, None)
    runtime = Runtime.open(load_settings(environ=env))
    runtime.tenants.create_tenant("r", "enterprise", tenant_id)
    key = runtime.keys.create_key(tenant_id)[1]
    workers = serve_workers(3, env)
    backend = TestBackend().start()
    envoy = None
    try:
        assert workers.stdout is not None
        ready = json.loads(workers.stdout.readline())
        envoy = EnvoyProcess(
            render(
                listen=("127.0.0.1", 0),
                upstream=("127.0.0.1", backend.port),
                authz=[("127.0.0.1", p) for p in ready["grpc_ports"]],
                als=[("127.0.0.1", p) for p in ready["als_ports"]],
                admin=("127.0.0.1", 0),
            ),
            tmp_path / "envoy",
            concurrency=1,
        )
        envoy.start()
        port = envoy.listener_port()
        backend.hold()
        barrier, replies, lock = threading.Barrier(100), [], threading.Lock()

        def one() -> None:
            barrier.wait(10)
            status = get(port, "/slow", [("x-api-key", key)]).status
            with lock:
                replies.append(status)

        threads = [threading.Thread(target=one) for _ in range(100)]
        for t in threads:
            t.start()
        wait_until(lambda: backend.holding == 5 and len(replies) == 95, 15)
        assert backend.holding == 5
        backend.release()
        for t in threads:
            t.join(30)
        assert Counter(replies) == {200: 5, 429: 95}
        # The slots come back through the access log, whichever worker took them.
        wait_until(lambda: get(port, "/fast", [("x-api-key", key)]).status == 200, 5)
    finally:
        backend.release()
        if envoy is not None:
            envoy.stop()
        workers.send_signal(signal.SIGTERM)
        assert workers.wait(30) == 0
        if workers.stdout is not None:
            workers.stdout.close()
        backend.stop()
        runtime.close()
