"""Daily quotas: which day a request counts on, how counts survive a restart, and the
seed's per-tenant quota API.

A quota day runs from 00:00 to 00:00 in the policy's time zone (UTC by default). Counts
live in the counters; with memory counters, :class:`QuotaJournal` writes the changes to
the store every ``quota_flush`` seconds and on a clean stop, and reads the day back at
start. A crash (SIGKILL, power loss) loses at most the last flush interval of counts.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, time, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

from extauthz.clock import SYSTEM_CLOCK, Clock
from extauthz.errors import StoreError
from extauthz.limits.base import Counters
from extauthz.limits.memory import MemoryCounters
from extauthz.model import TenantTier
from extauthz.policy import Policy
from extauthz.store.base import Store

log = logging.getLogger("extauthz.quota")


@lru_cache(maxsize=64)
def zone_info(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def quota_window(now: float, zone: str) -> tuple[str, float, float]:
    """The quota day holding Unix time ``now`` in ``zone``: (ISO date, start, end)."""
    tz = zone_info(zone)
    day = datetime.fromtimestamp(now, tz).date()
    start = datetime.combine(day, time(0), tz).timestamp()
    end = datetime.combine(day + timedelta(days=1), time(0), tz).timestamp()
    return day.isoformat(), start, end


class QuotaCalendar:
    """``quota_window`` cached for the current day (the hot path asks on every request)."""

    def __init__(self) -> None:
        self._cached: tuple[str, str, float, float] = ("", "", 0.0, -1.0)

    def day(self, now: float, zone: str) -> tuple[str, float]:
        """(day, seconds until it ends)."""
        cached_zone, day, start, end = self._cached
        if cached_zone != zone or not start <= now < end:
            day, start, end = quota_window(now, zone)
            self._cached = (zone, day, start, end)
        return day, end - now


class QuotaJournal:
    """Makes memory counters' daily counts durable in the store."""

    def __init__(self, store: Store, counters: MemoryCounters) -> None:
        self.store = store
        self.counters = counters
        self._lock = threading.Lock()  # one flush at a time (upkeep, and the final one)

    def load(self, day: str) -> int:
        """Count what the store holds for ``day``; returns the tenants loaded."""
        counts = self.store.quota_counts(day)
        for tenant_id, (requests, tokens) in counts.items():
            self.counters.load(tenant_id, day, requests, tokens)
        return len(counts)

    def flush(self) -> int:
        """Write the changes since the last flush; returns the rows written. On a store
        error the changes are kept for the next try, and the error is raised."""
        with self._lock:
            changes = self.counters.drain_changes()
            if not changes:
                return 0
            try:
                self.store.add_quota_counts(changes)
            except StoreError:
                self.counters.restore_changes(changes)
                raise
            return len(changes)


class TenantQuota:
    """The seed's quota API for one tenant, on the real counters and the live policy::

    quota = runtime.quota(tenant.id)
    if quota.is_within_quota:
        quota.record_usage(tokens=100)
    remaining = quota.get_remaining_quota()
    """

    def __init__(
        self,
        tenant_id: str,
        tier: TenantTier,
        counters: Counters,
        policy: Callable[[], Policy],
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.tenant_id = tenant_id
        self.tier = tier
        self.counters = counters
        self.policy = policy
        self.clock = clock

    def _today(self) -> tuple[str, float]:
        day, _, end = quota_window(self.clock.now(), self.policy().timezone)
        return day, end - self.clock.now()

    @property
    def is_within_quota(self) -> bool:
        return self.get_remaining_quota() > 0

    def record_usage(self, tokens: int = 0, requests: int = 1) -> None:
        if tokens < 0 or requests < 0:
            raise ValueError("usage cannot be negative")
        self.counters.add_usage(self.tenant_id, self._today()[0], requests, tokens)

    def get_remaining_quota(self) -> int:
        """Requests left today (never below 0)."""
        limits = self.policy().limits_for(self.tenant_id, self.tier)
        used, _ = self.counters.usage(self.tenant_id, self._today()[0])
        return max(0, limits.requests_per_day - used)

    def status(self) -> dict[str, object]:
        day, resets_in = self._today()
        limits = self.policy().limits_for(self.tenant_id, self.tier)
        requests, tokens = self.counters.usage(self.tenant_id, day)
        return {
            "tenant_id": self.tenant_id,
            "day": day,
            "requests_today": requests,
            "requests_per_day": limits.requests_per_day,
            "requests_remaining": max(0, limits.requests_per_day - requests),
            "tokens_today": tokens,
            "tokens_per_day": limits.tokens_per_day,
            "in_flight": self.counters.in_flight(self.tenant_id),
            "concurrent": limits.concurrent,
            "resets_in_seconds": round(resets_in),
        }
