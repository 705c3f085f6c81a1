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

pytestmark = pytest.mark.e2e


def test_two_workers_share_traffic_and_both_see_a_revocation(tmp_path: Path) -> None:
    """Both workers answer through Envoy (round robin), and a key revoked by the CLI is
    refused by every worker within a second."""
    env = {**os.environ, "EXTAUTHZ_DATA_DIR": str(tmp_path), "EXTAUTHZ_LOG_LEVEL": "warning"}
    for name in ("EXTAUTHZ_DATABASE_URL", "EXTAUTHZ_PEPPER", "EXTAUTHZ_CONFIG"):
        env.pop(name, None)
    runtime = Runtime.open(load_settings(environ=env))
    tenant = runtime.tenants.create_tenant("w", "starter")
    key_id, key = runtime.keys.create_key(tenant.id)
    workers = subprocess.Popen(
        extauthz_cmd(
            "serve",
            "--workers",
            "2",
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
