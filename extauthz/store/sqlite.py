"""The embedded default store: one SQLite file in WAL mode.

One connection guarded by a lock: SQLite serialises writers anyway, and WAL lets the
CLI in another process write while the server reads.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from extauthz.errors import ConflictError, StoreError
from extauthz.store.sql import SQLStore

# Each entry migrates from version i to i+1. Never edit a released entry; append.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
    INSERT INTO meta (name, value) VALUES ('revision', 0);
    CREATE TABLE tenants (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        tier TEXT NOT NULL,
        status TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE api_keys (
        key_id TEXT PRIMARY KEY,
        tenant_id TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        key_hash BLOB NOT NULL UNIQUE,
        pepper_version INTEGER NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL,
        revoked_at REAL,
        last_used_at REAL,
        rotated_to TEXT
    );
    CREATE INDEX api_keys_tenant ON api_keys (tenant_id);
    """,
    """
    CREATE TABLE meta_blobs (name TEXT PRIMARY KEY, value BLOB NOT NULL);
    """,
    """
    CREATE TABLE quota_counts (
        tenant_id TEXT NOT NULL,
        day TEXT NOT NULL,
        requests INTEGER NOT NULL,
        tokens INTEGER NOT NULL,
        PRIMARY KEY (tenant_id, day)
    );
    CREATE TABLE audit_events (
        seq INTEGER PRIMARY KEY,
        ts REAL NOT NULL,
        action TEXT NOT NULL,
        outcome TEXT NOT NULL,
        tenant_id TEXT NOT NULL,
        key_id TEXT NOT NULL,
        actor TEXT NOT NULL,
        reason TEXT NOT NULL,
        request_id TEXT NOT NULL,
        source TEXT NOT NULL,
        policy_version TEXT NOT NULL,
        detail TEXT NOT NULL
    );
    CREATE INDEX audit_events_action ON audit_events (action, seq);
    """,
    """
    ALTER TABLE audit_events ADD COLUMN trace_id TEXT NOT NULL DEFAULT '';
    ALTER TABLE audit_events ADD COLUMN hash TEXT NOT NULL DEFAULT '';
    CREATE INDEX audit_events_tenant ON audit_events (tenant_id, seq);
    CREATE TABLE audit_anchors (
        kind TEXT PRIMARY KEY,
        seq INTEGER NOT NULL,
        hash BLOB NOT NULL,
        signature BLOB NOT NULL
    );
    CREATE TABLE usage_records (
        request_id TEXT PRIMARY KEY,
        ts REAL NOT NULL,
        day TEXT NOT NULL,
        tenant_id TEXT NOT NULL,
        key_id TEXT NOT NULL,
        route TEXT NOT NULL,
        method TEXT NOT NULL,
        status INTEGER NOT NULL,
        latency_ms REAL NOT NULL,
        request_bytes INTEGER NOT NULL,
        response_bytes INTEGER NOT NULL,
        tokens_in INTEGER NOT NULL,
        tokens_out INTEGER NOT NULL,
        cost REAL NOT NULL,
        incomplete INTEGER NOT NULL
    );
    CREATE INDEX usage_tenant_ts ON usage_records (tenant_id, ts);
    CREATE INDEX usage_ts ON usage_records (ts);
    """,
)


class SQLiteStore(SQLStore):
    def __init__(self, path: Path, url: str = "", busy_timeout_ms: int = 2000) -> None:
        self.url = url or f"sqlite:///{path}"
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False, timeout=busy_timeout_ms / 1000
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA synchronous=NORMAL")
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open SQLite database {path}: {exc}") from exc
        self._migrate()

    @contextmanager
    def _tx(self, write: bool = False) -> Iterator[sqlite3.Cursor]:
        with self._lock:
            cur = self._db.cursor()
            try:
                if write:
                    cur.execute("BEGIN IMMEDIATE")
                yield cur
                if write:
                    cur.execute("COMMIT")
            except sqlite3.IntegrityError as exc:
                self._rollback(write)
                raise ConflictError(f"conflicts with existing data: {exc}") from exc
            except sqlite3.Error as exc:
                self._rollback(write)
                raise StoreError(f"SQLite error: {exc}") from exc
            except BaseException:
                self._rollback(write)
                raise
            finally:
                cur.close()

    def _rollback(self, write: bool) -> None:
        if write and self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def _migrate(self) -> None:
        with self._tx(write=True) as cur:
            self._run_migrations(cur, MIGRATIONS)

    def close(self) -> None:
        with self._lock:
            self._db.close()
