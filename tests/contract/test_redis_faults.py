"""BAD_INPUTS #15-18 with the real Redis and PostgreSQL behind a fault-injecting TCP
proxy (tests/faultproxy.py): each decision stays within its budget and follows the
tier's on_counters_down, and the store's outage is survived by cached keys."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from extauthz.app import Runtime
from extauthz.audit import LIMITS_DEGRADED
from extauthz.keys import generate_key
from extauthz.limits.degraded import GuardedCounters
from extauthz.model import CheckInput, Decision, TenantTier
from extauthz.settings import Settings
from extauthz.testing import ManualClock
from tests.faultproxy import FaultProxy, fault_proxy
from tests.loopchecks import LoopChecks
from tests.services import pg_schema, postgres_address, redis_address

POLICY = """
tiers:
  free: {on_counters_down: fail_closed}
  starter: {on_counters_down: fail_open}
  professional:
    on_counters_down: local
    concurrent: 6
    rate_limit: {requests_per_minute: 6000, burst: 1000}
"""
# The most a decision may take while Redis misbehaves: one 50 ms socket timeout plus
# the check itself, with room for a slow CI host. Envoy's own timeout is 500 ms.
BUDGET = 0.25


class Stack:
    """Checks made on the caller's thread (gRPC's way, Redis on the thread's own connection),
    or with ``loop`` as greenlets on an event loop (the HTTP service's way, Redis
    through the loop's own connection)."""

    def __init__(self, runtime: Runtime, proxy: FaultProxy, loop: LoopChecks | None) -> None:
        self.runtime = runtime
        self.proxy = proxy
        self.loop = loop
        self.authorizer = runtime.authorizer()
        self.keys: dict[TenantTier, str] = {}
        for tier in (TenantTier.FREE, TenantTier.STARTER, TenantTier.PROFESSIONAL):
            tenant = runtime.tenants.create_tenant(tier.value, tier)
            self.keys[tier] = runtime.keys.create_key(tenant.id, "k")[1]
        self.n = 0

    def request(self, tier: TenantTier) -> CheckInput:
        self.n += 1
        return CheckInput("GET", "/v1/x", {"x-api-key": self.keys[tier]}, request_id=f"r{self.n}")

    def check(self, tier: TenantTier) -> tuple[Decision, float]:
        request = self.request(tier)
        started = time.perf_counter()
        if self.loop is None:
            decision = self.authorizer.check(request)
        else:
            (decision,) = self.loop.run(lambda: self.authorizer.check(request))
        return decision, time.perf_counter() - started

    @property
    def guard(self) -> GuardedCounters:
        counters = self.runtime.counters
        assert isinstance(counters, GuardedCounters)
        return counters


@pytest.fixture(params=["thread", "loop"])
def stack(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Stack]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    with fault_proxy(*redis_address()) as proxy:
        settings = Settings(
            data_dir=tmp_path,
            policy_file=policy,
            counters_url=f"redis://127.0.0.1:{proxy.port}/0",
            replicas=3,
            metrics_addr="off",
        )
        runtime = Runtime.open(settings)
        runtime.counters.shared.prefix = f"t{uuid.uuid4().hex}"  # type: ignore[attr-defined]
        loop = LoopChecks() if request.param == "loop" else None
        try:
            yield Stack(runtime, proxy, loop)
        finally:
            if loop is not None:
                loop.close()
            runtime.close()


@pytest.mark.redis
@pytest.mark.parametrize("fault", ["delay", "drop", "cut"])
def test_each_tier_follows_its_mode_within_the_budget_when_redis_fails(
    stack: Stack, fault: str
) -> None:
    """Redis slowed to 300 ms, blackholed, or cut: FREE (fail_closed) gets 503
    limits_unavailable, STARTER (fail_open) is allowed, PROFESSIONAL (local) is allowed
    up to its local share (6 slots / 3 replicas = 2); no decision takes over BUDGET."""
    for tier in stack.keys:
        assert stack.check(tier)[0].allowed  # healthy: warms the key cache
    stack.proxy.set(fault, delay=0.3)
    slowest = 0.0
    outcomes: dict[TenantTier, list[str]] = {tier: [] for tier in stack.keys}
    for _ in range(3):
        for tier in stack.keys:
            decision, took = stack.check(tier)
            slowest = max(slowest, took)
            outcomes[tier].append(decision.reason)
    assert outcomes[TenantTier.FREE] == ["limits_unavailable"] * 3
    assert outcomes[TenantTier.STARTER] == ["ok"] * 3
    # Local share: the three checks above never release, so the third is refused.
    assert outcomes[TenantTier.PROFESSIONAL] == ["ok", "ok", "concurrency_limit"]
    print(f"{fault}: slowest decision {slowest * 1000:.1f} ms")
    assert slowest < BUDGET, f"slowest decision {slowest * 1000:.0f} ms"
    # Nine checks 50 ms apart span three of the breaker's 100 ms windows; a cut fails
    # in a millisecond, all within one window: one counted failure, each check still
    # answered at once by its tier's mode.
    assert stack.guard.breaker.is_open is (fault != "cut")
    assert stack.guard.degraded["fail_open"] == 3


def timed(check: Callable[[CheckInput], Decision], request: CheckInput) -> tuple[Decision, float]:
    started = time.perf_counter()
    return check(request), time.perf_counter() - started


@pytest.mark.redis
def test_concurrent_checks_during_a_blackhole_stay_within_the_budget(stack: Stack) -> None:
    """16 threads (or 16 greenlets on the loop) x 5 checks while Redis swallows
    everything: the first round trip times out and the checks queued behind it fail
    with it, so none waits twice."""
    assert stack.check(TenantTier.STARTER)[0].allowed
    stack.proxy.set("drop")
    times: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(5):
            decision, took = stack.check(TenantTier.STARTER)
            assert decision.allowed
            with lock:
                times.append(took)

    if stack.loop is not None:  # 16 checks at once on the loop, five times
        for _ in range(5):
            for decision, took in stack.loop.run(
                *(lambda: timed(stack.authorizer.check, stack.request(TenantTier.STARTER)),) * 16
            ):
                assert decision.allowed
                times.append(took)
    else:
        threads = [threading.Thread(target=worker) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert len(times) == 80
    print(f"concurrent blackhole: slowest {max(times) * 1000:.1f} ms")
    assert max(times) < BUDGET


@pytest.mark.redis
def test_degraded_mode_ends_when_redis_answers_again_and_is_audited(stack: Stack) -> None:
    """Blackholed, then restored: after the cooldown a probe closes the breaker; both
    transitions are in the audit trail, the end with the decisions taken meanwhile."""
    stack.check(TenantTier.STARTER)
    stack.proxy.set("drop")
    for _ in range(6):  # 50 ms each: failures in three of the breaker's windows
        stack.check(TenantTier.STARTER)
    assert stack.guard.breaker.is_open
    stack.proxy.set("pass")
    deadline = time.monotonic() + 5
    while stack.guard.breaker.is_open and time.monotonic() < deadline:
        stack.check(TenantTier.STARTER)
        time.sleep(0.05)
    assert not stack.guard.breaker.is_open
    events = stack.runtime.audit.get_events(action=LIMITS_DEGRADED)
    assert [e.outcome for e in events] == ["started", "ended"]
    assert '"fail_open":' in events[1].detail


@pytest.mark.postgres
def test_postgres_down_cached_keys_work_and_unknown_keys_get_503_fast(tmp_path: Path) -> None:
    """BAD_INPUTS #18: with the database cut (or blackholed), a key looked up before
    keeps working from the cache past its TTL; an unknown key gets 503
    store_unavailable within the store timeout, never a hang."""
    host, port = postgres_address()
    host_port = f"{host}:{port}"
    with pg_schema() as url, fault_proxy(host, port) as proxy:
        proxied = url.replace(host_port, f"127.0.0.1:{proxy.port}")
        settings = Settings(data_dir=tmp_path, database_url=proxied, metrics_addr="off")
        clock = ManualClock()
        runtime = Runtime.open(settings, clock)
        try:
            tenant = runtime.tenants.create_tenant("acme", TenantTier.STARTER)
            key = runtime.keys.create_key(tenant.id, "k")[1]
            authorizer = runtime.authorizer()

            def check(presented: str) -> tuple[str, float]:
                started = time.perf_counter()
                decision = authorizer.check(CheckInput("GET", "/", {"x-api-key": presented}))
                return decision.reason, time.perf_counter() - started

            assert check(key)[0] == "ok"
            for fault in ("drop", "cut"):
                proxy.set(fault)
                clock.advance(31)  # past key_cache_ttl: the next check asks the store
                assert check(key)[0] == "ok"
                assert runtime.resolver.stats["stale"] >= 1
                reason, took = check(generate_key("nk"))
                assert reason == "store_unavailable"
                print(f"PostgreSQL {fault}: unknown key answered 503 in {took * 1000:.1f} ms")
                assert took < 1.0, f"{took * 1000:.0f} ms"
                proxy.set("pass")
        finally:
            proxy.set("pass")
            runtime.close()


@pytest.mark.redis
def test_one_stall_counts_once_for_the_breaker_in_either_transport(stack: Stack) -> None:
    """Redis blackholed under 8 concurrent checks: on gRPC's threads each check times
    out on its own connection, on the loop they share one round trip; either way the
    breaker counts one failure and stays closed, so one blip never opens it."""
    assert stack.check(TenantTier.STARTER)[0].allowed
    stack.proxy.set("drop")
    if stack.loop is not None:
        stack.loop.run(*(lambda: stack.authorizer.check(stack.request(TenantTier.STARTER)),) * 8)
    else:
        threads = [
            threading.Thread(target=stack.check, args=(TenantTier.STARTER,)) for _ in range(8)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert stack.guard.degraded["fail_open"] == 8
    assert (stack.guard.breaker.counted, stack.guard.breaker.is_open) == (1, False)
    stack.proxy.set("pass")
    assert stack.check(TenantTier.STARTER)[0].allowed
    assert stack.guard.breaker.counted == 0
