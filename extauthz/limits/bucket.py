"""Token buckets on an injected monotonic clock.

A bucket holds up to ``capacity`` tokens and refills at ``rate`` per second; a request
takes ``cost`` tokens or is refused with the seconds until it could pass. Time that
runs backwards (a jumped clock, or replicas disagreeing later with Redis) adds nothing:
elapsed time below zero counts as zero, so no jump ever mints free tokens.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

from cachetools import TTLCache

from extauthz.clock import SYSTEM_CLOCK, Clock


@dataclass(frozen=True)
class TokenBucket:
    capacity: float
    rate: float  # tokens per second

    def __post_init__(self) -> None:
        if self.capacity <= 0 or self.rate <= 0:
            raise ValueError("a token bucket needs a positive capacity and rate")

    def take(
        self, tokens: float, updated: float, now: float, cost: float
    ) -> tuple[bool, float, float, float]:
        """From state ``(tokens, updated)`` at ``now``: (allowed, retry_after, tokens,
        updated) after taking ``cost``. Nothing is taken when refused."""
        return take(self.capacity, self.rate, (tokens, updated), now, cost)


def take(
    capacity: float, rate: float, state: tuple[float, float], now: float, cost: float
) -> tuple[bool, float, float, float]:
    """:meth:`TokenBucket.take` without building a bucket (the hot path's form)."""
    tokens, updated = state
    elapsed = max(0.0, now - updated)
    level = min(capacity, tokens + elapsed * rate)
    stamp = max(now, updated)
    if cost > capacity:
        return False, math.inf, level, stamp  # can never pass, however long one waits
    if level >= cost:
        return True, 0.0, level - cost, stamp
    return False, (cost - level) / rate, level, stamp


class RateLimiter:
    """The seed's limiter: ``check(id, tokens=1) -> (allowed, retry_after)`` and
    ``get_status(id)``, one bucket per id, in memory.

    An id unseen for the time a bucket takes to refill is forgotten (its bucket would be
    full anyway), which bounds memory at ``max_ids``.
    """

    def __init__(
        self,
        requests_per_minute: float = 60,
        burst: float | None = None,
        clock: Clock = SYSTEM_CLOCK,
        max_ids: int = 100_000,
    ) -> None:
        capacity = burst if burst is not None else max(1.0, requests_per_minute / 6)
        self.bucket = TokenBucket(capacity, requests_per_minute / 60)
        self.clock = clock
        self._lock = threading.Lock()
        refill = self.bucket.capacity / self.bucket.rate
        # Time for this limiter never goes back: a clock that jumps backwards reads as
        # standing still. Otherwise the forgetting below, timed on a clock that jumped
        # back and then forward again, would drop a drained bucket early: free tokens.
        self._high = clock.monotonic()
        self._state: TTLCache[str, tuple[float, float]] = TTLCache(
            max_ids, refill, timer=lambda: self._high
        )

    def _now(self) -> float:
        self._high = max(self._high, self.clock.monotonic())
        return self._high

    def check(self, key: str, tokens: float = 1) -> tuple[bool, float]:
        """Take ``tokens`` for ``key``: (True, 0.0), or (False, seconds until it could pass)."""
        with self._lock:
            now = self._now()
            level, updated = self._state.get(key, (self.bucket.capacity, now))
            allowed, retry, level, updated = self.bucket.take(level, updated, now, tokens)
            self._state[key] = (level, updated)
        return allowed, retry

    def get_status(self, key: str) -> dict[str, float]:
        with self._lock:
            now = self._now()
            level, updated = self._state.get(key, (self.bucket.capacity, now))
        level = min(self.bucket.capacity, level + max(0.0, now - updated) * self.bucket.rate)
        return {
            "available_tokens": level,
            "capacity": self.bucket.capacity,
            "rate": self.bucket.rate,
        }
