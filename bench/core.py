"""In-process microbenchmark of the decision core and the gRPC adapter (no network).

    python -m bench.core [--n 20000]

Prints microseconds per decision for a key-cache hit, for the full gRPC adapter path
(parse CheckRequest + decide + serialize), and the time of an unknown-key miss against a
known-but-revoked-key miss (BAD_INPUTS #8: the two must be indistinguishable).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.load import check_request
from extauthz.apikeys import APIKeyManager, KeyResolver
from extauthz.authorizer import Authorizer
from extauthz.keys import Pepper, generate_key
from extauthz.limits.gate import LimitGate
from extauthz.limits.memory import MemoryCounters
from extauthz.model import CheckInput
from extauthz.policy import parse_policy
from extauthz.store import open_store
from extauthz.tenants import TenantManager
from extauthz.transport.grpc_authz import GrpcAuthz

# Limits nobody reaches in a benchmark, so every request takes the allow path.
UNLIMITED = """
tiers:
  professional:
    requests_per_day: 1000000000000
    concurrent: 1000000000
    rate_limit: {requests_per_minute: 1000000000000, burst: 1000000000}
"""


def per_call_us(fn: Callable[[], object], n: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def measure(n: int = 20000) -> dict[str, float]:
    """Microseconds per call for each measured path (see the module docstring)."""
    tmp = tempfile.mkdtemp(prefix="extauthz-bench-")
    store = open_store(f"sqlite:///{Path(tmp) / 'b.db'}")
    pepper = Pepper(b"b" * 32)
    resolver = KeyResolver(store, pepper)
    keys = APIKeyManager(store, pepper, resolver=resolver)
    TenantManager(store).create_tenant("bench", "professional", tenant_id="bench")
    _, key = keys.create_key("bench")
    revoked_id, revoked = keys.create_key("bench")
    keys.revoke_key(revoked_id)
    authorizer = Authorizer(resolver)
    request = CheckInput("GET", "/v1/items", {"x-api-key": key, "user-agent": "bench"})
    raw = check_request(key, "/v1/items")
    grpc_authz = GrpcAuthz(authorizer)
    # The full pipeline: every limit checked and charged, the slot released as the
    # access-log entry would release it.
    counters = MemoryCounters(lease_ttl=60)
    limited = Authorizer(resolver, policy=parse_policy(UNLIMITED), gate=LimitGate(counters))
    limited_grpc = GrpcAuthz(limited)
    with_id = CheckInput(
        "GET", "/v1/items", {"x-api-key": key, "user-agent": "bench"}, request_id="r1"
    )

    def limited_check() -> None:
        limited.check(with_id)
        counters.release("r1")

    def limited_grpc_check() -> None:
        limited_grpc.check(raw, None)  # type: ignore[arg-type]
        counters.release("r1")

    results = {
        "decision_cache_hit_us": per_call_us(lambda: authorizer.check(request), n),
        "grpc_adapter_cache_hit_us": per_call_us(
            lambda: grpc_authz.check(raw, None),  # type: ignore[arg-type]
            n,
        ),
        "decision_with_limits_us": per_call_us(limited_check, n),
        "grpc_adapter_with_limits_us": per_call_us(limited_grpc_check, n),
    }
    # Cache misses, interleaved: invalidate before every call so each reaches SQLite.
    unknown = [generate_key() for _ in range(2000)]
    samples: dict[str, list[float]] = {"unknown": [], "revoked": []}
    for i in range(2000):
        for label, presented in (("unknown", unknown[i]), ("revoked", revoked)):
            resolver.invalidate()
            start = time.perf_counter()
            resolver.resolve(presented)
            samples[label].append((time.perf_counter() - start) * 1e6)
    results["miss_unknown_median_us"] = statistics.median(samples["unknown"])
    results["miss_revoked_median_us"] = statistics.median(samples["revoked"])
    store.close()
    shutil.rmtree(tmp, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = measure(args.n)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for name, value in results.items():
            print(f"{name:28} {value:8.2f}")


if __name__ == "__main__":
    main()
