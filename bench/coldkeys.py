"""Many distinct keys at full speed through real Envoy, cold cache:

    python -m bench.coldkeys [--keys 100000] [--tenants 10000] [--setup D]

Creates the tenants and keys in a fresh SQLite store, starts a setup of bench/setups.py
(D: the HTTP service; CB: gRPC through the bridge; C: gRPC), and sends one request per
key over 32 connections, as fast as they are answered. Reports what each key costs the
sidecar (its RSS before and after), Envoy's checks that timed out
(``cluster.extauthz.upstream_rq_timeout``), statuses other than 200, and the latency
quantiles seen by the client (the check, Envoy and the backend).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.setups import Running, bench_env
from extauthz.app import Runtime
from extauthz.model import TenantTier
from extauthz.settings import Settings


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def make_keys(data_dir: Path, keys: int, tenants: int) -> list[str]:
    runtime = Runtime.open(Settings(data_dir=data_dir, metrics_addr="off"))
    try:
        for t in range(tenants):
            runtime.tenants.create_tenant(f"tenant-{t}", TenantTier.PROFESSIONAL, f"t{t}")
        secrets = []
        for i in range(keys):
            key, secret = runtime.keys._new(f"t{i % tenants}", "bench", None)
            runtime.store.insert_key(key)
            secrets.append(secret)
        return secrets
    finally:
        runtime.close()


async def _client(port: int, keys: list[str], next_key: list[int], out: list[Any]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while next_key[0] < len(keys):
            key = keys[next_key[0]]
            next_key[0] += 1
            started = time.perf_counter()
            writer.write(f"GET /bench HTTP/1.1\r\nhost: bench\r\nx-api-key: {key}\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            out.append((status, time.perf_counter() - started))
    finally:
        writer.close()


async def _send(port: int, keys: list[str], connections: int) -> list[Any]:
    out: list[Any] = []
    next_key = [0]
    await asyncio.gather(*(_client(port, keys, next_key, out) for _ in range(connections)))
    return out


def _stat(admin_url: str, name: str) -> int:
    url = f"{admin_url}/stats?filter=^{name}$"  # Envoy's admin: http on loopback
    with urllib.request.urlopen(url, timeout=5) as reply:  # noqa: S310
        text = reply.read().decode()
    return int(text.split(":")[1]) if ":" in text else 0


def measure(keys: int, tenants: int, setup: str, connections: int = 32) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="extauthz-coldkeys-") as tmp:
        workdir = Path(tmp)
        env = bench_env(workdir / "data")
        secrets = make_keys(workdir / "data", keys, tenants)
        running = Running(setup, workdir, env, secrets[0])
        try:
            if running.sidecar is None or running.front is None:
                raise RuntimeError(f"{setup} runs no sidecar")
            port = int(running.url.split(":")[2].split("/")[0])
            time.sleep(1)  # the sidecar's start-up work (policy, audit tail) settles
            before = rss_mb(running.sidecar.pid)
            started = time.perf_counter()
            results = asyncio.run(_send(port, secrets, connections))
            spent = time.perf_counter() - started
            after = rss_mb(running.sidecar.pid)
            timeouts = sum(
                _stat(running.front.admin_url, f"cluster.{name}.upstream_rq_timeout")
                for name in ("extauthz", "extauthz_bridge")
            )
        finally:
            running.stop()
    latencies = sorted(seconds for _, seconds in results)
    statuses: dict[int, int] = {}
    for status, _ in results:
        statuses[status] = statuses.get(status, 0) + 1

    def quantile(q: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000, 1)

    return {
        "setup": setup,
        "keys": keys,
        "tenants": tenants,
        "requests_per_s": round(len(results) / spent),
        "statuses": statuses,
        "envoy_check_timeouts": timeouts,
        "latency_ms": {
            "p50": quantile(0.5),
            "p99": quantile(0.99),
            "p99.9": quantile(0.999),
            "max": round(latencies[-1] * 1000, 1),
        },
        "sidecar_rss_mb": {"before": round(before, 1), "after": round(after, 1)},
        "per_key_bytes": round((after - before) * 2**20 / keys),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--tenants", type=int, default=10_000)
    parser.add_argument("--setup", default="D", choices=("C", "CB", "D"))
    args = parser.parse_args()
    print(json.dumps(measure(args.keys, args.tenants, args.setup), indent=2))


if __name__ == "__main__":
    main()
