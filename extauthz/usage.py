"""Usage metering: one record per allowed request, for billing.

The sidecar writes a record when Envoy's access log reports the request finished
(status, latency, bytes, tokens in and out from the upstream's usage headers), or, if
that entry never comes, an ``incomplete`` one when the request's lease expires. A
request id is recorded once: a duplicated access-log entry never bills twice. Records
go through a bounded queue to a background writer (records.py).

``UsageTracker`` also carries the seed's API: ``record``, ``get_usage_today``,
``get_daily_breakdown`` and ``estimate_cost``.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from extauthz.clock import SYSTEM_CLOCK, Clock
from extauthz.limits.base import Settlement
from extauthz.limits.quota import quota_window, zone_info
from extauthz.model import Completion, TenantTier, UsageRecord
from extauthz.policy import Policy
from extauthz.records import BatchWriter
from extauthz.spill import Spill
from extauthz.store.base import Store


def cost_of(tokens: int, price_per_1k: float) -> float:
    return round(tokens * price_per_1k / 1000.0, 9)


def completed(settled: Settlement, done: Completion) -> UsageRecord:
    """The record of a request Envoy reported finished: what the check knew about it
    (its lease), plus what was measured. (Positional: one is built per request.)"""
    tokens_in = done.tokens_in or 0
    tokens_out = done.tokens_out or 0
    return UsageRecord(
        settled.request_id,
        settled.started,
        settled.day,
        settled.tenant_id,
        settled.key_id,
        settled.route,
        settled.method,
        done.status,
        round(done.latency_ms, 3),
        done.request_bytes,
        done.response_bytes,
        tokens_in,
        tokens_out,
        cost_of(tokens_in + tokens_out, settled.price),
    )


def incomplete(settled: Settlement) -> UsageRecord:
    """The record of an allowed request whose access-log entry never came: what the
    check knew, its declared tokens billed as reserved."""
    return UsageRecord(
        request_id=settled.request_id,
        ts=settled.started,
        day=settled.day,
        tenant_id=settled.tenant_id,
        key_id=settled.key_id,
        route=settled.route,
        method=settled.method,
        tokens_in=settled.reserved,
        cost=cost_of(settled.reserved, settled.price),
        incomplete=True,
    )


def totals(records: Iterable[UsageRecord]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "requests": 0,
        "tokens_in": 0,
        "tokens_out": 0,
        "cost": 0.0,
        "incomplete": 0,
    }
    for r in records:
        out["requests"] += 1
        out["tokens_in"] += r.tokens_in
        out["tokens_out"] += r.tokens_out
        out["cost"] += r.cost
        out["incomplete"] += int(r.incomplete)
    out["cost"] = round(out["cost"], 6)
    return out


class UsageTracker:
    def __init__(
        self,
        store: Store,
        clock: Clock = SYSTEM_CLOCK,
        policy: Callable[[], Policy] = Policy,
        *,
        capacity: int = 50_000,
        interval: float = 1.0,
        spill_dir: Path | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.policy = policy
        spill = (
            None
            if spill_dir is None
            else Spill(spill_dir, "usage", UsageRecord.__slots__, UsageRecord)
        )
        self.writer: BatchWriter[UsageRecord] = BatchWriter(
            "usage", store.add_usage, capacity=capacity, interval=interval, spill=spill
        )

    def add(self, record: UsageRecord) -> bool:
        return self.writer.put(record)

    def add_many(self, records: Sequence[UsageRecord]) -> bool:
        return self.writer.put_many(records)

    def add_now(self, records: Sequence[UsageRecord]) -> None:
        """Records the product makes itself (expired or ended leases): straight to the
        store in batches, never dropped (records.py)."""
        self.writer.write_now(records)

    def flush(self) -> int:
        return self.writer.flush()

    def start(self) -> None:
        self.writer.start()

    def close(self) -> None:
        self.writer.close()

    def _price(self, tenant_id: str) -> float:
        tenant = self.store.get_tenant(tenant_id)
        tier = tenant.tier if tenant is not None else TenantTier.FREE
        return self.policy().limits_for(tenant_id, tier).cost_per_1k_tokens

    # the seed's names
    def record(
        self,
        tenant_id: str,
        tokens_in: int = 0,
        tokens_out: int = 0,
        latency_ms: float = 0.0,
        **fields: Any,
    ) -> UsageRecord:
        """Record one request's usage now (queued; written within the flush interval)."""
        now = self.clock.now()
        price = fields.pop("price", None)
        price = self._price(tenant_id) if price is None else price
        record = UsageRecord(
            request_id=fields.pop("request_id", None) or "api-" + secrets.token_hex(12),
            ts=now,
            day=quota_window(now, self.policy().timezone)[0],
            tenant_id=tenant_id,
            key_id=fields.pop("key_id", ""),
            latency_ms=latency_ms,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            cost=cost_of(tokens_in + tokens_out, price),
            status=fields.pop("status", 200),
            **fields,
        )
        self.add(record)
        return record

    def records(
        self, tenant_id: str | None = None, since: float | None = None, until: float | None = None
    ) -> list[UsageRecord]:
        self.flush()  # a reader sees what was recorded just before
        return self.store.query_usage(tenant_id=tenant_id, since=since, until=until)

    def get_usage_today(self, tenant_id: str) -> int:
        """Tokens (in + out) the tenant used today, in the policy's time zone."""
        _, start, end = quota_window(self.clock.now(), self.policy().timezone)
        return sum(r.tokens_in + r.tokens_out for r in self.records(tenant_id, start, end))

    def get_daily_breakdown(self, tenant_id: str, days: int = 7) -> list[dict[str, Any]]:
        """One entry per day, oldest first, the last ``days`` days including today."""
        zone = self.policy().timezone
        today, _start, end = quota_window(self.clock.now(), zone)
        first = datetime.fromisoformat(today).replace(tzinfo=zone_info(zone)) - timedelta(days - 1)
        by_day: dict[str, list[UsageRecord]] = {}
        for r in self.records(tenant_id, first.timestamp(), end):
            by_day.setdefault(r.day, []).append(r)
        out = []
        for i in range(days):
            day = (first + timedelta(i)).date().isoformat()
            out.append({"day": day, **totals(by_day.get(day, []))})
        return out

    def estimate_cost(
        self,
        tenant_id: str,
        cost_per_1k_tokens: float | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> float:
        """What the tenant owes for [since, until) (default: this month so far): the
        prices recorded with each request, or ``cost_per_1k_tokens`` for all of them."""
        if since is None:
            since = month_start(self.clock.now(), self.policy().timezone)
        records = self.records(tenant_id, since, until)
        if cost_per_1k_tokens is None:
            return round(sum(r.cost for r in records), 6)
        tokens = sum(r.tokens_in + r.tokens_out for r in records)
        return round(cost_of(tokens, cost_per_1k_tokens), 6)


def month_start(now: float, zone: str) -> float:
    local = datetime.fromtimestamp(now, zone_info(zone))
    return local.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp()
