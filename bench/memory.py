"""Memory per cached key, in process (no network):

    python -m bench.memory [--keys 100000] [--tenants 10000]

Creates the tenants and keys in a fresh SQLite store, then sends one allowed check per
key through the full pipeline (key cache, every limit charged, the slot released as the
access log would, the usage record queued and written), and reports the process's
resident memory before and after, and the difference per key. The key cache's default
size (EXTAUTHZ_KEY_CACHE_SIZE, 100,000) holds every key here.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from extauthz.app import Runtime
from extauthz.limits.base import Release
from extauthz.model import CheckInput, TenantTier
from extauthz.settings import Settings


def rss_mb() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * 4096 / 2**20


def measure(keys: int = 100_000, tenants: int = 10_000) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="extauthz-bench-") as tmp:
        runtime = Runtime.open(Settings(data_dir=Path(tmp), metrics_addr="off"))
        try:
            manager = runtime.keys
            secrets: list[str] = []
            for t in range(tenants):
                runtime.tenants.create_tenant(f"tenant-{t}", TenantTier.PROFESSIONAL, f"t{t}")
            for i in range(keys):
                key, secret = manager._new(f"t{i % tenants}", "bench", None)
                runtime.store.insert_key(key)
                secrets.append(secret)
            sidecar_check = runtime.authorizer().check
            gc.collect()
            before = rss_mb()
            started = time.perf_counter()
            for i, secret in enumerate(secrets):
                decision = sidecar_check(
                    CheckInput("GET", "/v1", {"x-api-key": secret}, request_id=f"r{i}")
                )
                if not decision.allowed:
                    raise RuntimeError(f"check {i} was refused: {decision.reason}")
                runtime.counters.release_many([Release(f"r{i}", None, f"t{i % tenants}")])
            spent = time.perf_counter() - started
            runtime.flush()
            # As the server's upkeep does every few seconds: last-used times to the store.
            runtime.resolver.flush_last_used()
            gc.collect()
            after = rss_mb()
            return {
                "keys": keys,
                "tenants": tenants,
                "rss_before_mb": round(before, 1),
                "rss_after_mb": round(after, 1),
                "per_key_bytes": round((after - before) * 2**20 / keys),
                "cold_check_us": round(spent / keys * 1e6, 1),
            }
        finally:
            runtime.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--tenants", type=int, default=10_000)
    args = parser.parse_args()
    print(json.dumps(measure(args.keys, args.tenants), indent=2))


if __name__ == "__main__":
    main()
