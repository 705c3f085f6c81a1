"""Counters in this process's memory (``memory://``), behind one lock.

Exact within one process. Daily counts are made durable by :class:`QuotaJournal`
(quota.py), which writes the changes since its last flush to the store; buckets and
concurrency slots are short-lived and start empty after a restart.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from extauthz.clock import SYSTEM_CLOCK, Clock
from extauthz.limits.base import (
    CONCURRENT,
    DAY,
    KEY_RATE,
    RATE,
    TOKENS_DAY,
    Ask,
    Counters,
    Release,
    Settlement,
    Verdict,
)
from extauthz.limits.bucket import take
from extauthz.policy import Limits, RateLimit


@dataclass(slots=True)
class _Lease:
    ask: Ask
    expires: float


def _settlement(ask: Ask, actual: int | None) -> Settlement:
    return Settlement(
        ask.tenant_id,
        ask.key_id,
        ask.day,
        ask.tokens,
        actual,
        ask.route,
        ask.method,
        ask.price,
        ask.started,
        ask.lease_id,
    )


@dataclass(slots=True)
class _Bucket:
    level: float
    updated: float
    capacity: float
    rate: float


class MemoryCounters(Counters):
    def __init__(self, clock: Clock = SYSTEM_CLOCK, lease_ttl: float = 60.0) -> None:
        self.url = "memory://"
        self.clock = clock
        self.lease_ttl = lease_ttl
        self._lock = threading.Lock()
        # Time here never goes back: a clock jumping backwards reads as standing still,
        # so it can neither refill a bucket nor extend or resurrect a lease.
        self._high = clock.monotonic()
        self._buckets: dict[str, _Bucket] = {}
        self._days: dict[tuple[str, str], list[int]] = {}  # (tenant, day) -> [requests, tokens]
        self._changes: dict[tuple[str, str], list[int]] = {}  # not yet written by the journal
        self._leases: dict[str, _Lease] = {}
        # Per tenant, its leases in the order they expire (one TTL for all).
        self._held: dict[str, OrderedDict[str, float]] = {}
        self._anonymous = itertools.count(1)
        self._expired: list[Settlement] = []

    def _now(self) -> float:
        self._high = max(self._high, self.clock.monotonic())
        return self._high

    # --------------------------------------------------------------- acquire

    def acquire(self, ask: Ask) -> Verdict:
        limits = ask.limits
        tenant_bucket = "t:" + ask.tenant_id
        with self._lock:
            now = self._now()
            held = self._expire(ask.tenant_id, now)
            counts = self._days.get((ask.tenant_id, ask.day)) or [0, 0]
            tenant_take = self._take(tenant_bucket, limits.rate_limit, now, ask.cost)
            if not tenant_take[0]:
                return self._refused(RATE, tenant_take[1], tenant_take[2], counts, held)
            # The tenant bucket's level as it stays if this request is refused below.
            untaken = tenant_take[2] + min(ask.cost, limits.rate_limit.burst)
            key_take = None
            if limits.key_rate_limit is not None:
                key_take = self._take("k:" + ask.key_id, limits.key_rate_limit, now, ask.cost)
                if not key_take[0]:
                    return self._refused(KEY_RATE, key_take[1], untaken, counts, held)
            by = None
            if counts[0] + ask.cost > limits.requests_per_day:
                by = DAY
            elif (
                limits.tokens_per_day is not None and counts[1] + ask.tokens > limits.tokens_per_day
            ):
                by = TOKENS_DAY
            elif len(held) >= limits.concurrent:
                by = CONCURRENT
            if by is not None:
                return self._refused(by, 0.0, untaken, counts, held)
            # Every limit passed: charge them all.
            self._store(tenant_bucket, limits.rate_limit, tenant_take)
            if key_take is not None and limits.key_rate_limit is not None:
                self._store("k:" + ask.key_id, limits.key_rate_limit, key_take)
            counts = self._count(ask.tenant_id, ask.day, ask.cost, ask.tokens)
            lease_id = ask.lease_id or f"-anonymous-{next(self._anonymous)}"
            while lease_id in self._leases:  # a reused request id never frees another's slot
                lease_id = f"{ask.lease_id}#{next(self._anonymous)}"
            expires = now + self.lease_ttl
            self._leases[lease_id] = _Lease(ask, expires)
            held[lease_id] = expires
            return Verdict(True, None, 0.0, counts[0], counts[1], tenant_take[2], len(held))

    @staticmethod
    def _refused(
        by: str, retry: float, level: float, counts: list[int], held: OrderedDict[str, float]
    ) -> Verdict:
        return Verdict(False, by, retry, counts[0], counts[1], level, len(held))

    def _take(
        self, bucket_id: str, rate: RateLimit, now: float, cost: int
    ) -> tuple[bool, float, float, float]:
        capacity, per_second = float(rate.burst), rate.requests_per_minute / 60.0
        state = self._buckets.get(bucket_id)
        level, updated = (capacity, now) if state is None else (state.level, state.updated)
        # A route costing more than the whole burst takes the whole burst: it can pass
        # when the bucket is full, instead of never.
        return take(capacity, per_second, (level, updated), now, min(cost, capacity))

    def _store(
        self, bucket_id: str, rate: RateLimit, taken: tuple[bool, float, float, float]
    ) -> None:
        state = self._buckets.get(bucket_id)
        if state is None:
            state = self._buckets[bucket_id] = _Bucket(0.0, 0.0, 0.0, 0.0)
        # Capacity and rate follow the policy of the moment (a reload may change them).
        state.level, state.updated = taken[2], taken[3]
        state.capacity, state.rate = float(rate.burst), rate.requests_per_minute / 60.0

    def _level(self, bucket_id: str, rate: RateLimit, now: float) -> float:
        return self._take(bucket_id, rate, now, 0)[2]

    def _count(self, tenant_id: str, day: str, requests: int, tokens: int) -> list[int]:
        key = (tenant_id, day)
        counts = self._days.get(key)
        if counts is None:
            counts = self._days[key] = [0, 0]
        counts[0] += requests
        counts[1] = max(0, counts[1] + tokens)
        change = self._changes.get(key)
        if change is None:
            change = self._changes[key] = [0, 0]
        change[0] += requests
        change[1] += tokens
        return counts

    def _expire(self, tenant_id: str, now: float) -> OrderedDict[str, float]:
        held = self._held.get(tenant_id)
        if held is None:
            held = self._held[tenant_id] = OrderedDict()
        while held:
            lease_id = next(iter(held))
            if held[lease_id] > now:
                break
            del held[lease_id]
            lease = self._leases.pop(lease_id, None)
            if lease is not None:
                # Not capped: each becomes a usage record at the next upkeep (every
                # flush_interval), and a lease held that memory already.
                self._expired.append(_settlement(lease.ask, None))
        return held

    # --------------------------------------------------------------- release

    def release(self, lease_id: str, actual_tokens: int | None = None) -> Settlement | None:
        with self._lock:
            return self._release(lease_id, actual_tokens)

    def release_many(self, releases: Sequence[Release]) -> list[Settlement | None]:
        """:meth:`release` for one access-log message, under one lock."""
        with self._lock:
            return [self._release(r.lease_id, r.actual_tokens) for r in releases]

    def _release(self, lease_id: str, actual_tokens: int | None) -> Settlement | None:
        """The caller holds the lock."""
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return None
        ask = lease.ask
        held = self._held.get(ask.tenant_id)
        if held is not None:
            held.pop(lease_id, None)
        if actual_tokens is not None and actual_tokens != ask.tokens:
            self._count(ask.tenant_id, ask.day, 0, actual_tokens - ask.tokens)
        return _settlement(ask, actual_tokens)

    def end_leases(self) -> list[Settlement]:
        with self._lock:
            ended = [_settlement(lease.ask, None) for lease in self._leases.values()]
            self._leases.clear()
            self._held.clear()
        return ended

    def leases_held(self) -> int:
        return len(self._leases)

    def drain_expired(self) -> list[Settlement]:
        with self._lock:
            expired, self._expired = self._expired, []
        return expired

    # --------------------------------------------------------------- reads and upkeep

    def add_usage(self, tenant_id: str, day: str, requests: int = 0, tokens: int = 0) -> None:
        with self._lock:
            self._count(tenant_id, day, requests, tokens)

    def load(self, tenant_id: str, day: str, requests: int, tokens: int) -> None:
        """Counts already durable (read back at start): counted, not journalled again."""
        with self._lock:
            counts = self._days.setdefault((tenant_id, day), [0, 0])
            counts[0] += requests
            counts[1] += tokens

    def drain_changes(self) -> dict[tuple[str, str], tuple[int, int]]:
        """The changes since the last drain, for the journal to write."""
        with self._lock:
            changes, self._changes = self._changes, {}
        return {k: (v[0], v[1]) for k, v in changes.items() if v != [0, 0]}

    def restore_changes(self, changes: dict[tuple[str, str], tuple[int, int]]) -> None:
        """Put back changes a failed write did not store, to be tried again."""
        with self._lock:
            for key, (requests, tokens) in changes.items():
                change = self._changes.setdefault(key, [0, 0])
                change[0] += requests
                change[1] += tokens

    def usage(self, tenant_id: str, day: str) -> tuple[int, int]:
        with self._lock:
            counts = self._days.get((tenant_id, day)) or [0, 0]
            return counts[0], counts[1]

    def in_flight(self, tenant_id: str) -> int:
        with self._lock:
            return len(self._expire(tenant_id, self._now()))

    def rate_left(self, tenant_id: str, limits: Limits) -> float:
        with self._lock:
            return self._level("t:" + tenant_id, limits.rate_limit, self._now())

    def maintain(self, keep_days: frozenset[str] = frozenset()) -> int:
        """Expire overdue leases, forget full buckets and (when ``keep_days`` is given)
        the counts of other days."""
        with self._lock:
            now = self._now()
            before = len(self._leases)
            for tenant_id in list(self._held):
                if not self._expire(tenant_id, now):
                    del self._held[tenant_id]
            for bucket_id, b in list(self._buckets.items()):
                if b.level + (now - b.updated) * b.rate >= b.capacity:
                    del self._buckets[bucket_id]  # full again: same as never used
            if keep_days:
                for key in [k for k in self._days if k[1] not in keep_days]:
                    del self._days[key]
            return before - len(self._leases)
