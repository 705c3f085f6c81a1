"""`extauthz serve`: the sidecar alone, as one process or as N worker processes."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
from typing import Any

from extauthz.addresses import parse_hostport
from extauthz.app import Runtime
from extauthz.errors import ConfigError
from extauthz.settings import MODES, Settings
from extauthz.sidecar import Sidecar
from extauthz.signals import StopSignals

log = logging.getLogger("extauthz")


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    if args.workers < 1:
        raise ConfigError("--workers must be at least 1")
    # Flags are settings given on the command line: `--metrics-addr off` turns metrics
    # off exactly as EXTAUTHZ_METRICS_ADDR=off does.
    settings = address_flags(args, settings)
    if args.workers > 1:
        return _serve_workers(args, settings)
    with StopSignals() as signals:
        runtime = Runtime.open(settings)
        sidecar = Sidecar(runtime, args.mode)
        sidecar.upkeep.freeze_heap = True  # a server process: see upkeep.py
        signals.on_reload = sidecar.reload_policy
        try:
            ports = sidecar.start()
            if args.json:
                print(json.dumps(ports), flush=True)
            log.info("received %s", signals.wait())
            sidecar.stop()
        finally:
            runtime.close()
    return 0


def address_flags(args: argparse.Namespace, settings: Settings) -> Settings:
    """--grpc-addr, --http-addr, --als-addr and --metrics-addr over the settings."""
    return settings.with_flags(
        grpc_addr=args.grpc_addr,
        http_addr=args.http_addr,
        als_addr=args.als_addr,
        metrics_addr=args.metrics_addr,
    )


def _worker_addr(addr: str, index: int) -> str:
    host, port = parse_hostport(addr, "address")
    return f"{host}:{port + index if port else 0}"


def _spawn_worker(
    args: argparse.Namespace, settings: Settings, mode: str, index: int
) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "extauthz", "serve", "--json", "--workers", "1", "--mode", mode]
    if mode in ("grpc", "both"):
        cmd += ["--grpc-addr", _worker_addr(settings.grpc_addr, index)]
    if mode in ("http", "both", "bridge"):
        cmd += ["--http-addr", _worker_addr(settings.http_addr, index)]
    cmd += ["--als-addr", _worker_addr(settings.als_addr, index)]
    metrics = settings.metrics_addr
    if metrics.lower() in ("", "off"):
        cmd += ["--metrics-addr", "off"]
    else:
        cmd += ["--metrics-addr", _worker_addr(metrics, index)]
    # The workers must use this process's store and data, whatever flags chose them.
    env = {
        **os.environ,
        "EXTAUTHZ_DATA_DIR": str(settings.data_dir),
        "EXTAUTHZ_DATABASE_URL": settings.db_url,
    }
    if args.config:
        env["EXTAUTHZ_CONFIG"] = args.config
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)  # noqa: S603


def _serve_workers(args: argparse.Namespace, settings: Settings) -> int:
    """N single-process servers on N ports (base port + i, or free ports for port 0), to
    be listed as N endpoints in Envoy's cluster. Each has its own cache and polls the
    store for changes. With memory counters each limit is enforced per worker; with
    EXTAUTHZ_COUNTERS_URL=redis://... they share one set of counters."""
    mode = args.mode or settings.mode
    if settings.counters_url == "memory://":
        log.warning(
            "%d workers with memory counters: each worker enforces its own limits, and "
            "a worker frees the concurrency slots of other workers only by lease expiry "
            "(EXTAUTHZ_LEASE_TTL); use EXTAUTHZ_COUNTERS_URL=redis://... for exact limits",
            args.workers,
        )
    Runtime.open(settings).close()  # create the pepper and schema once, before the workers
    procs: list[subprocess.Popen[str]] = []
    ports: dict[str, list[int]] = {}
    signals = StopSignals()  # before the workers start: a SIGTERM now still stops them

    def reload_all() -> None:
        for proc in procs:
            proc.send_signal(signal.SIGHUP)

    signals.on_reload = reload_all
    try:
        for index in range(args.workers):
            procs.append(_spawn_worker(args, settings, mode, index))
            line = procs[-1].stdout.readline() if procs[-1].stdout else ""
            if not line:
                raise ConfigError(f"worker {index} did not start (see its log above)")
            for name, port in json.loads(line).items():
                ports.setdefault(name + "s", []).append(port)
        summary: dict[str, Any] = {**ports, **{k[:-1]: v[0] for k, v in ports.items()}}
        if args.json:
            print(json.dumps(summary), flush=True)
        log.info("%d workers: %s", args.workers, ports)
        signals.wait(lambda: all(p.poll() is None for p in procs))
    finally:
        signals.__exit__()
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = [proc.wait() for proc in procs]
        for proc in procs:
            if proc.stdout is not None:
                proc.stdout.close()
    return max(codes, default=0)


def add_commands(sub: Any, add: Any) -> None:
    c = add(sub, "serve", cmd_serve, "run the ext_authz sidecar (gRPC and/or HTTP service)")
    c.add_argument(
        "--mode",
        choices=MODES,
        help="grpc (Check v3), http (Envoy's http_service), both, or bridge (gRPC Check "
        "through Envoy's grpc_http1_reverse_bridge to the HTTP service) (EXTAUTHZ_MODE)",
    )
    c.add_argument("--grpc-addr", metavar="HOST:PORT", help="gRPC address (EXTAUTHZ_GRPC_ADDR)")
    c.add_argument("--http-addr", metavar="HOST:PORT", help="HTTP address (EXTAUTHZ_HTTP_ADDR)")
    c.add_argument(
        "--als-addr", metavar="HOST:PORT", help="access-log receiver address (EXTAUTHZ_ALS_ADDR)"
    )
    c.add_argument(
        "--metrics-addr",
        metavar="HOST:PORT",
        help="/metrics, /healthz, /readyz address, or off (EXTAUTHZ_METRICS_ADDR)",
    )
    c.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="N server processes on ports PORT..PORT+N-1 (list each as an Envoy endpoint)",
    )
