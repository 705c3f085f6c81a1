"""The audit trail, minimal form: events are queued by the hot path and written to the
store in batches by the upkeep thread (and on a clean stop).

The tamper-evident hash chain, `audit verify` and the remaining seed actions are the
next step (issue 5); this module already keeps their shape: one AuditEvent per fact,
numbered by the store, never holding a key.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import deque

from extauthz.clock import SYSTEM_CLOCK, Clock
from extauthz.model import AuditEvent
from extauthz.store.base import Store

log = logging.getLogger("extauthz.audit")

CONFIG_CHANGED = "CONFIG_CHANGED"
QUOTA_EXCEEDED = "QUOTA_EXCEEDED"
RATE_LIMITED = "RATE_LIMITED"


class AuditLogger:
    def __init__(self, store: Store, clock: Clock = SYSTEM_CLOCK, capacity: int = 10_000) -> None:
        self.store = store
        self.clock = clock
        self.capacity = capacity
        self.dropped = 0  # events refused because the queue was full (logged, counted)
        self._queue: deque[AuditEvent] = deque()
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()

    def log(self, event: AuditEvent) -> bool:
        """Queue ``event`` for the next flush; False (counted) if the queue is full."""
        with self._lock:
            if len(self._queue) >= self.capacity:
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 1000 == 0:
                    log.error("audit queue full: %d events dropped so far", self.dropped)
                return False
            self._queue.append(event)
            return True

    def event(self, action: str, outcome: str, **fields: object) -> bool:
        detail = fields.pop("detail", None)
        text = json.dumps(detail, sort_keys=True) if detail else ""
        return self.log(AuditEvent(action, outcome, self.clock.now(), detail=text, **fields))  # type: ignore[arg-type]

    def flush(self) -> int:
        """Write what is queued, in order; on a store error the events stay queued."""
        with self._flush_lock:
            with self._lock:
                batch = list(self._queue)
            if not batch:
                return 0
            self.store.append_audit(batch)  # StoreError: the batch stays queued
            with self._lock:
                for _ in batch:
                    self._queue.popleft()
            return len(batch)

    @property
    def pending(self) -> int:
        return len(self._queue)

    # the seed's names
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


class Throttle:
    """At most one event per key per ``interval`` seconds; the next one carries how many
    were held back. A tenant hammering a limit at 10k req/s must not write 10k audit
    rows a second, yet the trail must say it happened and how often."""

    def __init__(self, clock: Clock = SYSTEM_CLOCK, interval: float = 1.0) -> None:
        self.clock = clock
        self.interval = interval
        self._last: dict[tuple[str, ...], tuple[float, int]] = {}
        self._lock = threading.Lock()

    def admit(self, key: tuple[str, ...]) -> int | None:
        """None to hold this event back; else the number held back before it."""
        now = self.clock.monotonic()
        with self._lock:
            last, held = self._last.get(key, (-1e18, 0))
            if now - last < self.interval:
                self._last[key] = (last, held + 1)
                return None
            if len(self._last) > 100_000:
                self._last.clear()  # bounded: at worst a few extra events
            self._last[key] = (now, 0)
            return held
