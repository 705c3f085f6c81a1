"""Degraded mode: shared counters (Redis) behind a circuit breaker, and what each tier
does while they are out of reach.

Every call to the shared backend is bounded by its socket timeout (50 ms by default).
After ``failures`` counted failures in a row (one stall counts once, see Breaker) the
breaker opens: for ``cooldown`` seconds no request waits on Redis at all; then one
request at a time probes it, and the first success closes the breaker. While it is
open (or when a call fails), each request follows its tier's ``on_counters_down``:

- ``fail_closed``: refused, 503 ``limits_unavailable``;
- ``fail_open``: allowed without limits (counted, and the counts audited when it ends);
- ``local``: this replica's own counters, at each limit divided by ``replicas``.

Start and end are logged, exported as a metric and audited (LIMITS_DEGRADED).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
from collections import Counter
from collections.abc import Callable, Sequence

from extauthz.clock import SYSTEM_CLOCK, Clock
from extauthz.errors import StoreError
from extauthz.limits.base import Ask, Counters, Release, Settlement, Verdict
from extauthz.limits.memory import MemoryCounters
from extauthz.policy import Limits, RateLimit

log = logging.getLogger("extauthz.limits")

FAIL_CLOSED, FAIL_OPEN, LOCAL = "fail_closed", "fail_open", "local"


class CountersUnavailable(StoreError):
    """The shared counters cannot answer and the tier fails closed."""


class Breaker:
    """Closed, open after ``failures`` counted failures with no success between them,
    half-open after ``cooldown`` (one probe at a time). A failure less than ``window``
    after the last one counted is the same stall seen by another caller (gRPC threads
    each on their own connection, greenlets sharing the loop's), so it counts once,
    whatever the transport and however many callers saw it. Thread-safe;
    ``on_change(open)`` runs on state changes."""

    def __init__(
        self,
        clock: Clock = SYSTEM_CLOCK,
        failures: int = 3,
        cooldown: float = 1.0,
        on_change: Callable[[bool], None] | None = None,
        *,
        window: float = 0.1,
    ) -> None:
        self.clock = clock
        self.failures = failures
        self.cooldown = cooldown
        self.window = window
        self.on_change = on_change
        self.is_open = False
        self.counted = 0  # failures counted since the last success
        self._counted_at = 0.0
        self._retry_at = 0.0
        self._probing = False
        self._lock = threading.Lock()

    def allow(self) -> bool:
        """Whether this call may go to the backend now."""
        if not self.is_open:
            return True
        with self._lock:
            if self._probing or self.clock.monotonic() < self._retry_at:
                return False
            self._probing = True
            return True

    def success(self) -> None:
        if not self.is_open and self.counted == 0:
            return  # the common case: no lock
        with self._lock:
            self.counted, self._probing = 0, False
            changed, self.is_open = self.is_open, False
        if changed and self.on_change is not None:
            self.on_change(False)

    def failure(self) -> None:
        """Count a failed call (once per ``window``, see the class)."""
        with self._lock:
            self._probing = False
            now = self.clock.monotonic()
            if self.is_open:  # a failed probe: wait another cooldown
                self._retry_at = now + self.cooldown
                return
            if self.counted and now < self._counted_at + self.window:
                return
            self._counted_at = now
            self.counted += 1
            if self.counted < self.failures:
                return
            self._retry_at = now + self.cooldown
            self.is_open = True
        if self.on_change is not None:
            self.on_change(True)


def local_share(limits: Limits, replicas: int) -> Limits:
    """Each limit divided among ``replicas`` (rounded up, at least 1)."""
    if replicas <= 1:
        return limits

    def share(n: int) -> int:
        return max(1, math.ceil(n / replicas))

    def bucket(rate: RateLimit | None) -> RateLimit | None:
        if rate is None:
            return None
        return RateLimit(share(rate.requests_per_minute), share(rate.burst))

    return dataclasses.replace(
        limits,
        requests_per_day=share(limits.requests_per_day) if limits.requests_per_day else 0,
        concurrent=share(limits.concurrent),
        rate_limit=bucket(limits.rate_limit) or limits.rate_limit,
        key_rate_limit=bucket(limits.key_rate_limit),
        tokens_per_day=None if limits.tokens_per_day is None else share(limits.tokens_per_day),
    )


class GuardedCounters(Counters):
    """``shared`` behind a breaker, with a local fallback; same interface."""

    def __init__(
        self,
        shared: Counters,
        clock: Clock = SYSTEM_CLOCK,
        *,
        replicas: int = 1,
        lease_ttl: float = 60.0,
        failures: int = 3,
        cooldown: float = 1.0,
        window: float = 0.1,
        on_change: Callable[[bool, dict[str, int]], None] | None = None,
    ) -> None:
        self.url = shared.url
        self.remote = shared.remote
        self.shared = shared
        self.local = MemoryCounters(clock, lease_ttl)
        self.replicas = replicas
        self.on_change = on_change
        self.breaker = Breaker(clock, failures, cooldown, self._changed, window=window)
        # Decisions taken in degraded mode, by tier mode (metrics read it; reset never).
        self.degraded: Counter[str] = Counter()
        self._since_start: Counter[str] = Counter()
        self._shares: dict[int, tuple[Limits, Limits]] = {}
        self._lock = threading.Lock()

    def _changed(self, is_open: bool) -> None:
        counts: dict[str, int] = {}
        if not is_open:  # the failures that opened the breaker count too
            with self._lock:
                counts, self._since_start = dict(self._since_start), Counter()
        if is_open:
            log.warning(
                "shared counters unreachable: degraded mode started "
                "(each tier follows its on_counters_down)"
            )
        else:
            log.warning(
                "shared counters reachable again: degraded mode ended (%s)",
                ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "no requests",
            )
        if self.on_change is not None:
            self.on_change(is_open, counts)

    def acquire(self, ask: Ask) -> Verdict:
        if self.breaker.allow():
            try:
                verdict = self.shared.acquire(ask)
            except StoreError as exc:
                self.breaker.failure()
                log.debug("shared counters failed: %s", exc)
            except BaseException:
                self.breaker.failure()  # a half-open probe must not stay claimed
                raise
            else:
                self.breaker.success()
                return verdict
        mode = ask.limits.on_counters_down
        with self._lock:
            self.degraded[mode] += 1
            self._since_start[mode] += 1
        if mode == FAIL_OPEN:
            return Verdict(True, degraded=True)
        if mode == FAIL_CLOSED:
            raise CountersUnavailable("shared counters unavailable and the tier fails closed")
        return self.local.acquire(dataclasses.replace(ask, limits=self._share(ask.limits)))

    def _share(self, limits: Limits) -> Limits:
        cached = self._shares.get(id(limits))
        if cached is not None and cached[0] is limits:
            return cached[1]
        share = local_share(limits, self.replicas)
        if len(self._shares) > 10_000:
            self._shares.clear()
        self._shares[id(limits)] = (limits, share)
        return share

    def release(self, lease_id: str, actual_tokens: int | None = None) -> Settlement | None:
        settled = self.local.release(lease_id, actual_tokens)
        if settled is not None or not self.breaker.allow():
            # A shared lease we cannot reach now expires there by its TTL.
            return settled
        try:
            settled = self.shared.release(lease_id, actual_tokens)
        except StoreError:
            self.breaker.failure()
            return None
        self.breaker.success()
        return settled

    def release_many(self, releases: Sequence[Release]) -> list[Settlement | None]:
        results = self.local.release_many(releases)
        rest = [i for i, settled in enumerate(results) if settled is None]
        if not rest or not self.breaker.allow():
            return results
        try:
            shared = self.shared.release_many([releases[i] for i in rest])
        except StoreError:
            self.breaker.failure()
            return results
        self.breaker.success()
        for i, settled in zip(rest, shared, strict=True):
            results[i] = settled
        return results

    def add_usage(self, tenant_id: str, day: str, requests: int = 0, tokens: int = 0) -> None:
        self.shared.add_usage(tenant_id, day, requests, tokens)

    def usage(self, tenant_id: str, day: str) -> tuple[int, int]:
        return self.shared.usage(tenant_id, day)

    def in_flight(self, tenant_id: str) -> int:
        return self.shared.in_flight(tenant_id) + self.local.in_flight(tenant_id)

    def rate_left(self, tenant_id: str, limits: Limits) -> float:
        return self.shared.rate_left(tenant_id, limits)

    def maintain(self, keep_days: frozenset[str] = frozenset()) -> int:
        return self.local.maintain(keep_days) + self.shared.maintain(keep_days)

    def leases_held(self) -> int:
        return self.local.leases_held() + self.shared.leases_held()

    def end_leases(self) -> list[Settlement]:
        return self.local.end_leases() + self.shared.end_leases()

    def drain_expired(self) -> list[Settlement]:
        drained = self.local.drain_expired()
        if not self.breaker.is_open:
            try:
                drained += self.shared.drain_expired()
            except StoreError as exc:
                # Redis keeps them (a list with a TTL): the next drain that reaches it.
                self.breaker.failure()
                log.debug("expired leases stay in Redis for now: %s", exc)
        return drained

    def ping(self) -> None:
        self.shared.ping()

    def close(self) -> None:
        self.shared.close()
