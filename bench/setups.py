"""The setups compared, each started as fresh processes on free loopback ports.

A  Envoy -> backend, no auth (the baseline every ratio is taken against)
B  Envoy's in-process api_key_auth + local_ratelimit -> backend (the built-in alternative)
C  Envoy + extauthz over gRPC -> backend
CB Envoy + extauthz over gRPC through Envoy's reverse bridge to the HTTP service
D  Envoy + extauthz over the HTTP service -> backend
CF, DF  the same with the access log over Envoy's fluentd logger (EXTAUTHZ_ACCESS_LOG)
FG, FH  the transport floors: Envoy ext_authz to an authorizer that only answers OK
    (a bare grpcio handler; nginx `return 200`), bench/floors.py
CR, DR  the same with counters in Redis (the store stays SQLite): Redis against memory
CRP, DRP  Redis counters and a PostgreSQL store (everything replicas share)

The backend is a second Envoy answering with direct_response, so it is never the limit
(the run reports its req/s alone to show it).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.floors import Floor, GrpcFloor, NginxFloor, stop_process
from extauthz.envoyconf import ROUTER, render
from extauthz.launcher import EnvoyProcess
from extauthz.settings import check_server

API_KEY_AUTH = "type.googleapis.com/envoy.extensions.filters.http.api_key_auth.v3.ApiKeyAuth"
LOCAL_RL = "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
SETUPS = {
    "A": "Envoy -> backend, no auth",
    "B": "Envoy api_key_auth + local_ratelimit",
    "C": "Envoy + extauthz gRPC",
    "D": "Envoy + extauthz HTTP service",
    "CB": "Envoy + extauthz gRPC, bridged to HTTP",
    "FG": "floor: ext_authz gRPC -> bare grpcio",
    "FH": "floor: ext_authz HTTP -> nginx 200",
    # The access log over Envoy's fluentd logger instead of the gRPC service.
    "CF": "Envoy + extauthz gRPC, fluentd log",
    "DF": "Envoy + extauthz HTTP, fluentd log",
    # Optional: the same with `serve --workers 2`, two endpoints in Envoy's cluster.
    "C2": "Envoy + extauthz gRPC, 2 workers",
    "D2": "Envoy + extauthz HTTP, 2 workers",
    # Shared backends (see shared_env): counters in Redis; also the store in PostgreSQL.
    "CR": "Envoy + extauthz gRPC, Redis",
    "DR": "Envoy + extauthz HTTP, Redis",
    "CRP": "Envoy + extauthz gRPC, Redis + PG",
    "DRP": "Envoy + extauthz HTTP, Redis + PG",
}
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def backend_config() -> dict[str, Any]:
    config = render(
        listen=("127.0.0.1", 0),
        upstream=("127.0.0.1", 9),
        authz=[("127.0.0.1", 9)],
        admin=("127.0.0.1", 0),
    )
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    route = hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"][0]
    route.pop("route")
    route["direct_response"] = {"status": 200, "body": {"inline_string": "ok\n"}}
    hcm["typed_config"]["http_filters"] = [
        {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}
    ]
    config["static_resources"]["clusters"] = []
    return config


def _builtin_filters(key: str) -> list[dict[str, Any]]:
    everyone = {"default_value": {"numerator": 100, "denominator": "HUNDRED"}}
    return [
        {
            "name": "envoy.filters.http.api_key_auth",
            "typed_config": {
                "@type": API_KEY_AUTH,
                "credentials": [{"key": key, "client": "bench"}],
                "key_sources": [{"header": "x-api-key"}],
            },
        },
        {
            "name": "envoy.filters.http.local_ratelimit",
            "typed_config": {
                "@type": LOCAL_RL,
                "stat_prefix": "bench",
                # A bucket too deep to ever empty: we measure the filter's cost, not its limit.
                "token_bucket": {
                    "max_tokens": 1_000_000_000,
                    "tokens_per_fill": 1_000_000_000,
                    "fill_interval": "1s",
                },
                "filter_enabled": {**everyone, "runtime_key": "rl_enabled"},
                "filter_enforced": {**everyone, "runtime_key": "rl_enforced"},
            },
        },
        {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}},
    ]


def front_config(
    setup: str,
    backend_port: int,
    authz_port: int,
    key: str,
    als_port: int = 0,
    *,
    access_log: str = "grpc",
) -> dict[str, Any]:
    mode = "http" if setup in ("D", "FH") else "bridge" if setup == "CB" else "grpc"
    config = render(
        access_log=access_log,
        listen=("127.0.0.1", 0),
        upstream=("127.0.0.1", backend_port),
        authz=[("127.0.0.1", authz_port or 9)],
        admin=("127.0.0.1", 0),
        mode=mode,
        als=[("127.0.0.1", als_port)] if als_port else None,
    )
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    if setup == "A":
        hcm["typed_config"]["http_filters"] = hcm["typed_config"]["http_filters"][-1:]
    elif setup == "B":
        hcm["typed_config"]["http_filters"] = _builtin_filters(key)
    if setup in ("A", "B"):
        config["static_resources"]["clusters"] = config["static_resources"]["clusters"][:1]
    return config


class Sidecar:
    """`extauthz serve` as its own process, like production."""

    def __init__(self, mode: str, env: dict[str, str], workdir: Path, workers: int = 1) -> None:
        self.mode = mode
        self.log = workdir / f"sidecar-{mode}.log"
        transport = check_server(mode)
        args = [
            sys.executable,
            "-m",
            "extauthz",
            "serve",
            "--mode",
            mode,
            f"--{transport}-addr",
            "127.0.0.1:0",
            "--als-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
            "--json",
        ]
        if workers > 1:
            args += ["--workers", str(workers)]
        with self.log.open("w") as err:
            self.proc = subprocess.Popen(
                args, env=env, stdout=subprocess.PIPE, stderr=err, text=True
            )
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line:
            raise RuntimeError(f"sidecar did not start: {self.log.read_text()}")
        ready = json.loads(line)
        self.ports: list[int] = ready.get(f"{transport}_ports") or [ready[f"{transport}_port"]]
        # With several workers Envoy's one access-log stream reaches one of them: the
        # others free their slots by lease expiry (the bench tenant's limits are huge).
        self.als_port: int = ready["als_port"]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        stop_process(self.proc, 20)


class Running:
    """One setup's processes for one measurement."""

    def __init__(self, setup: str, workdir: Path, env: dict[str, str], key: str) -> None:
        self.setup = setup
        floor = setup in ("FG", "FH")
        base = "CB" if setup.startswith("CB") else setup[0]
        workers = int("".join(c for c in setup if c.isdigit()) or 1)
        access_log = "fluentd" if not floor and "F" in setup[1:] else "grpc"
        if access_log == "fluentd":
            env = {**env, "EXTAUTHZ_ACCESS_LOG": "fluentd"}
        self.backend = EnvoyProcess(backend_config(), workdir / "backend", concurrency=1)
        self.sidecar: Sidecar | None = None
        self.floor: Floor | None = None
        self.front: EnvoyProcess | None = None
        self.backend.start()
        try:
            self.backend_port = self.backend.listener_port()
            authz_ports: list[int] = []
            als_port = 0
            if floor:
                self.floor = GrpcFloor(workdir) if setup == "FG" else NginxFloor(workdir)
                authz_ports = [self.floor.port]
                base = setup
            elif base in ("C", "D", "CB"):
                mode = {"C": "grpc", "D": "http", "CB": "bridge"}[base]
                self.sidecar = Sidecar(mode, env, workdir, workers)
                authz_ports = self.sidecar.ports
                als_port = self.sidecar.als_port
            config = front_config(
                base,
                self.backend_port,
                authz_ports[0] if authz_ports else 0,
                key,
                als_port,
                access_log=access_log,
            )
            if len(authz_ports) > 1:  # several worker processes: one endpoint each
                cluster = config["static_resources"]["clusters"][1]
                cluster["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
                    {
                        "endpoint": {
                            "address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}
                        }
                    }
                    for p in authz_ports
                ]
            self.front = EnvoyProcess(config, workdir / f"front-{setup}", concurrency=1)
            self.front.start()
            self.url = f"http://127.0.0.1:{self.front.listener_port()}/bench"
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for proc in (self.front, self.sidecar, self.floor, self.backend):
            if proc is not None:
                proc.stop()

    @property
    def authorizer_pid(self) -> int | None:
        """The process whose CPU per request the bench reports (sidecar or floor)."""
        if self.sidecar is not None:
            return self.sidecar.pid
        return self.floor.pid if self.floor is not None else None


BENCH_TENANT = "t_bench"
# The full pipeline runs (every limit checked, charged and released through the access
# log), with limits no benchmark reaches, so every request takes the allow path.
BENCH_POLICY = f"""
tenants:
  {BENCH_TENANT}:
    requests_per_day: 1000000000000
    concurrent: 1000000000
    rate_limit: {{requests_per_minute: 1000000000000, burst: 1000000000}}
"""


def bench_env(data_dir: Path) -> dict[str, str]:
    env = {**os.environ, "EXTAUTHZ_DATA_DIR": str(data_dir), "EXTAUTHZ_LOG_LEVEL": "warning"}
    for name in ("EXTAUTHZ_DATABASE_URL", "EXTAUTHZ_PEPPER", "EXTAUTHZ_CONFIG", "EXTAUTHZ_MODE"):
        env.pop(name, None)
    data_dir.mkdir(parents=True, exist_ok=True)
    policy = data_dir / "policy.yaml"
    policy.write_text(BENCH_POLICY)
    env["EXTAUTHZ_POLICY_FILE"] = str(policy)
    return env


def backends(setup: str) -> str:
    """ "" (memory counters, SQLite), "R" (Redis counters) or "RP" (and PostgreSQL)."""
    return "RP" if setup.endswith("RP") else "R" if setup.endswith("R") else ""


def redis_cpu_seconds() -> float:
    """Redis's own CPU so far (it serves every replica, so it is part of each check)."""
    import redis

    info = redis.Redis.from_url(REDIS_URL).info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


@contextmanager
def shared_env(env: dict[str, str]) -> Iterator[dict[str, dict[str, str]]]:
    """``env`` with Redis counters ("R"), and also a PostgreSQL store in a schema of its
    own ("RP", dropped afterwards)."""
    import psycopg

    schema = "bench_" + secrets.token_hex(4)
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        with_redis = {**env, "EXTAUTHZ_COUNTERS_URL": REDIS_URL}
        yield {
            "R": with_redis,
            "RP": {
                **with_redis,
                "EXTAUTHZ_DATABASE_URL": f"{POSTGRES_URL}?options=-csearch_path%3D{schema}",
            },
        }
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")
