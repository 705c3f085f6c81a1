"""Token buckets and the seed's RateLimiter, on a hand-moved clock (no sleeping)."""

from __future__ import annotations

import math
import threading

import pytest

from extauthz.limits import RateLimiter, TokenBucket
from extauthz.testing import ManualClock


def test_seed_example_capacity_rate_and_status(clock: ManualClock) -> None:
    """RateLimiter(requests_per_minute=60): capacity 10, 1 token/s; the seed's status
    example (8.5 available) after using two and waiting half a second."""
    limiter = RateLimiter(requests_per_minute=60, clock=clock)
    assert limiter.check("user1") == (True, 0.0)
    assert limiter.check("user1") == (True, 0.0)
    clock.advance(0.5)
    assert limiter.get_status("user1") == {"available_tokens": 8.5, "capacity": 10, "rate": 1.0}


def test_burst_then_refusal_with_exact_retry_after(clock: ManualClock) -> None:
    """After the burst is spent the next request is refused with the time to one token,
    and passes once that time has passed."""
    limiter = RateLimiter(requests_per_minute=60, burst=3, clock=clock)
    assert [limiter.check("k")[0] for _ in range(3)] == [True, True, True]
    assert limiter.check("k") == (False, 1.0)
    clock.advance(0.25)
    assert limiter.check("k") == (False, 0.75)
    clock.advance(0.75)
    assert limiter.check("k") == (True, 0.0)


def test_cost_weights_and_refusal_takes_nothing(clock: ManualClock) -> None:
    """A request costing 3 with 1 token left waits 2 s at 1/s; refusals take nothing."""
    limiter = RateLimiter(requests_per_minute=60, burst=4, clock=clock)
    assert limiter.check("k", tokens=3) == (True, 0.0)
    assert limiter.check("k", tokens=3) == (False, 2.0)
    assert limiter.get_status("k")["available_tokens"] == 1.0
    assert limiter.check("k", tokens=1) == (True, 0.0)


def test_cost_above_capacity_can_never_pass(clock: ManualClock) -> None:
    """A cost larger than the bucket is refused with an infinite wait and takes nothing."""
    limiter = RateLimiter(requests_per_minute=60, burst=2, clock=clock)
    allowed, retry = limiter.check("k", tokens=5)
    assert not allowed
    assert math.isinf(retry)
    assert limiter.get_status("k")["available_tokens"] == 2


def test_clock_jumping_back_gives_no_free_tokens(clock: ManualClock) -> None:
    """A backwards jump and the return to the same time add nothing; only real forward
    time past the last update refills."""
    limiter = RateLimiter(requests_per_minute=60, burst=2, clock=clock)
    assert limiter.check("k")[0]
    assert limiter.check("k")[0]
    clock.advance(-5)
    assert limiter.check("k") == (False, 1.0)
    clock.advance(5)
    assert limiter.check("k") == (False, 1.0)
    clock.advance(1)
    assert limiter.check("k") == (True, 0.0)


def test_ids_are_independent(clock: ManualClock) -> None:
    """One id's spent bucket does not limit another id."""
    limiter = RateLimiter(requests_per_minute=60, burst=1, clock=clock)
    assert limiter.check("a")[0]
    assert not limiter.check("a")[0]
    assert limiter.check("b")[0]


def test_memory_is_bounded_by_max_ids(clock: ManualClock) -> None:
    """10,000 distinct ids keep at most max_ids buckets."""
    limiter = RateLimiter(requests_per_minute=60, clock=clock, max_ids=100)
    for i in range(10_000):
        limiter.check(f"id{i}")
    assert len(limiter._state) <= 100


def test_concurrent_checks_are_exact(clock: ManualClock) -> None:
    """100 threads against a burst of 5 (no refill while they run): exactly 5 pass."""
    limiter = RateLimiter(requests_per_minute=60, burst=5, clock=clock)
    results: list[bool] = []
    start = threading.Barrier(100)

    def worker() -> None:
        start.wait()
        results.append(limiter.check("tenant")[0])

    threads = [threading.Thread(target=worker) for _ in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 5


def test_bucket_rejects_nonsense_parameters() -> None:
    """A bucket needs a positive capacity and rate."""
    with pytest.raises(ValueError, match="positive"):
        TokenBucket(0, 1)
