"""A real stack on free loopback ports: echo backend <- Envoy (wheel) <- extauthz serve."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from extauthz.app import Runtime
from extauthz.demo import EchoBackend
from extauthz.envoyconf import render
from extauthz.launcher import EnvoyProcess
from extauthz.model import TenantTier
from extauthz.settings import check_server, load_settings

pytestmark = pytest.mark.e2e


def extauthz_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "extauthz", *args]


def start_sidecar(
    env: dict[str, str], log: Path, mode: str = "grpc"
) -> tuple[subprocess.Popen[str], int, int]:
    """`extauthz serve --mode MODE` on free ports; returns the process, its check port and
    its access-log port."""
    proc, ports = start_sidecar_ports(env, log, mode)
    return proc, ports[f"{check_server(mode)}_port"], ports["als_port"]


def start_sidecar_ports(
    env: dict[str, str], log: Path, mode: str = "grpc"
) -> tuple[subprocess.Popen[str], dict[str, int]]:
    """`extauthz serve --mode MODE` on free ports; the process and all its ports."""
    with log.open("w") as err:
        proc = subprocess.Popen(
            extauthz_cmd(
                "serve",
                "--mode",
                mode,
                f"--{check_server(mode)}-addr",
                "127.0.0.1:0",
                "--als-addr",
                "127.0.0.1:0",
                "--metrics-addr",
                "127.0.0.1:0",
                "--json",
            ),
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        stop(proc)
        pytest.fail(f"extauthz serve did not start: {log.read_text()}")
    return proc, {name: int(port) for name, port in json.loads(line).items()}


def stop(proc: subprocess.Popen[str]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
    code = proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
    return code


@dataclass
class Stack:
    url: str
    port: int
    env: dict[str, str]
    runtime: Runtime
    backend: Any
    sidecar: subprocess.Popen[str]
    envoy: EnvoyProcess
    log: Path
    made: list[str] = field(default_factory=list)
    keys_made: list[str] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)  # the sidecar's, by name
    mode: str = "grpc"  # how Envoy calls the sidecar: grpc, http or bridge

    def new_key(self, tier: TenantTier = TenantTier.STARTER) -> tuple[str, str, str]:
        """A fresh tenant and key: (tenant_id, key_id, key). Made in this test process, which
        is 'another process' as far as the sidecar is concerned."""
        tenant = self.runtime.tenants.create_tenant(f"t{len(self.made)}", tier)
        self.made.append(tenant.id)
        key_id, key = self.runtime.keys.create_key(tenant.id, "e2e")
        self.keys_made.append(key)
        return tenant.id, key_id, key

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            extauthz_cmd(*args),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )


def sidecar_env(data: Path, policy_text: str, **extra: str) -> dict[str, str]:
    # Debug logging, so the secrets tests have every log line there is to search.
    env = {
        **os.environ,
        "EXTAUTHZ_DATA_DIR": str(data),
        "EXTAUTHZ_LOG_LEVEL": "debug",
        "EXTAUTHZ_LAST_USED_FLUSH": "0.5s",
        "EXTAUTHZ_FLUSH_INTERVAL": "0.2s",
        **extra,
    }
    for name in ("EXTAUTHZ_DATABASE_URL", "EXTAUTHZ_PEPPER", "EXTAUTHZ_CONFIG"):
        env.pop(name, None)
    policy = data / "policy.yaml"
    if "security:" not in policy_text:
        # These tests send hundreds of bad keys from one address on purpose; the
        # brute-force block has tests of its own.
        policy_text += "\nsecurity: {max_auth_failures: 1000000}\n"
    policy.write_text(policy_text)
    env["EXTAUTHZ_POLICY_FILE"] = str(policy)
    return env


@contextmanager
def running_stack(
    data: Path,
    mode: str,
    policy_text: str,
    backend: Any = None,
    *,
    als: bool = True,
    body_bytes: int | None = None,
    tweak: Callable[[dict[str, Any]], None] | None = None,
    envoy_args: tuple[str, ...] = (),
    authz_timeout: float = 0.5,
    **extra: str,
) -> Iterator[Stack]:
    """Backend <- Envoy <- extauthz serve (with its access-log receiver unless ``als``
    is False), all on free loopback ports; stopped and checked on exit."""
    env = sidecar_env(data, policy_text, **extra)
    runtime = Runtime.open(load_settings(environ=env))
    backend = (backend or EchoBackend()).start()
    sidecar, ports = start_sidecar_ports(env, data / "sidecar.log", mode)
    authz_port, als_port = ports[f"{check_server(mode)}_port"], ports["als_port"]
    config = render(
        listen=("127.0.0.1", 0),
        upstream=("127.0.0.1", backend.port),
        authz=[("127.0.0.1", authz_port)],
        admin=("127.0.0.1", 0),
        mode=mode,
        als=[("127.0.0.1", als_port)] if als else None,
        body_bytes=body_bytes,
        timeout=authz_timeout,
        access_log=extra.get("EXTAUTHZ_ACCESS_LOG", "grpc"),
    )
    if tweak is not None:
        tweak(config)
    envoy = EnvoyProcess(config, data / "envoy", concurrency=1, extra_args=envoy_args)
    try:
        envoy.start()
        port = envoy.listener_port()
        yield Stack(
            f"http://127.0.0.1:{port}",
            port,
            env,
            runtime,
            backend,
            sidecar,
            envoy,
            data / "sidecar.log",
            ports=ports,
            mode=mode,
        )
    finally:
        envoy.stop()
        code = stop(sidecar)
        backend.stop()
        runtime.close()
    assert code == 0, "extauthz serve did not stop cleanly"


@pytest.fixture(scope="module", params=["grpc", "http", "bridge"])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """The whole stack, with Envoy calling us over gRPC, over HTTP, and over gRPC
    bridged by Envoy to the HTTP service."""
    mode = request.param
    data = tmp_path_factory.mktemp(f"stack-{mode}")
    with running_stack(data, mode, "routes:\n  - path: /healthz\n    public: true\n") as s:
        yield s


def wait_until(predicate, timeout: float = 5.0, step: float = 0.02) -> float:  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until true; returns the seconds it took (fails on timeout)."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            pytest.fail(f"condition not met within {timeout}s")
        time.sleep(step)
    return time.monotonic() - start
