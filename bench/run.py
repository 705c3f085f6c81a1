"""`python -m bench`: extauthz against Envoy alone and Envoy's built-in filters.

Rounds interleave the setups (A B C D, A B C D, ...), each run on fresh processes, and
the table reports medians; every ratio is to setup A from the same run. Needs wrk and
h2load (`sudo apt-get install -y wrk nghttp2-client`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench import core, entries
from bench.floors import nginx_path
from bench.load import (
    check_request,
    context_switches,
    cpu_by_group,
    cpu_seconds,
    grpc_frame,
    h2load_grpc,
    require_tools,
    thread_cpu,
    wrk,
)
from bench.setups import (
    BENCH_TENANT,
    SETUPS,
    Running,
    Sidecar,
    backends,
    bench_env,
    redis_cpu_seconds,
    shared_env,
)
from extauthz.app import Runtime
from extauthz.settings import load_settings

RATE_CONNECTIONS, RATE_DELAY_MS = 4, 4.0  # about 1,000 req/s
FLOOR_OF = {"C": "FG", "D": "FH"}


def bench_key(env: dict[str, str]) -> str:
    """The bench tenant and a key for it, in the store ``env`` names."""
    runtime = Runtime.open(load_settings(environ=env))
    try:
        tenant = runtime.tenants.create_tenant("bench", "enterprise", BENCH_TENANT)
        return runtime.keys.create_key(tenant.id, "bench")[1]
    finally:
        runtime.close()


def measure(
    setup: str, workdir: Path, env: dict[str, str], key: str, seconds: float
) -> dict[str, Any]:
    running = Running(setup, workdir, env, key)
    pid = running.authorizer_pid
    sidecar = running.sidecar is not None
    try:
        headers = {"x-api-key": key}
        wrk(running.url, 1, headers)  # warm-up: connections, caches
        uses_redis = bool(backends(setup))
        front = running.front.proc.pid if running.front and running.front.proc else 0
        envoy_before = cpu_seconds(front)
        before = cpu_seconds(pid) if pid else 0.0
        threads = thread_cpu(pid) if sidecar and pid else {}
        switches = context_switches(pid) if pid else 0
        redis_before = redis_cpu_seconds() if uses_redis else 0.0
        peak = wrk(running.url, seconds, headers)
        after = cpu_seconds(pid) if pid else 0.0
        envoy_after = cpu_seconds(front)
        groups = cpu_by_group(threads, thread_cpu(pid)) if sidecar and pid else {}
        if pid:
            switches = context_switches(pid) - switches
        redis_after = redis_cpu_seconds() if uses_redis else 0.0
        fixed = wrk(running.url, max(2.0, seconds / 2), headers, RATE_CONNECTIONS, RATE_DELAY_MS)
        single = wrk(running.url, max(2.0, seconds / 3), headers, connections=1)
        backend = wrk(f"http://127.0.0.1:{running.backend_port}/", max(1.0, seconds / 3), {})
    finally:
        running.stop()
    per_request = 1e6 / max(peak.requests, 1)
    return {
        "rps": peak.rps,
        "p50_ms": peak.p50_ms,
        "p99_ms": peak.p99_ms,
        "bad": peak.bad,
        "requests": peak.requests,
        "cpu_us_per_check": (after - before) * per_request if pid else None,
        "envoy_us_per_request": (envoy_after - envoy_before) * per_request,
        # The sidecar's CPU per request split by thread: the access-log entry (one per
        # request), the usage/audit writers, and the check with everything else.
        "als_us_per_entry": groups["als"] * per_request if groups else None,
        "writers_us_per_request": groups["writers"] * per_request if groups else None,
        "checks_us_per_request": groups["checks"] * per_request if groups else None,
        "switches_per_check": switches / peak.requests if pid else None,
        "redis_us_per_check": ((redis_after - redis_before) * per_request if uses_redis else None),
        "fixed_rps": fixed.rps,
        "fixed_p50_ms": fixed.p50_ms,
        "fixed_p99_ms": fixed.p99_ms,
        "fixed_bad": fixed.bad,
        "single_p50_ms": single.p50_ms,
        "single_p99_ms": single.p99_ms,
        "single_bad": single.bad,
        "backend_alone_rps": backend.rps,
    }


def direct(workdir: Path, env: dict[str, str], key: str, seconds: float) -> dict[str, Any]:
    """The sidecar alone, no Envoy: wrk for HTTP, h2load for gRPC."""
    out: dict[str, Any] = {}
    http = Sidecar("http", env, workdir)
    try:
        before = cpu_seconds(http.pid)
        result = wrk(f"http://127.0.0.1:{http.ports[0]}/bench", seconds, {"x-api-key": key})
        used = cpu_seconds(http.pid) - before
        out["http"] = {
            "checks_per_s": result.rps,
            "bad": result.bad,
            "cpu_us_per_check": used / result.requests * 1e6,
        }
    finally:
        http.stop()
    grpc = Sidecar("grpc", env, workdir)
    try:
        body = grpc_frame(check_request(key))
        url = f"http://127.0.0.1:{grpc.ports[0]}/envoy.service.auth.v3.Authorization/Check"
        before = cpu_seconds(grpc.pid)
        result = h2load_grpc(url, body, seconds)
        used = cpu_seconds(grpc.pid) - before
        out["grpc"] = {
            "checks_per_s": result.rps,
            "bad": result.bad,
            "cpu_us_per_check": used / max(result.requests, 1) * 1e6,
        }
    finally:
        grpc.stop()
    return out


def summarize(
    rounds: list[dict[str, dict[str, Any]]], chosen: list[str]
) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for setup in chosen:
        runs = [r[setup] for r in rounds]
        med: dict[str, Any] = {}
        for field in runs[0]:
            values = [r[field] for r in runs if r[field] is not None]
            med[field] = statistics.median(values) if values else None
        ratios = [r[setup]["rps"] / r["A"]["rps"] for r in rounds]
        med["ratio"] = statistics.median(ratios)
        med["ratio_range"] = (min(ratios), max(ratios))
        # Redis (and PostgreSQL) against the same transport on memory, round by round.
        memory = setup[0]
        med["vs_memory"] = (
            statistics.median(r[setup]["rps"] / r[memory]["rps"] for r in rounds)
            if backends(setup) and memory in chosen
            else None
        )
        med["bad_total"] = sum(r["bad"] + r["fixed_bad"] + r["single_bad"] for r in runs)
        # C and D (and their variants) as a share of their transport's floor, round by round.
        floor = FLOOR_OF.get(setup[0])
        if floor in chosen and setup not in FLOOR_OF.values():
            med["floor"] = floor
            shares = [r[setup]["rps"] / r[floor]["rps"] for r in rounds]
            med["vs_floor"] = statistics.median(shares)
            med["vs_floor_range"] = (min(shares), max(shares))
            med["cpu_vs_floor"] = statistics.median(
                r[setup]["cpu_us_per_check"] / r[floor]["cpu_us_per_check"] for r in rounds
            )
        summary[setup] = med
    base = summary["A"]
    for s in summary.values():
        s["added_p50_ms"] = s["fixed_p50_ms"] - base["fixed_p50_ms"]
        s["added_p99_ms"] = s["fixed_p99_ms"] - base["fixed_p99_ms"]
        s["single_added_p50_ms"] = s["single_p50_ms"] - base["single_p50_ms"]
    return summary


def print_table(summary: dict[str, dict[str, Any]], meta: dict[str, Any]) -> None:
    print(
        f"\n{meta['rounds']} interleaved rounds x {meta['seconds']}s per setup, medians; "
        f"ratios to A from the same round; wrk -t1 -c16, Envoy --concurrency 1"
    )
    print(
        f"{'setup':40} {'req/s':>8} {'xA':>5} {'p50ms':>6} {'p99ms':>6} {'CPU us/chk':>10} "
        f"{'sw/chk':>6} "
        f"| {'@~1k/s':>6} {'p50ms':>6} {'p99ms':>6} {'+p50':>6} {'+p99':>6} "
        f"| {'1conn p50':>9} {'+p50':>6}"
    )
    shared = [(k, s) for k, s in summary.items() if s.get("redis_us_per_check") is not None]
    for setup, s in summary.items():
        label = SETUPS[setup]
        cpu = (
            f"{s['cpu_us_per_check']:10.0f} {s['switches_per_check']:6.2f}"
            if s["cpu_us_per_check"] is not None
            else f"{'-':>10} {'-':>6}"
        )
        print(
            f"{setup + ' ' + label:40} {s['rps']:8.0f} {s['ratio']:5.2f} {s['p50_ms']:6.2f} "
            f"{s['p99_ms']:6.2f} {cpu} | {s['fixed_rps']:6.0f} {s['fixed_p50_ms']:6.2f} "
            f"{s['fixed_p99_ms']:6.2f} {s['added_p50_ms']:6.2f} {s['added_p99_ms']:6.2f} "
            f"| {s['single_p50_ms']:9.2f} {s['single_added_p50_ms']:6.2f}"
        )
    if shared:
        print(
            "\nshared backends against memory counters (same transport, same round): "
            "req/s ratio, and Redis's own CPU per check"
        )
        for setup, s in shared:
            vs = f"{s['vs_memory']:.2f}x {setup[0]}" if s["vs_memory"] is not None else "-"
            print(f"  {setup + ' ' + SETUPS[setup]:40} {vs:>9}  {s['redis_us_per_check']:5.0f} us")
    floored = [(k, s) for k, s in summary.items() if s.get("vs_floor") is not None]
    if floored:
        print("\nagainst the transport floor (same round, medians): req/s share and sidecar CPU")
        for setup, s in floored:
            floor = summary[s["floor"]]
            low, high = s["vs_floor_range"]
            print(
                f"  {setup + ' ' + SETUPS[setup]:40} {s['vs_floor']:5.2f} "
                f"({low:.2f}-{high:.2f}) of {s['floor']} req/s, "
                f"CPU {s['cpu_us_per_check']:.0f} us = {s['cpu_vs_floor']:.2f}x "
                f"{s['floor']}'s {floor['cpu_us_per_check']:.0f} us"
            )
    split = [(k, s) for k, s in summary.items() if s.get("als_us_per_entry") is not None]
    if split:
        print("\nsidecar CPU per request by thread (us): checks + access log + writers")
        for setup, s in split:
            print(
                f"  {setup + ' ' + SETUPS[setup]:40} {s['checks_us_per_request']:5.0f} + "
                f"{s['als_us_per_entry']:5.0f} + {s['writers_us_per_request']:5.0f}"
            )
    print(
        "\nthe front Envoy's CPU per request (us; it shares the cores with the sidecar),"
        " and each setup's xA range over the rounds"
    )
    for setup, s in summary.items():
        low, high = s["ratio_range"]
        envoy = s["envoy_us_per_request"]
        print(f"  {setup + ' ' + SETUPS[setup]:40} {envoy:5.0f}   {low:.2f}-{high:.2f}")
    for note in meta.get("notes", []):
        print(f"note: {note}")
    spread = meta.get("a_spread")
    if spread and spread[1] > 1.2 * spread[0]:
        print(
            f"WARNING: setup A varied from {spread[0]:.0f} to {spread[1]:.0f} req/s across "
            "rounds: the machine was noisy, so ratios are unreliable; run again"
        )
    backend = statistics.median(s["backend_alone_rps"] for s in summary.values())
    factor = backend / summary["A"]["rps"]
    verdict = "not the bottleneck" if factor >= 1.5 else "WARNING: it may be limiting A"
    print(
        f"backend alone (Envoy direct_response, median): {backend:.0f} req/s "
        f"({factor:.1f}x setup A: {verdict})"
    )


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0, help="load time per setup")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 round of 2 s: a smoke test that every setup runs and answers",
    )
    parser.add_argument(
        "--setups",
        default="A,B,FG,FH,C,CB,D",
        help=f"comma-separated, from {','.join(SETUPS)} (A always runs: it is the baseline)",
    )
    parser.add_argument("--output", help="JSON results file (default bench/results/<time>.json)")
    parser.add_argument(
        "--sidecar-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for the sidecar, e.g. EXTAUTHZ_TRACE_EXPORTER=console; repeatable",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = make_parser()
    args = parser.parse_args(argv)
    require_tools()
    if args.quick:
        args.rounds, args.seconds = 1, 2.0
    asked = [s.strip() for s in args.setups.upper().split(",") if s.strip()]
    unknown = [s for s in asked if s not in SETUPS]
    if unknown:
        parser.error(f"unknown setups {', '.join(unknown)} (known: {', '.join(SETUPS)})")
    chosen = ["A"] + [s for s in dict.fromkeys(asked) if s != "A"]
    notes = []
    if "FH" in chosen and nginx_path() is None:
        chosen.remove("FH")
        notes.append(
            "FH (the HTTP floor) skipped: nginx is not installed "
            "(sudo apt-get install -y nginx-light)"
        )
    with tempfile.TemporaryDirectory(prefix="extauthz-bench-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        env = bench_env(workdir / "data")
        for item in args.sidecar_env:
            name, _, value = item.partition("=")
            env[name] = value
        envs = {"": env}
        keys = {"": bench_key(env)}
        keys["R"] = keys[""]  # the same SQLite store, counters elsewhere
        if any(backends(s) for s in chosen):
            envs.update(stack.enter_context(shared_env(env)))
            if any(backends(s) == "RP" for s in chosen):
                keys["RP"] = bench_key(envs["RP"])
        rounds: list[dict[str, dict[str, Any]]] = []
        for number in range(1, args.rounds + 1):
            result: dict[str, dict[str, Any]] = {}
            for setup in chosen:
                print(
                    f"round {number}/{args.rounds}: {setup} {SETUPS[setup]} ...",
                    file=sys.stderr,
                    flush=True,
                )
                kind = backends(setup)
                result[setup] = measure(setup, workdir, envs[kind], keys[kind], args.seconds)
            rounds.append(result)
        print("direct: the sidecar alone ...", file=sys.stderr, flush=True)
        alone = direct(workdir, env, keys[""], max(2.0, args.seconds / 2))
    summary = summarize(rounds, chosen)
    micro = core.measure(5000 if args.quick else 20000)
    micro.update(entries.measure(5000 if args.quick else 20000))
    meta = {
        "rounds": args.rounds,
        "seconds": args.seconds,
        "setups": chosen,
        "a_spread": [min(r["A"]["rps"] for r in rounds), max(r["A"]["rps"] for r in rounds)],
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "sidecar_env": args.sidecar_env,
        "notes": notes,
    }
    print_table(summary, meta)
    for mode, d in alone.items():
        print(
            f"direct, sidecar alone ({mode}): {d['checks_per_s']:.0f} checks/s, "
            f"{d['cpu_us_per_check']:.0f} us CPU/check, {d['bad']} bad"
        )
    print(
        f"in-process decision core (cache hit): {micro['decision_cache_hit_us']:.1f} us; "
        f"gRPC adapter incl. protobuf: {micro['grpc_adapter_cache_hit_us']:.1f} us"
    )
    print(
        "in-process access-log entry (decode, release, settle, queue the record): "
        f"gRPC {micro['access_log_entry_grpc_us']:.1f} us, "
        f"fluentd {micro['access_log_entry_fluentd_us']:.1f} us"
    )
    record = {"meta": meta, "summary": summary, "rounds": rounds, "direct": alone, "core": micro}
    path = (
        Path(args.output)
        if args.output
        else (Path(__file__).parent / "results" / f"{meta['time'].replace(':', '')}.json")
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    print(f"results: {path}")
    failures = [s for s in summary if summary[s]["bad_total"]] + [
        m for m, d in alone.items() if d["bad"]
    ]
    if failures:
        raise SystemExit(f"bench: setups answered with errors or wrong statuses: {failures}")
