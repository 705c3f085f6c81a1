"""SQLite: the append-mostly records (daily quota counts, audit events), kept apart from
the tenant and key tables in sqlite.py to keep each module small."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

from extauthz.model import AuditEvent

_AUDIT_COLS = (
    "ts, action, outcome, tenant_id, key_id, actor, reason, request_id, source, "
    "policy_version, detail"
)


class SQLiteRecords:
    def _tx(self, write: bool = False) -> AbstractContextManager[sqlite3.Cursor]:
        raise NotImplementedError  # provided by SQLiteStore

    def add_quota_counts(self, changes: Mapping[tuple[str, str], tuple[int, int]]) -> None:
        if not changes:
            return
        with self._tx(write=True) as cur:
            cur.executemany(
                "INSERT INTO quota_counts (tenant_id, day, requests, tokens) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (tenant_id, day) DO UPDATE SET "
                "requests = requests + excluded.requests, "
                "tokens = MAX(0, tokens + excluded.tokens)",
                [(t, d, r, k) for (t, d), (r, k) in changes.items()],
            )

    def quota_counts(self, day: str) -> dict[str, tuple[int, int]]:
        with self._tx() as cur:
            rows = cur.execute(
                "SELECT tenant_id, requests, tokens FROM quota_counts WHERE day = ?", (day,)
            ).fetchall()
        return {row[0]: (int(row[1]), int(row[2])) for row in rows}

    def append_audit(self, events: Sequence[AuditEvent]) -> None:
        if not events:
            return
        with self._tx(write=True) as cur:
            cur.executemany(
                f"INSERT INTO audit_events ({_AUDIT_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)",  # noqa: S608 - constant columns
                [_audit_row(e) for e in events],
            )

    def list_audit(self, limit: int = 100, action: str | None = None) -> list[AuditEvent]:
        where, args = ("WHERE action = ?", [action]) if action else ("", [])
        with self._tx() as cur:
            rows = cur.execute(
                f"SELECT seq, {_AUDIT_COLS} FROM audit_events {where} "  # noqa: S608 - constants
                "ORDER BY seq DESC LIMIT ?",
                [*args, limit],
            ).fetchall()
        return [_audit_event(row) for row in reversed(rows)]


def _audit_row(e: AuditEvent) -> tuple[Any, ...]:
    return (
        e.ts,
        e.action,
        e.outcome,
        e.tenant_id,
        e.key_id,
        e.actor,
        e.reason,
        e.request_id,
        e.source,
        e.policy_version,
        e.detail,
    )


def _audit_event(row: Iterator[Any] | Sequence[Any]) -> AuditEvent:
    seq, ts, action, outcome, tenant, key, actor, reason, request, source, version, detail = row
    return AuditEvent(
        action, outcome, ts, tenant, key, actor, reason, request, source, version, detail, seq
    )
