"""The append-mostly records (daily quota counts, the audit chain, usage) in SQL that
SQLite and PostgreSQL both run; kept apart from the tenant and key tables (sql.py) to
keep each module small. Placeholders are ``?``: the PostgreSQL cursor translates them."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from operator import attrgetter
from typing import Any, Protocol

from extauthz.auditchain import GENESIS, Anchor, AuditChain
from extauthz.errors import StoreError
from extauthz.model import AuditEvent, UsageRecord

# Columns named and ordered as AuditEvent's fields, so a row is AuditEvent(*row); its
# values in that order, and the fields before ``seq`` (one C call each).
_AUDIT_COLS = ", ".join(AuditEvent.__slots__)
_AUDIT_VALUES = attrgetter(*AuditEvent.__slots__)
_UNNUMBERED = attrgetter(*AuditEvent.__slots__[: AuditEvent.__slots__.index("seq")])
_USAGE_COLS = ", ".join(UsageRecord.__slots__)


class Cursor(Protocol):
    """The part of a DB-API cursor both stores use."""

    @property
    def rowcount(self) -> int: ...

    def execute(self, sql: str, args: Sequence[Any] = ..., /) -> Any: ...

    def executemany(self, sql: str, args: Sequence[Sequence[Any]], /) -> Any: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class SQLRecords:
    audit_chain: AuditChain | None = None

    def _tx(self, write: bool = False) -> AbstractContextManager[Cursor]:
        raise NotImplementedError  # provided by the store

    def _lock_chain(self, cur: Cursor) -> None:
        """Inside a write transaction: hold the chain's head until commit, so appends
        from several processes (replicas) number and chain one after another."""

    # ------------------------------------------------------------ quota counts

    def add_quota_counts(self, changes: Mapping[tuple[str, str], tuple[int, int]]) -> None:
        if not changes:
            return
        with self._tx(write=True) as cur:
            cur.executemany(
                "INSERT INTO quota_counts (tenant_id, day, requests, tokens) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (tenant_id, day) DO UPDATE SET "
                "requests = quota_counts.requests + excluded.requests, "
                "tokens = CASE WHEN quota_counts.tokens + excluded.tokens < 0 THEN 0 "
                "ELSE quota_counts.tokens + excluded.tokens END",
                [(t, d, r, k) for (t, d), (r, k) in changes.items()],
            )

    def quota_counts(self, day: str) -> dict[str, tuple[int, int]]:
        with self._tx() as cur:
            rows = cur.execute(
                "SELECT tenant_id, requests, tokens FROM quota_counts WHERE day = ?", (day,)
            ).fetchall()
        return {row[0]: (int(row[1]), int(row[2])) for row in rows}

    # ------------------------------------------------------------ audit chain

    def append_audit(self, events: Sequence[AuditEvent]) -> list[AuditEvent]:
        if not events:
            return []
        with self._tx(write=True) as cur:
            return self._append_audit(cur, events)

    def _append_audit(self, cur: Cursor, events: Sequence[AuditEvent]) -> list[AuditEvent]:
        """Inside the caller's write transaction: chain on the head, insert, move the head."""
        if not events:
            return []
        self._lock_chain(cur)
        chain = self.audit_chain
        # Chain on the signed head, not on the last row: rows cut from the tail then
        # show as a gap even after later appends.
        head = _anchor(cur, "head")
        if chain is None or head is None:
            last = cur.execute(
                "SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1"
            ).fetchone()
            checkpoint = _anchor(cur, "checkpoint")
            if last is not None:
                head = Anchor(int(last[0]), _unhex(last[1]), b"")
            elif checkpoint is not None:
                head = checkpoint
        stored, prev = chain_rows(chain, head, events)
        cur.executemany(
            f"INSERT INTO audit_events ({_AUDIT_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",  # noqa: S608 - constant columns
            [_AUDIT_VALUES(e) for e in stored],
        )
        if chain is not None:
            _put_anchor(cur, "head", chain.anchor("head", stored[-1].seq, prev))
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
        clause, args = _where(
            [
                ("seq > ?", after_seq),
                ("tenant_id = ?", tenant_id),
                ("action = ?", action),
                ("key_id = ?", key_id),
                ("ts >= ?", since),
                ("ts < ?", until),
            ]
        )
        order = "DESC" if newest_first else "ASC"
        sql = f"SELECT {_AUDIT_COLS} FROM audit_events WHERE {clause} ORDER BY seq {order}"  # noqa: S608 - constant fragments, values bound
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        with self._tx() as cur:
            rows = cur.execute(sql, args).fetchall()
        return [_audit_event(r) for r in rows]

    def audit_rows(self, first: int = 1, last: int | None = None) -> Iterator[AuditEvent]:
        upper = last if last is not None else 2**62
        after = first - 1
        while True:
            with self._tx() as cur:
                rows = cur.execute(
                    f"SELECT {_AUDIT_COLS} FROM audit_events WHERE seq > ? AND seq <= ? "  # noqa: S608 - constant columns
                    "ORDER BY seq LIMIT 5000",
                    (after, upper),
                ).fetchall()
            if not rows:
                return
            for row in rows:
                yield _audit_event(row)
            after = int(rows[-1][11])

    def audit_head(self) -> Anchor | None:
        with self._tx() as cur:
            return _anchor(cur, "head")

    def audit_checkpoint(self) -> Anchor | None:
        with self._tx() as cur:
            return _anchor(cur, "checkpoint")

    def prune_audit(self, before: float) -> int:
        chain = self.audit_chain
        if chain is None:
            raise StoreError("the audit chain has no key: open the store through the Runtime")
        with self._tx(write=True) as cur:
            self._lock_chain(cur)
            # Only a prefix can go: stop at the first row that must stay.
            keep = cur.execute("SELECT MIN(seq) FROM audit_events WHERE ts >= ?", (before,))
            first_kept = keep.fetchone()[0]
            bound = "seq < ?" if first_kept is not None else "1 = 1"
            args = (first_kept,) if first_kept is not None else ()
            last = cur.execute(
                f"SELECT seq, hash FROM audit_events WHERE {bound} ORDER BY seq DESC LIMIT 1",  # noqa: S608 - constant fragments
                args,
            ).fetchone()
            if last is None:
                return 0
            cur.execute("DELETE FROM audit_events WHERE seq <= ?", (last[0],))
            deleted = cur.rowcount
            _put_anchor(
                cur, "checkpoint", chain.anchor("checkpoint", last[0], bytes.fromhex(last[1]))
            )
        return int(deleted)

    # ------------------------------------------------------------ usage

    def add_usage(self, records: Sequence[UsageRecord]) -> int:
        if not records:
            return 0
        with self._tx(write=True) as cur:
            cur.executemany(
                f"INSERT INTO usage_records ({_USAGE_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) "  # noqa: S608 - constant columns
                "ON CONFLICT (request_id) DO UPDATE SET "
                "status = excluded.status, latency_ms = excluded.latency_ms, "
                "request_bytes = excluded.request_bytes, response_bytes = excluded.response_bytes, "
                "tokens_in = excluded.tokens_in, tokens_out = excluded.tokens_out, "
                "cost = excluded.cost, incomplete = 0 "
                # Only a complete record may replace an incomplete one: duplicates are
                # dropped, and nothing is billed twice.
                "WHERE usage_records.incomplete = 1 AND excluded.incomplete = 0",
                [_usage_values(r) for r in records],
            )
            return int(cur.rowcount)

    def query_usage(
        self,
        *,
        tenant_id: str | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> list[UsageRecord]:
        clause, args = _where([("tenant_id = ?", tenant_id), ("ts >= ?", since), ("ts < ?", until)])
        with self._tx() as cur:
            rows = cur.execute(
                f"SELECT {_USAGE_COLS} FROM usage_records WHERE {clause} "  # noqa: S608 - constant fragments, values bound
                "ORDER BY ts, request_id",
                args,
            ).fetchall()
        return [_usage(r) for r in rows]

    def prune_usage(self, before: float) -> int:
        with self._tx(write=True) as cur:
            cur.execute("DELETE FROM usage_records WHERE ts < ?", (before,))
            return int(cur.rowcount)


def chain_rows(
    chain: AuditChain | None, head: Anchor | None, events: Sequence[AuditEvent]
) -> tuple[list[AuditEvent], bytes]:
    """Number ``events`` after ``head`` and hash each onto the one before; without a
    chain key the rows get no hash (and `audit verify` will say so)."""
    seq, prev = (0, GENESIS) if head is None else (head.seq, head.hash)
    stored = []
    for e in events:
        seq += 1
        digest = ""
        if chain is not None:
            prev = chain.link(prev, e, seq)
            digest = prev.hex()
        # Built positionally: dataclasses.replace() cost ~6 us a row here.
        row = (*_UNNUMBERED(e), seq, e.trace_id, digest)
        stored.append(AuditEvent(*row))
    return stored, prev


def _unhex(text: str) -> bytes:
    try:
        return bytes.fromhex(text) if text else GENESIS
    except ValueError:
        return GENESIS


def _anchor(cur: Cursor, kind: str) -> Anchor | None:
    row = cur.execute(
        "SELECT seq, hash, signature FROM audit_anchors WHERE kind = ?", (kind,)
    ).fetchone()
    return None if row is None else Anchor(int(row[0]), bytes(row[1]), bytes(row[2]))


def _put_anchor(cur: Cursor, kind: str, anchor: Anchor) -> None:
    cur.execute(
        "INSERT INTO audit_anchors (kind, seq, hash, signature) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (kind) DO UPDATE SET seq = excluded.seq, hash = excluded.hash, "
        "signature = excluded.signature",
        (kind, anchor.seq, anchor.hash, anchor.signature),
    )


def _audit_event(row: Sequence[Any]) -> AuditEvent:
    return AuditEvent(*row)


_USAGE_FIELDS = attrgetter(*UsageRecord.__slots__[:-1])


def _usage_values(r: UsageRecord) -> tuple[Any, ...]:
    # `incomplete` as 0/1: an INTEGER column in both databases. (One attrgetter call:
    # this runs once per request, on the usage writer's thread.)
    return (*_USAGE_FIELDS(r), int(r.incomplete))


def _usage(row: Sequence[Any]) -> UsageRecord:
    values = list(row)
    values[-1] = bool(values[-1])
    return UsageRecord(*values)


def _where(conditions: list[tuple[str, object]]) -> tuple[str, list[object]]:
    """A WHERE clause of the conditions whose value is given (not None), and its
    arguments; conditions are constant SQL fragments with one placeholder each."""
    given = [(sql, value) for sql, value in conditions if value is not None]
    return " AND ".join(sql for sql, _ in given) or "1 = 1", [value for _, value in given]
