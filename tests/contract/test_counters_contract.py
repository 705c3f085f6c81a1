"""The counter interface's contract, run against every counters backend (memory today;
Redis joins the parameter list when it lands). Time is a hand-moved clock."""

from __future__ import annotations

import dataclasses
import threading
import uuid
from collections.abc import Callable

import pytest

from extauthz.limits.base import Ask, Counters, Release
from extauthz.limits.memory import MemoryCounters
from extauthz.model import TenantTier
from extauthz.policy import DEFAULT_TIERS, Limits, RateLimit
from extauthz.testing import ManualClock
from tests.services import redis_url


def redis_counters(clock: ManualClock) -> Counters:
    """The tests' Redis (tests/services.py); a fresh key prefix per test."""
    from extauthz.limits.redis import RedisCounters

    prefix = f"t{uuid.uuid4().hex}"
    # 2 s, not the 50 ms default: these tests are about counting, not timeouts.
    return RedisCounters(redis_url(), lease_ttl=30.0, prefix=prefix, clock=clock, timeout=2.0)


BACKENDS: dict[str, Callable[[ManualClock], Counters]] = {
    "memory": lambda clock: MemoryCounters(clock, lease_ttl=30.0),
    "redis": redis_counters,
}
DAY = "2027-01-15"
# Roomy limits: each test tightens the one it is about.
ROOMY = Limits(1_000_000, 1_000_000, 1_000, RateLimit(60_000, 1_000), 0.0)


@pytest.fixture(
    params=[
        "memory",
        pytest.param("redis", marks=pytest.mark.redis),
    ]
)
def counters(request: pytest.FixtureRequest, clock: ManualClock) -> Counters:
    return BACKENDS[request.param](clock)


def ask(lease: str = "", tenant: str = "t1", **limits: object) -> Ask:
    return Ask(tenant, "k1", lease, dataclasses.replace(ROOMY, **limits), DAY)


def hammer(counters: Counters, make: Callable[[int], Ask], n: int = 100) -> int:
    """n threads acquire at once (released together by a barrier); returns how many won."""
    barrier = threading.Barrier(n)
    wins: list[bool] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        barrier.wait(10)
        allowed = counters.acquire(make(i)).allowed
        with lock:
            wins.append(allowed)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(wins) == n
    return sum(wins)


@pytest.mark.parametrize(
    "limit",
    [
        {"concurrent": 5},
        {"requests_per_day": 5},
        {"rate_limit": RateLimit(1, 5)},
    ],
    ids=["concurrency", "daily-quota", "bucket"],
)
def test_100_concurrent_acquires_against_a_limit_of_5_win_exactly_5(
    counters: Counters, limit: dict[str, object]
) -> None:
    """BAD_INPUTS #12, in-process: exactness under contention, for each limit."""
    assert hammer(counters, lambda i: ask(f"r{i}", **limit)) == 5


def test_a_denial_charges_nothing(counters: Counters) -> None:
    """All or nothing: a request refused by its daily quota leaves the bucket and the
    slots as they were; one refused for concurrency leaves the daily count alone."""
    assert counters.acquire(ask("a", requests_per_day=1)).allowed
    before = counters.rate_left("t1", ROOMY)
    refused = counters.acquire(ask("b", requests_per_day=1))
    assert (refused.allowed, refused.denied_by) == (False, "day")
    assert counters.rate_left("t1", ROOMY) == before
    assert counters.in_flight("t1") == 1
    refused = counters.acquire(ask("c", concurrent=1))
    assert refused.denied_by == "concurrent"
    assert counters.usage("t1", DAY) == (1, 0)


def test_bucket_refills_at_its_rate_and_says_when(counters: Counters, clock: ManualClock) -> None:
    """60/min with burst 2: two pass, the third waits exactly 1 s, then passes."""
    limit = {"rate_limit": RateLimit(60, 2)}
    assert counters.acquire(ask("1", **limit)).allowed
    assert counters.acquire(ask("2", **limit)).allowed
    refused = counters.acquire(ask("3", **limit))
    assert (refused.denied_by, refused.retry_after) == ("rate", pytest.approx(1.0))
    clock.advance(0.4)
    assert counters.acquire(ask("4", **limit)).retry_after == pytest.approx(0.6)
    clock.advance(0.6)
    assert counters.acquire(ask("5", **limit)).allowed


def test_clock_jumps_mint_no_tokens(counters: Counters, clock: ManualClock) -> None:
    """BAD_INPUTS #13: a backward jump of 5 s, then forward again, adds nothing; a wall
    clock jump (either way) does not touch buckets at all."""
    limit = {"rate_limit": RateLimit(60, 1)}
    assert counters.acquire(ask("1", **limit)).allowed
    clock.jump(monotonic=-5)
    assert not counters.acquire(ask("2", **limit)).allowed
    clock.jump(monotonic=+5)
    assert not counters.acquire(ask("3", **limit)).allowed
    clock.jump(wall=+5)
    clock.jump(wall=-10)
    assert not counters.acquire(ask("4", **limit)).allowed
    clock.advance(1.0)
    assert counters.acquire(ask("5", **limit)).allowed


def test_key_bucket_limits_one_key_while_the_tenant_has_room(counters: Counters) -> None:
    """With key_rate_limit set, one key runs dry while another key of the tenant passes."""
    limit = {"key_rate_limit": RateLimit(1, 1)}
    assert counters.acquire(ask("1", **limit)).allowed
    assert counters.acquire(ask("2", **limit)).denied_by == "key_rate"
    other = dataclasses.replace(ask("3", **limit), key_id="k2")
    assert counters.acquire(other).allowed


def test_release_frees_the_slot_once(counters: Counters) -> None:
    """A release frees exactly its slot; a second release of the same id, or of an
    unknown one, changes nothing."""
    assert counters.acquire(ask("r1", concurrent=1)).allowed
    assert not counters.acquire(ask("r2", concurrent=1)).allowed
    settled = counters.release("r1")
    assert settled is not None
    assert settled.tenant_id == "t1"
    assert counters.release("r1") is None
    assert counters.release("never-seen") is None
    assert counters.acquire(ask("r3", concurrent=1)).allowed
    assert counters.in_flight("t1") == 1


def test_lease_expires_when_no_release_comes(counters: Counters, clock: ManualClock) -> None:
    """A slot whose access-log entry never arrives is free again after the lease TTL,
    and a late release for it is harmless."""
    assert counters.acquire(ask("lost", concurrent=1)).allowed
    clock.advance(29.9)
    assert not counters.acquire(ask("b", concurrent=1)).allowed
    clock.advance(0.2)
    assert counters.acquire(ask("c", concurrent=1)).allowed
    assert counters.release("lost") is None
    assert counters.in_flight("t1") == 1


def test_reused_request_id_never_frees_another_requests_slot(counters: Counters) -> None:
    """Two checks under one request id hold two slots; one release frees one."""
    assert counters.acquire(ask("same", concurrent=2)).allowed
    assert counters.acquire(ask("same", concurrent=2)).allowed
    assert not counters.acquire(ask("x", concurrent=2)).allowed
    counters.release("same")
    assert counters.in_flight("t1") == 1


def test_reserved_tokens_are_settled_against_the_reported_count(counters: Counters) -> None:
    """Reserve 1,000, the upstream reports 300: 700 refunded. Reserve 100, it reports
    250: the 150 overage is charged. No report: the reservation stands."""
    counters.acquire(dataclasses.replace(ask("a"), tokens=1000))
    assert counters.usage("t1", DAY) == (1, 1000)
    settled = counters.release("a", 300)
    assert settled is not None
    assert (settled.reserved, settled.actual) == (1000, 300)
    assert counters.usage("t1", DAY) == (1, 300)
    counters.acquire(dataclasses.replace(ask("b"), tokens=100))
    counters.release("b", 250)
    assert counters.usage("t1", DAY) == (2, 550)
    counters.acquire(dataclasses.replace(ask("c"), tokens=50))
    counters.release("c", None)
    assert counters.usage("t1", DAY) == (3, 600)


def test_a_batch_release_settles_each_lease_once_with_or_without_the_tenant(
    counters: Counters,
) -> None:
    """One access-log message's releases at once: with the tenant Envoy logged or
    without it, each lease is freed and settled once; unknown ids and repeats in the
    same batch change nothing; results keep the batch's order."""
    for lease, tenant in (("a", "t1"), ("b", "t1"), ("c", "t2")):
        counters.acquire(dataclasses.replace(ask(lease, tenant), tokens=100))
    results = counters.release_many(
        [
            Release("a", 30, "t1"),
            Release("b", None, ""),
            Release("zz", 5, "t1"),
            Release("c", 250, "t2"),
            Release("a", 30, "t1"),
        ]
    )
    assert [r.request_id if r else None for r in results] == ["a", "b", None, "c", None]
    assert [r.actual if r else None for r in results] == [30, None, None, 250, None]
    assert counters.usage("t1", DAY) == (2, 130)
    assert counters.usage("t2", DAY) == (1, 250)
    assert counters.in_flight("t1") == counters.in_flight("t2") == 0


def test_daily_token_budget_counts_reservations(counters: Counters) -> None:
    """tokens_per_day: a reservation that would pass the budget is refused."""
    limit = {"tokens_per_day": 1000}
    assert counters.acquire(dataclasses.replace(ask("a", **limit), tokens=800)).allowed
    refused = counters.acquire(dataclasses.replace(ask("b", **limit), tokens=300))
    assert refused.denied_by == "tokens_day"
    counters.release("a", 500)
    assert counters.acquire(dataclasses.replace(ask("c", **limit), tokens=300)).allowed


def test_raising_a_quota_takes_effect_at_once(counters: Counters) -> None:
    """The limit comes with each request: counts stay, the new limit applies now."""
    assert counters.acquire(ask("a", requests_per_day=1)).allowed
    assert not counters.acquire(ask("b", requests_per_day=1)).allowed
    assert counters.acquire(ask("c", requests_per_day=2)).allowed


def test_route_cost_counts_against_bucket_and_day(counters: Counters) -> None:
    """A cost-3 request takes 3 bucket tokens and counts 3 requests today; a cost above
    the burst takes the whole burst instead of never passing."""
    limit = {"rate_limit": RateLimit(1, 5)}
    assert counters.acquire(dataclasses.replace(ask("a", **limit), cost=3)).allowed
    assert counters.usage("t1", DAY) == (3, 0)
    assert not counters.acquire(dataclasses.replace(ask("b", **limit), cost=3)).allowed
    fresh = dataclasses.replace(ask("c", tenant="t2", **limit), cost=50)
    assert counters.acquire(fresh).allowed


def test_tenants_are_independent(counters: Counters) -> None:
    """One tenant's exhausted limits do not touch another's."""
    assert counters.acquire(ask("a", concurrent=1, requests_per_day=1)).allowed
    assert counters.acquire(ask("b", tenant="t2", concurrent=1, requests_per_day=1)).allowed


def test_seed_tier_defaults_are_what_the_report_promised() -> None:
    """FREE 1,000/day, 4K tokens, 5 concurrent ... ENTERPRISE 1M, 128K, 500."""
    expected = {
        TenantTier.FREE: (1_000, 4_096, 5),
        TenantTier.STARTER: (10_000, 8_192, 10),
        TenantTier.PROFESSIONAL: (100_000, 32_768, 50),
        TenantTier.ENTERPRISE: (1_000_000, 131_072, 500),
    }
    for tier, (day, tokens, concurrent) in expected.items():
        limits = DEFAULT_TIERS[tier]
        assert (limits.requests_per_day, limits.tokens_per_request, limits.concurrent) == (
            day,
            tokens,
            concurrent,
        )
