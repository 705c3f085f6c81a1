"""Envoy and the sidecar together in front of an upstream: `up`, `demo`, and
`envoy-config`, which renders the same bootstrap for an Envoy of your own."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from extauthz.addresses import hostport, parse_hostport
from extauthz.app import Runtime
from extauthz.demo import EchoBackend
from extauthz.envoyconf import render, to_yaml
from extauthz.errors import ConfigError
from extauthz.launcher import EnvoyError, EnvoyProcess
from extauthz.policy import Policy, load_policy
from extauthz.runner import address_flags
from extauthz.settings import Settings, check_server
from extauthz.sidecar import Sidecar
from extauthz.signals import StopSignals

log = logging.getLogger("extauthz")
ANY_PORT = "127.0.0.1:0"
_IN_USE = re.compile(r"cannot bind '([^']+)': Address already in use")


def sidecar_addresses(settings: Settings, mode: str) -> dict[str, str]:
    """Where `up` and `demo` run the sidecar: the addresses the settings (or flags)
    give, like `serve`; the ones not given on a free loopback port, since `up` writes
    Envoy's config itself and needs no fixed port."""
    chosen = {}
    for name in (f"{check_server(mode)}_addr", "als_addr", "metrics_addr"):
        given = settings.is_given(name)
        chosen[name] = getattr(settings, name) if given else ANY_PORT
    return chosen


def _default_mode(settings: Settings) -> str:
    """`up` renders both sides, so by default it takes the bridge: Envoy's gRPC client
    and its answers, at the HTTP service's cost (docs/benchmarks.md). A mode the
    settings give (but `both`) is kept."""
    if settings.is_given("mode") and settings.mode != "both":
        return settings.mode
    return "bridge"


def _up(
    args: argparse.Namespace,
    runtime: Runtime,
    upstream: tuple[str, int],
    ready: dict[str, Any],
    signals: StopSignals,
) -> int:
    listen = parse_hostport(args.listen, "--listen")
    admin = parse_hostport(args.admin, "--admin")
    mode = args.mode or _default_mode(runtime.settings)
    sidecar = Sidecar(runtime, mode)
    sidecar.upkeep.freeze_heap = True  # a server process: see upkeep.py
    signals.on_reload = sidecar.reload_policy
    addresses = sidecar_addresses(runtime.settings, mode)
    ports = sidecar.start(
        addresses.get("grpc_addr"),
        addresses.get("http_addr"),
        addresses["als_addr"],
        addresses["metrics_addr"],
    )
    server = check_server(mode)
    authz = (_loopback(addresses[f"{server}_addr"]), ports[f"{server}_port"])
    config = render(
        listen=listen,
        upstream=upstream,
        authz=[authz],
        admin=admin,
        timeout=args.authz_timeout,
        mode=mode,
        als=[(_loopback(addresses["als_addr"]), ports["als_port"])],
        **policy_options(runtime.settings, runtime.policy),
    )
    ready.update(mode=mode, **ports)
    ready["authz"] = hostport(*authz)
    if "metrics_port" in ports:
        ready["metrics"] = hostport(_loopback(addresses["metrics_addr"]), ports["metrics_port"])
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


def _loopback(address: str) -> str:
    """The host Envoy dials for a sidecar listening on ``address``."""
    host = parse_hostport(address, "address")[0]
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # noqa: S104 - mapped away


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
        taken = _IN_USE.search(str(exc))
        if taken is not None:
            flag = "--listen" if taken.group(1) == hostport(*listen) else "--admin"
            raise ConfigError(
                f"cannot listen on {taken.group(1)}: the address is in use (another "
                f"`extauthz up`, a demo, or another server); choose another with {flag}, "
                "or port 0 for any free port"
            ) from None
        raise
    ready.update(
        url=f"http://{hostport(listen[0], envoy.listener_port())}",
        envoy_admin=envoy.admin_url,
        upstream=f"http://{hostport(*upstream)}",
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
    print(f"  ext_authz:        {ready['mode']} on {ready['authz']}")
    if "metrics" in ready:
        print(f"  metrics:          http://{ready['metrics']}/metrics")
    if "key" in ready:
        print(
            "\nTry it (the demo key lives in a throwaway store: it stops working when the "
            "demo stops):"
        )
        print(f"  curl -i {ready['url']}/hello                                   # 401, no key")
        print(f"  curl -i -H 'x-api-key: {ready['key']}' {ready['url']}/hello    # 200")
    print("\nPress Ctrl-C to stop.", flush=True)


def _with_policy(args: argparse.Namespace, settings: Settings) -> Settings:
    if args.policy:
        return settings.with_overrides(policy_file=Path(args.policy).expanduser())
    return settings


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    upstream = parse_hostport(args.upstream, "--upstream")
    settings = _with_policy(args, address_flags(args, settings))
    with StopSignals() as signals:
        runtime = Runtime.open(settings)
        try:
            return _up(args, runtime, upstream, {}, signals)
        finally:
            runtime.close()


def demo_settings(settings: Settings, store: Path) -> Settings:
    """The demo's own throwaway store, pepper and counters in ``store``: its key can
    never work against your real store, and is gone when the demo ends."""
    return settings.with_overrides(
        data_dir=store,
        database_url="",
        pepper="",
        pepper_file=None,
        counters_url="memory://",
    )


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    settings = _with_policy(args, address_flags(args, settings))
    with (
        StopSignals() as signals,
        tempfile.TemporaryDirectory(prefix="extauthz-demo-") as store,
    ):
        runtime = Runtime.open(demo_settings(settings, Path(store)))
        backend = EchoBackend().start()
        try:
            tenant = runtime.tenants.create_tenant("demo", "free", "demo")
            key_id, full_key = runtime.keys.create_key(tenant.id, "demo")
            ready = {"tenant_id": tenant.id, "key_id": key_id, "key": full_key, "store": store}
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
        "access_log": settings.access_log,
        "body_bytes": settings.max_body_bytes if policy.tokens.body_field else None,
    }


def cmd_envoy_config(args: argparse.Namespace, settings: Settings) -> int:
    default = getattr(settings, f"{check_server(args.mode)}_addr")
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
        default=ANY_PORT,
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
        choices=("bridge", "grpc", "http"),
        help="how Envoy calls extauthz: gRPC Check bridged by Envoy to the HTTP service "
        "(the default, unless EXTAUTHZ_MODE says otherwise), gRPC Check, or the HTTP "
        "service",
    )
    for flag, setting in (
        ("grpc-addr", "GRPC_ADDR"),
        ("http-addr", "HTTP_ADDR"),
        ("als-addr", "ALS_ADDR"),
        ("metrics-addr", "METRICS_ADDR"),
    ):
        cmd.add_argument(
            f"--{flag}",
            metavar="HOST:PORT",
            help=f"sidecar address (default EXTAUTHZ_{setting} if set, else a free port)"
            + ("; off disables" if flag == "metrics-addr" else ""),
        )
    cmd.add_argument("--policy", metavar="FILE", help="tier policy file (EXTAUTHZ_POLICY_FILE)")
    cmd.add_argument("--envoy-concurrency", type=int, metavar="N", help="Envoy worker threads")


def add_commands(sub: Any, add: Any) -> None:
    c = add(sub, "up", cmd_up, "run Envoy + extauthz in front of an HTTP upstream")
    c.add_argument(
        "--upstream",
        required=True,
        metavar="URL",
        help="the backend to protect: http://HOST:PORT (e.g. http://127.0.0.1:8000) or HOST:PORT",
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
    c.add_argument(
        "--mode",
        choices=("grpc", "http", "bridge"),
        default="grpc",
        help="default grpc; bridge: gRPC Check through Envoy's reverse bridge to the HTTP "
        "service (--authz is then its HTTP address)",
    )
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
