"""Degraded mode: the breaker around shared counters, and each tier's on_counters_down."""

from __future__ import annotations

import dataclasses
import threading

import pytest

from extauthz.errors import StoreError
from extauthz.limits.base import Ask, Verdict
from extauthz.limits.degraded import Breaker, CountersUnavailable, GuardedCounters, local_share
from extauthz.limits.memory import MemoryCounters
from extauthz.model import TenantTier
from extauthz.policy import Limits, RateLimit, parse_policy
from extauthz.testing import ManualClock

LIMITS = Limits(1000, 1000, 4, RateLimit(600, 100), 0.001)


class FlakyCounters(MemoryCounters):
    """Memory counters that fail every call while ``down`` is set."""

    url = "flaky://"

    def __init__(self, clock: ManualClock) -> None:
        super().__init__(clock, 60.0)
        self.down = False
        self.calls = 0

    def acquire(self, ask: Ask) -> Verdict:
        self.calls += 1
        if self.down:
            raise StoreError("Redis counters failed: Timeout reading from socket")
        return super().acquire(ask)


def ask(lease: str, mode: str = "local", limits: Limits = LIMITS) -> Ask:
    return Ask("t1", "k1", lease, dataclasses.replace(limits, on_counters_down=mode), "d")


@pytest.fixture
def shared(clock: ManualClock) -> FlakyCounters:
    return FlakyCounters(clock)


@pytest.fixture
def events() -> list[tuple[bool, dict[str, int]]]:
    return []


@pytest.fixture
def guarded(
    shared: FlakyCounters, clock: ManualClock, events: list[tuple[bool, dict[str, int]]]
) -> GuardedCounters:
    # window 0: on this manual clock each failure is a stall of its own.
    return GuardedCounters(
        shared,
        clock,
        replicas=2,
        failures=3,
        cooldown=1.0,
        window=0.0,
        on_change=lambda *e: events.append(e),
    )


def test_breaker_opens_after_consecutive_failures_and_probes_once_after_cooldown(
    clock: ManualClock,
) -> None:
    """Three failures a window apart, with no success between, open the breaker; after
    the cooldown one probe at a time goes through, and a success closes it."""
    changes: list[bool] = []
    breaker = Breaker(clock, failures=3, cooldown=1.0, on_change=changes.append, window=0.1)
    breaker.failure()
    breaker.success()  # a success in between resets the run
    for _ in range(2):
        clock.advance(0.1)
        breaker.failure()
    assert not breaker.is_open
    clock.advance(0.1)
    breaker.failure()
    assert breaker.is_open
    assert changes == [True]
    assert not breaker.allow()
    clock.advance(1.0)
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # only one at a time
    breaker.failure()  # probe failed: another cooldown
    assert not breaker.allow()
    clock.advance(1.0)
    assert breaker.allow()
    breaker.success()
    assert not breaker.is_open
    assert changes == [True, False]
    assert breaker.allow()


def test_one_stall_seen_by_many_callers_counts_once(clock: ManualClock) -> None:
    """64 threads failing within one window (a stall every gRPC thread sees on its own
    connection, or every greenlet behind one round trip): one counted failure, the
    breaker stays closed; failures spread over three windows open it."""
    breaker = Breaker(clock, failures=3, window=0.1)
    threads = [threading.Thread(target=breaker.failure) for _ in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    clock.advance(0.05)
    breaker.failure()  # still within the window
    assert (breaker.counted, breaker.is_open) == (1, False)
    clock.advance(0.06)
    breaker.failure()
    clock.advance(0.1)
    breaker.failure()
    assert breaker.is_open


def test_while_open_no_request_waits_on_the_shared_backend(
    guarded: GuardedCounters, shared: FlakyCounters
) -> None:
    """After 3 failures, further checks do not call Redis at all until the cooldown."""
    shared.down = True
    for i in range(10):
        guarded.acquire(ask(f"r{i}"))
    assert shared.calls == 3


def test_fail_closed_refuses(guarded: GuardedCounters, shared: FlakyCounters) -> None:
    shared.down = True
    with pytest.raises(CountersUnavailable):
        guarded.acquire(ask("a", "fail_closed"))


def test_fail_open_allows_unchecked_and_counts(
    guarded: GuardedCounters, shared: FlakyCounters
) -> None:
    shared.down = True
    verdict = guarded.acquire(ask("a", "fail_open"))
    assert verdict.allowed
    assert verdict.degraded
    assert guarded.degraded["fail_open"] == 1


def test_local_mode_enforces_each_limit_divided_by_replicas(
    guarded: GuardedCounters, shared: FlakyCounters
) -> None:
    """4 concurrent slots across 2 replicas: 2 here while Redis is down; the local
    lease is released locally."""
    shared.down = True
    results = [guarded.acquire(ask(f"r{i}")).allowed for i in range(3)]
    assert results == [True, True, False]
    assert guarded.release("r0") is not None
    assert guarded.acquire(ask("r3")).allowed


def test_local_share_rounds_up_and_keeps_at_least_one() -> None:
    limits = Limits(1000, 1000, 5, RateLimit(601, 3), 0.0, tokens_per_day=10)
    share = local_share(limits, 3)
    assert (share.requests_per_day, share.concurrent, share.tokens_per_day) == (334, 2, 4)
    assert share.rate_limit == RateLimit(201, 1)
    assert local_share(limits, 1) is limits


def test_start_and_end_are_reported_with_the_decisions_taken(
    guarded: GuardedCounters,
    shared: FlakyCounters,
    clock: ManualClock,
    events: list[tuple[bool, dict[str, int]]],
) -> None:
    shared.down = True
    for i, mode in enumerate(["local", "local", "local", "fail_open", "fail_open"]):
        guarded.acquire(ask(f"r{i}", mode))
    assert events == [(True, {})]
    shared.down = False
    clock.advance(1.0)
    assert guarded.acquire(ask("probe")).allowed
    assert events[-1] == (False, {"local": 3, "fail_open": 2})
    assert not guarded.breaker.is_open


def test_policy_names_the_mode_per_tier_and_refuses_unknown_modes() -> None:
    policy = parse_policy("tiers:\n  free:\n    on_counters_down: fail_closed\n")
    assert policy.tiers[TenantTier.FREE].on_counters_down == "fail_closed"
    assert policy.tiers[TenantTier.STARTER].on_counters_down == "local"
    with pytest.raises(Exception, match="on_counters_down must be one of"):
        parse_policy("tiers:\n  free:\n    on_counters_down: maybe\n")
