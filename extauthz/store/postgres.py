"""PostgreSQL (``postgresql://``): the store several replicas share.

The SQL is sql.py's, which SQLite runs too; this module adds a connection pool, error
mapping, its own migrations, and two things only a shared database needs:

- the audit chain's head is held by a transaction-scoped advisory lock while rows are
  numbered and chained, so replicas appending at once still make one gap-free chain;
- a change to tenants or keys sends ``NOTIFY extauthz_changes`` at commit, and every
  server LISTENs, so a revocation reaches all replicas in milliseconds (the revision
  poll stays as the bound when a notification is lost).

A key lookup on the hot path waits at most ``timeout`` seconds, then fails with
StoreError (the caller answers 503): a stalled database never holds a decision longer.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import psycopg
import psycopg_pool
from psycopg.conninfo import conninfo_to_dict

from extauthz import suspend
from extauthz.errors import ConfigError, ConflictError, StoreError, redact
from extauthz.model import APIKey, Tenant
from extauthz.store.sql import LOOKUP, SQLStore

log = logging.getLogger("extauthz.store")


class _FirstLine(logging.Filter):
    """The pool's warnings while the database is down, in one line each (libpq's own
    text runs over several: the reason, then a hint)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "\n" in text:
            record.msg, record.args = text.splitlines()[0], None
        return True


logging.getLogger("psycopg.pool").addFilter(_FirstLine())

CHANNEL = "extauthz_changes"
# Arbitrary constants naming our advisory locks (64-bit, database-wide).
_CHAIN_LOCK = 0x65787461_75646974  # "extaudit"
_MIGRATE_LOCK = 0x65787461_6D696772  # "extamigr"

# PostgreSQL numbers its schema on its own: version 1 is SQLite's version 4 at once.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE meta (name TEXT PRIMARY KEY, value BIGINT NOT NULL);
    INSERT INTO meta (name, value) VALUES ('revision', 0);
    CREATE TABLE meta_blobs (name TEXT PRIMARY KEY, value BYTEA NOT NULL);
    CREATE TABLE tenants (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        tier TEXT NOT NULL,
        status TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE api_keys (
        key_id TEXT PRIMARY KEY,
        tenant_id TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        key_hash BYTEA NOT NULL UNIQUE,
        pepper_version INTEGER NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION,
        revoked_at DOUBLE PRECISION,
        last_used_at DOUBLE PRECISION,
        rotated_to TEXT
    );
    CREATE INDEX api_keys_tenant ON api_keys (tenant_id);
    CREATE TABLE quota_counts (
        tenant_id TEXT NOT NULL,
        day TEXT NOT NULL,
        requests BIGINT NOT NULL,
        tokens BIGINT NOT NULL,
        PRIMARY KEY (tenant_id, day)
    );
    CREATE TABLE audit_events (
        seq BIGINT PRIMARY KEY,
        ts DOUBLE PRECISION NOT NULL,
        action TEXT NOT NULL,
        outcome TEXT NOT NULL,
        tenant_id TEXT NOT NULL,
        key_id TEXT NOT NULL,
        actor TEXT NOT NULL,
        reason TEXT NOT NULL,
        request_id TEXT NOT NULL,
        source TEXT NOT NULL,
        policy_version TEXT NOT NULL,
        detail TEXT NOT NULL,
        trace_id TEXT NOT NULL DEFAULT '',
        hash TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX audit_events_action ON audit_events (action, seq);
    CREATE INDEX audit_events_tenant ON audit_events (tenant_id, seq);
    CREATE TABLE audit_anchors (
        kind TEXT PRIMARY KEY,
        seq BIGINT NOT NULL,
        hash BYTEA NOT NULL,
        signature BYTEA NOT NULL
    );
    CREATE TABLE usage_records (
        request_id TEXT PRIMARY KEY,
        ts DOUBLE PRECISION NOT NULL,
        day TEXT NOT NULL,
        tenant_id TEXT NOT NULL,
        key_id TEXT NOT NULL,
        route TEXT NOT NULL,
        method TEXT NOT NULL,
        status INTEGER NOT NULL,
        latency_ms DOUBLE PRECISION NOT NULL,
        request_bytes BIGINT NOT NULL,
        response_bytes BIGINT NOT NULL,
        tokens_in BIGINT NOT NULL,
        tokens_out BIGINT NOT NULL,
        cost DOUBLE PRECISION NOT NULL,
        incomplete INTEGER NOT NULL
    );
    CREATE INDEX usage_tenant_ts ON usage_records (tenant_id, ts);
    CREATE INDEX usage_ts ON usage_records (ts);
    """,
)


@lru_cache(maxsize=512)
def _dialect(sql: str) -> str:
    """sql.py's ``?`` placeholders as psycopg's ``%s`` (our SQL has no literal % or ?)."""
    return sql.replace("%", "%%").replace("?", "%s")


class _Cursor:
    """A psycopg cursor that takes the shared SQL's ``?`` placeholders."""

    def __init__(self, cur: psycopg.Cursor[Any]) -> None:
        self._cur = cur

    @property
    def rowcount(self) -> int:
        return self._cur.rowcount

    def execute(self, sql: str, args: Sequence[Any] = (), /) -> _Cursor:
        self._cur.execute(_dialect(sql), args or None)
        return self

    def executemany(self, sql: str, args: Sequence[Sequence[Any]], /) -> _Cursor:
        self._cur.executemany(_dialect(sql), args)
        return self

    def fetchone(self) -> Any:
        return self._cur.fetchone()

    def fetchall(self) -> list[Any]:
        return self._cur.fetchall()


class PostgresStore(SQLStore):
    remote = True
    _lookup_sql = LOOKUP.format(h="?::bytea")

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 0.25,
        statement_timeout: float = 5.0,
        pool_size: int = 8,
        open_timeout: float = 5.0,
    ) -> None:
        self.url = url
        self.timeout = timeout
        # postgresql+psycopg:// (SQLAlchemy's spelling) works too.
        self._conninfo = re.sub(r"^postgres(ql)?(\+psycopg)?://", "postgresql://", url)
        try:
            given = conninfo_to_dict(self._conninfo)
        except psycopg.Error as exc:
            raise ConfigError(f"bad PostgreSQL URL {redact(url)}: {_message(exc)}") from None
        # Added to any options the URL has (a search_path, say), not in their place.
        options = (
            f"{given.get('options') or ''} -c statement_timeout={int(statement_timeout * 1000)}"
        )
        self._options: dict[str, Any] = {
            "connect_timeout": 2,  # libpq's minimum
            "options": options.strip(),
            "application_name": given.get("application_name") or "extauthz",
        }
        # One direct attempt first: a database nobody answers is a one-line error within
        # libpq's connect_timeout, not the pool's retries with backoff.
        try:
            psycopg.connect(self._conninfo, **self._options).close()
        except psycopg.Error as exc:
            raise StoreError(
                f"cannot connect to PostgreSQL at {redact(url)}: {_first_line(exc)}"
            ) from None
        self._pool = psycopg_pool.ConnectionPool(
            self._conninfo,
            min_size=1,
            max_size=pool_size,
            kwargs=self._options,
            timeout=max(timeout, 2.0),
            name="extauthz",
            open=False,
        )
        try:
            self._pool.open(wait=True, timeout=open_timeout)
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            self._pool.close()  # its workers would keep trying in the background
            raise StoreError(
                f"cannot connect to PostgreSQL at {redact(url)}: {self._why_not(exc)}"
            ) from None
        self._leading: dict[str, psycopg.Connection[Any]] = {}
        self._leading_lock = threading.Lock()
        # Lookups run here so the hot path can stop waiting on a stalled database.
        self._lookups = concurrent.futures.ThreadPoolExecutor(
            max_workers=pool_size, thread_name_prefix="extauthz-pg"
        )
        try:
            self._migrate()
        except BaseException:
            self.close()
            raise

    def _why_not(self, exc: Exception) -> str:
        """The driver's own reason (the pool only says it timed out)."""
        try:
            psycopg.connect(self._conninfo, **self._options).close()
        except psycopg.Error as direct:
            return _first_line(direct)
        return str(exc)

    @contextmanager
    def _tx(self, write: bool = False, timeout: float | None = None) -> Iterator[_Cursor]:
        try:
            with self._pool.connection(timeout=timeout) as conn, conn.cursor() as cur:
                # Leaving the block commits (or rolls back on an exception).
                yield _Cursor(cur)
        except psycopg.IntegrityError as exc:
            raise ConflictError(f"conflicts with existing data: {_message(exc)}") from None
        except psycopg.Error as exc:
            raise StoreError(f"PostgreSQL error: {_message(exc)}") from None
        except psycopg_pool.PoolTimeout:
            raise StoreError(
                f"no PostgreSQL connection within {timeout or self._pool.timeout:g} s "
                f"({redact(self.url)})"
            ) from None

    def _lock_chain(self, cur: Any) -> None:
        cur.execute("SELECT pg_advisory_xact_lock(?)", (_CHAIN_LOCK,))

    def _announce(self, cur: Any) -> None:
        cur.execute(f"NOTIFY {CHANNEL}")

    def _migrate(self) -> None:
        with self._tx(write=True) as cur:
            # Replicas starting together take turns; the second finds the work done.
            cur.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATE_LOCK,))
            self._run_migrations(cur, MIGRATIONS)

    def lookup(self, key_hash: bytes) -> tuple[APIKey, Tenant] | None:
        future = self._lookups.submit(self._lookup, key_hash)
        # On the HTTP service's event loop the check yields while this runs (suspend.py).
        outcome = suspend.until(future.add_done_callback, self.timeout)
        if outcome is suspend.TIMED_OUT:
            raise StoreError(f"PostgreSQL key lookup took over {self.timeout:g} s")
        try:
            return future.result(timeout=self.timeout)
        except concurrent.futures.TimeoutError:
            raise StoreError(f"PostgreSQL key lookup took over {self.timeout:g} s") from None

    def _lookup(self, key_hash: bytes) -> tuple[APIKey, Tenant] | None:
        with self._tx(timeout=self.timeout) as cur:
            row = cur.execute(self._lookup_sql, (key_hash,)).fetchone()
        return self._found(row)

    def try_lead(self, role: str) -> bool:
        """A session-level advisory lock per role, held on a connection of its own: the
        replica holding it leads until it dies (PostgreSQL then frees the lock and the
        next replica to ask takes over)."""
        with self._leading_lock:
            conn = self._leading.get(role)
            try:
                if conn is not None and not conn.closed:
                    conn.execute("SELECT 1")  # still ours while the session lives
                    return True
                conn = psycopg.connect(self._conninfo, autocommit=True, **self._options)
                row = conn.execute(
                    "SELECT pg_try_advisory_lock(%s)", (_role_lock(role),)
                ).fetchone()
            except psycopg.Error as exc:
                log.warning("leader election for %s: %s", role, _message(exc))
                self._leading.pop(role, None)
                if conn is not None:
                    conn.close()
                return False
            if row is not None and row[0]:
                self._leading[role] = conn
                log.info("this replica now leads %s", role)
                return True
            conn.close()
            self._leading.pop(role, None)
            return False

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        stop = threading.Event()

        def listen() -> None:
            while not stop.is_set():
                try:
                    with psycopg.connect(self._conninfo, autocommit=True, **self._options) as conn:
                        conn.execute(f"LISTEN {CHANNEL}")
                        callback()  # whatever changed while we were not listening
                        while not stop.is_set():
                            for _ in conn.notifies(timeout=0.5, stop_after=1):
                                callback()
                except psycopg.Error as exc:
                    log.warning("PostgreSQL change notifications interrupted: %s", _message(exc))
                    stop.wait(1.0)
                except Exception:
                    log.exception("change notification handler failed")
                    stop.wait(1.0)

        thread = threading.Thread(target=listen, name="extauthz-pg-listen", daemon=True)
        thread.start()

        def unsubscribe() -> None:
            stop.set()
            thread.join(timeout=2.0)

        return unsubscribe

    def close(self) -> None:
        for conn in getattr(self, "_leading", {}).values():
            conn.close()
        lookups = getattr(self, "_lookups", None)
        if lookups is not None:
            lookups.shutdown(wait=False, cancel_futures=True)
        self._pool.close()


def _role_lock(role: str) -> int:
    """A stable 63-bit advisory lock key for a role name."""
    return int.from_bytes(hashlib.sha256(b"extauthz-role:" + role.encode()).digest()[:8]) >> 1


def _first_line(exc: psycopg.Error) -> str:
    """libpq's reason in one line ("connection to server at ... failed: Connection
    refused"), without its hint lines or psycopg's "connection failed:" prefix."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.removeprefix("connection failed: ")


def _message(exc: psycopg.Error) -> str:
    """The server's primary message only: DETAIL lines can quote row values."""
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None) if diag is not None else None
    return str(primary or type(exc).__name__)
