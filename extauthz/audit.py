"""The audit trail: the seed's AuditLogger on a hash-chained table (auditchain.py).

Per-request events are queued and written in batches by a background thread
(records.py); with ``blocking`` ("no audit, no allow") each is written before the
answer, and a failed write refuses the request. Admin changes do not come through here:
the managers hand their events to the store, which commits them with the change.
Events never hold a key or an Authorization value: ids, reasons and facts only.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from extauthz.auditchain import Anchor, Problem
from extauthz.clock import SYSTEM_CLOCK, Clock
from extauthz.errors import ExtauthzError
from extauthz.model import AuditEvent
from extauthz.records import BatchWriter
from extauthz.spill import Spill
from extauthz.store.base import Store

if TYPE_CHECKING:
    from extauthz.limits.base import Settlement

log = logging.getLogger("extauthz.audit")

AUTH_SUCCESS = "AUTH_SUCCESS"
AUTH_FAILURE = "AUTH_FAILURE"
API_REQUEST = "API_REQUEST"
KEY_CREATED = "KEY_CREATED"
KEY_REVOKED = "KEY_REVOKED"
KEY_ROTATED = "KEY_ROTATED"
QUOTA_EXCEEDED = "QUOTA_EXCEEDED"
RATE_LIMITED = "RATE_LIMITED"
CONFIG_CHANGED = "CONFIG_CHANGED"
DATA_ACCESSED = "DATA_ACCESSED"
DATA_MODIFIED = "DATA_MODIFIED"
SECURITY_ALERT = "SECURITY_ALERT"
LIMITS_DEGRADED = "LIMITS_DEGRADED"  # shared counters lost ("started") or back ("ended")
ACTIONS = (
    AUTH_SUCCESS,
    AUTH_FAILURE,
    API_REQUEST,
    KEY_CREATED,
    KEY_REVOKED,
    KEY_ROTATED,
    QUOTA_EXCEEDED,
    RATE_LIMITED,
    CONFIG_CHANGED,
    DATA_ACCESSED,
    DATA_MODIFIED,
    SECURITY_ALERT,
    LIMITS_DEGRADED,
)


def sampled(share: float) -> bool:
    """Whether to audit this allowed request, for a policy share from 0 to 1."""
    return share >= 1.0 or (share > 0 and random.random() < share)  # noqa: S311 - sampling


def make_event(clock: Clock, action: str, outcome: str, **fields: object) -> AuditEvent:
    detail = fields.pop("detail", None)
    text = json.dumps(detail, sort_keys=True, separators=(",", ":")) if detail else ""
    return AuditEvent(action, outcome, clock.now(), detail=text, **fields)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Verification:
    checked: int
    problem: Problem | None

    @property
    def ok(self) -> bool:
        return self.problem is None


class AuditLogger:
    def __init__(
        self,
        store: Store,
        clock: Clock = SYSTEM_CLOCK,
        *,
        capacity: int = 50_000,
        interval: float = 1.0,
        blocking: bool = False,
        spill_dir: Path | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.blocking = blocking
        spill = (
            None
            if spill_dir is None
            else Spill(spill_dir, "audit", AuditEvent.__slots__, AuditEvent)
        )
        self.writer: BatchWriter[AuditEvent] = BatchWriter(
            "audit", store.append_audit, capacity=capacity, interval=interval, spill=spill
        )

    # writing
    def log(self, event: AuditEvent) -> bool:
        """Record ``event``. Queued (False if the queue is full: counted and logged), or
        with ``blocking`` written now (False if the store refused it)."""
        if not self.blocking:
            return self.writer.put(event)
        try:
            self.store.append_audit([event])
        except ExtauthzError as exc:
            log.error("audit write failed (blocking mode refuses the request): %s", exc)
            return False
        return True

    def event(self, action: str, outcome: str, **fields: object) -> bool:
        return self.log(make_event(self.clock, action, outcome, **fields))

    def log_incomplete(self, ended: Sequence[Settlement], share: float, version: str) -> None:
        """The audited share of allowed requests whose access-log entry never came (lease
        expired, or open at a stop): one API_REQUEST event each, outcome ``incomplete``,
        written like the product's own usage records (never dropped; records.py). With
        ``blocking`` their event was written at the check."""
        if not share or self.blocking:
            return
        events = [
            make_event(
                self.clock,
                API_REQUEST,
                "incomplete",
                tenant_id=s.tenant_id,
                key_id=s.key_id,
                request_id=s.request_id[:128],
                policy_version=version,
                detail={"route": s.route, "method": s.method, "check": "allowed", "status": 0},
            )
            for s in ended
            if sampled(share)
        ]
        if events:
            self.writer.write_now(events)

    def flush(self) -> int:
        return self.writer.flush()

    def start(self) -> None:
        self.writer.start()

    def close(self) -> None:
        self.writer.close()

    @property
    def dropped(self) -> int:
        return self.writer.dropped

    @property
    def pending(self) -> int:
        return self.writer.pending

    # the seed's names
    def log_auth(
        self,
        success: bool,
        tenant_id: str = "",
        key_id: str = "",
        ip_address: str = "",
        reason: str = "",
        **fields: object,
    ) -> bool:
        return self.event(
            AUTH_SUCCESS if success else AUTH_FAILURE,
            "success" if success else "denied",
            tenant_id=tenant_id,
            key_id=key_id,
            source=ip_address,
            reason=reason,
            **fields,
        )

    def log_api_request(
        self,
        tenant_id: str,
        endpoint: str,
        method: str,
        status_code: int,
        **fields: object,
    ) -> bool:
        detail = {"route": endpoint, "method": method, "status": status_code}
        extra = fields.pop("detail", None)
        if isinstance(extra, dict):
            detail.update(extra)
        return self.event(
            API_REQUEST,
            "success" if status_code < 400 else "failure",
            tenant_id=tenant_id,
            detail=detail,
            **fields,
        )

    def log_quota_exceeded(
        self, tenant_id: str, quota_type: str = "daily_requests", **fields: object
    ) -> bool:
        return self.event(
            QUOTA_EXCEEDED, "denied", tenant_id=tenant_id, reason=quota_type, **fields
        )

    def log_config_changed(
        self, outcome: str, policy_version: str, detail: dict[str, object]
    ) -> bool:
        return self.event(
            CONFIG_CHANGED, outcome, actor="system", policy_version=policy_version, detail=detail
        )

    # reading (what is queued is written first, so a reader sees its own events)
    def get_recent_events(self, limit: int = 100, tenant_id: str | None = None) -> list[AuditEvent]:
        """The newest ``limit`` events, newest first."""
        self.flush()
        return self.store.query_audit(tenant_id=tenant_id, limit=limit, newest_first=True)

    def get_events(
        self,
        tenant_id: str | None = None,
        since: float | None = None,
        until: float | None = None,
        action: str | None = None,
    ) -> list[AuditEvent]:
        """Events in order, filtered by tenant, time range [since, until) and action."""
        self.flush()
        return self.store.query_audit(tenant_id=tenant_id, since=since, until=until, action=action)

    def bounds(self) -> tuple[int, int]:
        """(first row kept, last row): the range ``verify`` can check. The last row is
        the signed head's (or, with no head, the highest stored); (1, 0) when empty."""
        checkpoint = self.store.audit_checkpoint()
        first = checkpoint.seq + 1 if checkpoint is not None else 1
        head = self.store.audit_head()
        if head is not None:
            return first, head.seq
        last = next(iter(self.store.query_audit(limit=1, newest_first=True)), None)
        return first, last.seq if last is not None else first - 1

    def verify(self, first: int | None = None, last: int | None = None) -> Verification:
        """Check the chain: all of it (from the genesis or the pruning checkpoint to the
        signed head), or rows first..last. A range reaching the end of the log also
        checks the signed head; one ending earlier checks only its rows."""
        chain = self.store.audit_chain
        if chain is None:
            return Verification(0, Problem(0, "no audit key: open the store through the Runtime"))
        head = self.store.audit_head()
        if last is not None and head is not None and last >= head.seq:
            last = None  # the whole tail: its end is checked against the signed head
        if first is None and last is None:
            start = self.store.audit_checkpoint()
            rows = self.store.audit_rows((start.seq + 1) if start else 1)
            return Verification(*chain.verify(rows, start, head))
        lo = max(1, first or 1)
        start = None
        if lo > 1:
            before = next(iter(self.store.audit_rows(lo - 1, lo - 1)), None)
            checkpoint = self.store.audit_checkpoint()
            if before is not None:
                start = Anchor(before.seq, bytes.fromhex(before.hash or "00" * 32), b"")
            elif checkpoint is not None and checkpoint.seq == lo - 1:
                start = checkpoint
            else:
                return Verification(0, Problem(lo - 1, "missing: cannot start the range here"))
        rows = self.store.audit_rows(lo, last)
        trusted = start is not None and not start.signature
        return Verification(
            *chain.verify(
                rows, start, head if last is None else None, trust_start=trusted, partial=True
            )
        )
