"""Long-running commands: `serve`, `up`, `demo`, and `envoy-config` which renders for them."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from extauthz.app import Runtime
from extauthz.demo import EchoBackend
from extauthz.envoyconf import parse_hostport, render, to_yaml
from extauthz.errors import ConfigError
from extauthz.launcher import EnvoyError, EnvoyProcess
from extauthz.policy import Policy, load_policy
from extauthz.settings import MODES, Settings
from extauthz.sidecar import Sidecar, StopSignals

log = logging.getLogger("extauthz")


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    if args.workers < 1:
        raise ConfigError("--workers must be at least 1")
    if args.workers > 1:
        return _serve_workers(args, settings)
    with StopSignals() as signals:
        runtime = Runtime.open(settings)
        sidecar = Sidecar(runtime, args.mode)
        signals.on_reload = sidecar.reload_policy
        try:
            ports = sidecar.start(args.grpc_addr, args.http_addr, args.als_addr, args.metrics_addr)
            if args.json:
                print(json.dumps(ports), flush=True)
            log.info("received %s", signals.wait())
            sidecar.stop()
        finally:
            runtime.close()
    return 0


def _worker_addr(addr: str, index: int) -> str:
    host, port = parse_hostport(addr, "address")
    return f"{host}:{port + index if port else 0}"


def _spawn_worker(
    args: argparse.Namespace, settings: Settings, mode: str, index: int
) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "extauthz", "serve", "--json", "--workers", "1", "--mode", mode]
    if mode in ("grpc", "both"):
        cmd += ["--grpc-addr", _worker_addr(args.grpc_addr or settings.grpc_addr, index)]
    if mode in ("http", "both"):
        cmd += ["--http-addr", _worker_addr(args.http_addr or settings.http_addr, index)]
    cmd += ["--als-addr", _worker_addr(args.als_addr or settings.als_addr, index)]
    metrics = args.metrics_addr or settings.metrics_addr
    if metrics.lower() not in ("", "off"):
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


def _up(
    args: argparse.Namespace,
    runtime: Runtime,
    upstream: tuple[str, int],
    ready: dict[str, Any],
    signals: StopSignals,
) -> int:
    listen = parse_hostport(args.listen, "--listen")
    admin = parse_hostport(args.admin, "--admin")
    mode = args.mode or ("http" if runtime.settings.mode == "http" else "grpc")
    sidecar = Sidecar(runtime, mode)
    signals.on_reload = sidecar.reload_policy
    ports = sidecar.start(
        args.grpc_addr or "127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0"
    )
    config = render(
        listen=listen,
        upstream=upstream,
        authz=[("127.0.0.1", ports[f"{mode}_port"])],
        admin=admin,
        timeout=args.authz_timeout,
        mode=mode,
        als=[("127.0.0.1", ports["als_port"])],
        **policy_options(runtime.settings, runtime.policy),
    )
    ready.update(mode=mode, **ports)
    try:
        with tempfile.TemporaryDirectory(prefix="extauthz-up-") as workdir:
            envoy = EnvoyProcess(config, Path(workdir), args.envoy_concurrency)
            try:
                return _run_envoy(
                    args, envoy, signals, listen=listen, upstream=upstream, ready=ready
                )
            finally:
                envoy.stop()
    finally:
        sidecar.stop()


def _run_envoy(
    args: argparse.Namespace,
    envoy: EnvoyProcess,
    signals: StopSignals,
    *,
    listen: tuple[str, int],
    upstream: tuple[str, int],
    ready: dict[str, Any],
) -> int:
    try:
        envoy.start()
    except EnvoyError as exc:
        if "in use" in str(exc):
            raise ConfigError(
                f"cannot listen on {args.listen} (or {args.admin}): the address is in use; "
                "choose another with --listen / --admin"
            ) from None
        raise
    host = f"[{listen[0]}]" if ":" in listen[0] else listen[0]
    ready.update(
        url=f"http://{host}:{envoy.listener_port()}",
        envoy_admin=envoy.admin_url,
        upstream=f"http://{upstream[0]}:{upstream[1]}",
    )
    if args.json:
        print(json.dumps(ready), flush=True)
    else:
        _print_ready(ready)
    if signals.wait(envoy.alive) == "exited":
        log.error("Envoy exited unexpectedly:\n%s", envoy.log_tail())
        return 1
    print("\nstopping Envoy and extauthz ...", file=sys.stderr)
    return 0


def _print_ready(ready: dict[str, Any]) -> None:
    print(f"extauthz is protecting {ready['upstream']}")
    print(f"  send traffic to:  {ready['url']}")
    print(f"  Envoy admin:      {ready['envoy_admin']}")
    port = ready[f"{ready['mode']}_port"]
    print(f"  ext_authz:        {ready['mode']} on 127.0.0.1:{port}")
    if "metrics_port" in ready:
        print(f"  metrics:          http://127.0.0.1:{ready['metrics_port']}/metrics")
    if "key" in ready:
        print("\nTry it (the demo key was created just now and is shown only here):")
        print(f"  curl -i {ready['url']}/hello                                   # 401, no key")
        print(f"  curl -i -H 'x-api-key: {ready['key']}' {ready['url']}/hello    # 200")
    print("\nPress Ctrl-C to stop.", flush=True)


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    upstream = parse_hostport(args.upstream, "--upstream")
    with StopSignals() as signals:
        runtime = Runtime.open(settings)
        try:
            return _up(args, runtime, upstream, {}, signals)
        finally:
            runtime.close()


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    with StopSignals() as signals:
        runtime = Runtime.open(settings)
        backend = EchoBackend().start()
        try:
            tenant = runtime.store.find_tenant("demo") or runtime.tenants.create_tenant(
                "demo", "free", "demo"
            )
            key_id, full_key = runtime.keys.create_key(tenant.id, "demo")
            ready = {"tenant_id": tenant.id, "key_id": key_id, "key": full_key}
            return _up(args, runtime, ("127.0.0.1", backend.port), ready, signals)
        finally:
            backend.stop()
            runtime.close()


def policy_options(settings: Settings, policy: Policy) -> dict[str, Any]:
    """The render() options that follow from settings and policy: which headers Envoy
    forwards and logs, and whether it sends bodies (for a max_tokens body field)."""
    return {
        "key_headers": settings.key_headers,
        "token_header": policy.tokens.header,
        "usage_headers": settings.usage_headers,
        "body_bytes": settings.max_body_bytes if policy.tokens.body_field else None,
    }


def cmd_envoy_config(args: argparse.Namespace, settings: Settings) -> int:
    default = settings.http_addr if args.mode == "http" else settings.grpc_addr
    authz = [parse_hostport(a, "--authz") for a in (args.authz or [default])]
    als = [parse_hostport(a, "--als") for a in (args.als or [settings.als_addr])]
    policy = load_policy(settings.policy_file) if settings.policy_file else Policy()
    text = to_yaml(
        render(
            listen=parse_hostport(args.listen, "--listen"),
            upstream=parse_hostport(args.upstream, "--upstream"),
            authz=authz,
            admin=parse_hostport(args.admin, "--admin"),
            timeout=args.authz_timeout,
            mode=args.mode,
            als=als,
            **policy_options(settings, policy),
        )
    )
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


def _envoy_options(cmd: Any, listen_default: str) -> None:
    cmd.add_argument(
        "--listen",
        default=listen_default,
        metavar="HOST:PORT",
        help=f"where Envoy accepts traffic (default {listen_default}; port 0 = any)",
    )
    cmd.add_argument(
        "--admin",
        default="127.0.0.1:0",
        metavar="HOST:PORT",
        help="Envoy admin interface (default: a free loopback port)",
    )
    cmd.add_argument(
        "--authz-timeout",
        type=float,
        default=0.5,
        metavar="SECONDS",
        help="Envoy's ext_authz timeout; on timeout the request gets 503",
    )
    cmd.add_argument(
        "--mode",
        choices=("grpc", "http"),
        help="how Envoy calls extauthz: gRPC Check or the HTTP service (default grpc, "
        "or http when EXTAUTHZ_MODE=http)",
    )
    cmd.add_argument(
        "--grpc-addr", metavar="HOST:PORT", help="sidecar gRPC address (default: free port)"
    )
    cmd.add_argument("--envoy-concurrency", type=int, metavar="N", help="Envoy worker threads")


def add_commands(sub: Any, add: Any) -> None:
    c = add(sub, "serve", cmd_serve, "run the ext_authz sidecar (gRPC and/or HTTP service)")
    c.add_argument(
        "--mode",
        choices=MODES,
        help="grpc (Check v3), http (Envoy's http_service) or both (EXTAUTHZ_MODE)",
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

    c = add(sub, "up", cmd_up, "run Envoy + extauthz in front of an HTTP upstream")
    c.add_argument(
        "--upstream",
        required=True,
        metavar="URL",
        help="the backend to protect, e.g. http://127.0.0.1:8000",
    )
    _envoy_options(c, "127.0.0.1:8080")

    c = add(sub, "demo", cmd_demo, "run a demo backend behind Envoy + extauthz, with a demo key")
    _envoy_options(c, "127.0.0.1:8080")

    c = add(
        sub, "envoy-config", cmd_envoy_config, "print an Envoy config for extauthz", json_flag=False
    )
    c.add_argument("--upstream", default="127.0.0.1:8000", metavar="HOST:PORT")
    c.add_argument("--listen", default="0.0.0.0:8080", metavar="HOST:PORT")
    c.add_argument("--admin", default="127.0.0.1:9901", metavar="HOST:PORT")
    c.add_argument("--mode", choices=("grpc", "http"), default="grpc", help="default grpc")
    c.add_argument(
        "--authz",
        action="append",
        metavar="HOST:PORT",
        help="an extauthz endpoint; repeat for several (default EXTAUTHZ_GRPC_ADDR, "
        "or EXTAUTHZ_HTTP_ADDR with --mode http)",
    )
    c.add_argument(
        "--als",
        action="append",
        metavar="HOST:PORT",
        help="extauthz's access-log receiver; repeat for several (default EXTAUTHZ_ALS_ADDR)",
    )
    c.add_argument("--authz-timeout", type=float, default=0.5, metavar="SECONDS")
    c.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
