"""The memory store's records (quota counts, the audit chain, usage), mirroring
sql_records.py so the contract suite holds for all of them."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence

from extauthz.auditchain import Anchor, AuditChain
from extauthz.errors import StoreError
from extauthz.model import AuditEvent, UsageRecord
from extauthz.store.sql_records import chain_rows


class MemoryRecords:
    audit_chain: AuditChain | None = None
    _lock: threading.Lock

    def _init_records(self) -> None:
        self._quota: dict[tuple[str, str], tuple[int, int]] = {}
        self._audit: list[AuditEvent] = []
        self._anchors: dict[str, Anchor] = {}
        self._usage: dict[str, UsageRecord] = {}

    def add_quota_counts(self, changes: Mapping[tuple[str, str], tuple[int, int]]) -> None:
        with self._lock:
            for key, (requests, tokens) in changes.items():
                old = self._quota.get(key, (0, 0))
                self._quota[key] = (old[0] + requests, max(0, old[1] + tokens))

    def quota_counts(self, day: str) -> dict[str, tuple[int, int]]:
        with self._lock:
            return {t: v for (t, d), v in self._quota.items() if d == day}

    def append_audit(self, events: Sequence[AuditEvent]) -> list[AuditEvent]:
        with self._lock:
            return self._append_audit_locked(events)

    def _append_audit_locked(self, events: Sequence[AuditEvent]) -> list[AuditEvent]:
        if not events:
            return []
        head = self._anchors.get("head")
        if self.audit_chain is None or head is None:
            if self._audit:
                last = self._audit[-1]
                head = Anchor(last.seq, bytes.fromhex(last.hash) if last.hash else bytes(32), b"")
            else:
                head = self._anchors.get("checkpoint")
        stored, prev = chain_rows(self.audit_chain, head, events)
        self._audit.extend(stored)
        if self.audit_chain is not None:
            self._anchors["head"] = self.audit_chain.anchor("head", stored[-1].seq, prev)
        return stored

    def query_audit(
        self,
        *,
        tenant_id: str | None = None,
        action: str | None = None,
        key_id: str | None = None,
        since: float | None = None,
        until: float | None = None,
        after_seq: int = 0,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> list[AuditEvent]:
        with self._lock:
            found = [
                e
                for e in self._audit
                if e.seq > after_seq
                and (tenant_id is None or e.tenant_id == tenant_id)
                and (action is None or e.action == action)
                and (key_id is None or e.key_id == key_id)
                and (since is None or e.ts >= since)
                and (until is None or e.ts < until)
            ]
        found.sort(key=lambda e: e.seq, reverse=newest_first)
        return found if limit is None else found[:limit]

    def audit_rows(self, first: int = 1, last: int | None = None) -> Iterator[AuditEvent]:
        with self._lock:
            rows = sorted(self._audit, key=lambda e: e.seq)
        upper = last if last is not None else 2**62
        return iter([e for e in rows if first <= e.seq <= upper])

    def audit_head(self) -> Anchor | None:
        return self._anchors.get("head")

    def audit_checkpoint(self) -> Anchor | None:
        return self._anchors.get("checkpoint")

    def prune_audit(self, before: float) -> int:
        chain = self.audit_chain
        if chain is None:
            raise StoreError("pruning needs the audit chain's key")
        with self._lock:
            cut = 0
            while cut < len(self._audit) and self._audit[cut].ts < before:
                cut += 1
            if cut == 0:
                return 0
            last = self._audit[cut - 1]
            del self._audit[:cut]
            self._anchors["checkpoint"] = chain.anchor(
                "checkpoint", last.seq, bytes.fromhex(last.hash)
            )
            return cut

    def add_usage(self, records: Sequence[UsageRecord]) -> int:
        written = 0
        with self._lock:
            for record in records:
                old = self._usage.get(record.request_id)
                if old is None or (old.incomplete and not record.incomplete):
                    self._usage[record.request_id] = record
                    written += 1
        return written

    def query_usage(
        self,
        *,
        tenant_id: str | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> list[UsageRecord]:
        with self._lock:
            found = [
                r
                for r in self._usage.values()
                if (tenant_id is None or r.tenant_id == tenant_id)
                and (since is None or r.ts >= since)
                and (until is None or r.ts < until)
            ]
        return sorted(found, key=lambda r: (r.ts, r.request_id))

    def prune_usage(self, before: float) -> int:
        with self._lock:
            old = [k for k, r in self._usage.items() if r.ts < before]
            for k in old:
                del self._usage[k]
            return len(old)
