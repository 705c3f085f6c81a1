"""Tenants and API keys in SQL that SQLite and PostgreSQL both run. Each database's
module adds its connection handling, transactions, error mapping and migrations.

Placeholders are ``?``; the PostgreSQL cursor translates them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from extauthz.errors import ConflictError, StoreError, UnknownKeyError, UnknownTenantError
from extauthz.model import APIKey, AuditEvent, Tenant, TenantStatus, TenantTier
from extauthz.store.base import Store
from extauthz.store.sql_records import Cursor, SQLRecords

_KEY_COLS = (
    "k.key_id, k.tenant_id, k.name, k.key_hash, k.pepper_version, k.created_at, "
    "k.expires_at, k.revoked_at, k.last_used_at, k.rotated_to"
)
_TENANT_COLS = "t.id, t.name, t.tier, t.status, t.created_at, t.updated_at"
# Always one row (NULLs for an unknown hash); {h} is the dialect's typed placeholder.
LOOKUP = (
    f"SELECT {_KEY_COLS}, {_TENANT_COLS} FROM (SELECT {{h}} AS h) q "
    "LEFT JOIN api_keys k ON k.key_hash = q.h LEFT JOIN tenants t ON t.id = k.tenant_id"
)


def _tenant(row: Any) -> Tenant:
    id_, name, tier, status, created, updated = row
    return Tenant(
        id=str(id_),
        name=str(name),
        tier=TenantTier(tier),
        status=TenantStatus(status),
        created_at=float(created),
        updated_at=float(updated),
    )


def _key(row: Any) -> APIKey:
    key_id, tenant_id, name, key_hash, pepper_v, created, expires, revoked, used, rotated = row
    return APIKey(
        key_id=str(key_id),
        tenant_id=str(tenant_id),
        name=str(name),
        key_hash=bytes(key_hash),
        pepper_version=int(pepper_v),
        created_at=float(created),
        expires_at=None if expires is None else float(expires),
        revoked_at=None if revoked is None else float(revoked),
        last_used_at=None if used is None else float(used),
        rotated_to=None if rotated is None else str(rotated),
    )


_PLACEHOLDER = ("", "", "", b"", 1, 0.0, None, None, None, None, "", "", "free", "active", 0.0, 0.0)


def _decode_placeholder() -> tuple[APIKey, Tenant]:
    return _key(_PLACEHOLDER[:10]), _tenant(_PLACEHOLDER[10:])


class SQLStore(SQLRecords, Store):
    _lookup_sql = LOOKUP.format(h="?")

    @staticmethod
    def _run_migrations(cur: Cursor, migrations: Sequence[str]) -> None:
        """Inside the caller's write transaction: bring the schema to the newest version
        (each entry migrates from version i to i+1), or refuse a newer database."""
        cur.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = cur.execute("SELECT version FROM schema_version").fetchone()
        current = 0 if row is None else int(row[0])
        if current > len(migrations):
            raise StoreError(
                f"database schema version {current} is newer than this extauthz "
                f"({len(migrations)}): upgrade extauthz"
            )
        for script in migrations[current:]:
            for statement in filter(str.strip, script.split(";")):
                cur.execute(statement)
        if row is None:
            cur.execute("INSERT INTO schema_version VALUES (?)", (len(migrations),))
        else:
            cur.execute("UPDATE schema_version SET version = ?", (len(migrations),))

    def _bump(self, cur: Cursor) -> None:
        cur.execute("UPDATE meta SET value = value + 1 WHERE name = 'revision'")
        # When, so servers can measure how long a change took to reach their caches.
        cur.execute(
            "INSERT INTO meta (name, value) VALUES ('revision_at', ?) "
            "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            (int(time.time() * 1_000_000),),
        )
        self._announce(cur)

    def _announce(self, cur: Cursor) -> None:
        """Inside the change's transaction: tell other processes now (PostgreSQL's
        NOTIFY, sent at commit); they poll the revision anyway."""

    def changed_at(self) -> float | None:
        with self._tx() as cur:
            row = cur.execute("SELECT value FROM meta WHERE name = 'revision_at'").fetchone()
        return None if row is None else int(row[0]) / 1_000_000

    def schema_version(self) -> int:
        with self._tx() as cur:
            return int(cur.execute("SELECT version FROM schema_version").fetchone()[0])

    def revision(self) -> int:
        with self._tx() as cur:
            return int(cur.execute("SELECT value FROM meta WHERE name='revision'").fetchone()[0])

    def setdefault_meta(self, name: str, value: bytes) -> bytes:
        with self._tx(write=True) as cur:
            cur.execute(
                "INSERT INTO meta_blobs VALUES (?, ?) ON CONFLICT (name) DO NOTHING", (name, value)
            )
            row = cur.execute("SELECT value FROM meta_blobs WHERE name = ?", (name,)).fetchone()
        return bytes(row[0])

    def get_meta(self, name: str) -> bytes | None:
        with self._tx() as cur:
            row = cur.execute("SELECT value FROM meta_blobs WHERE name = ?", (name,)).fetchone()
        return None if row is None else bytes(row[0])

    def create_tenant(self, tenant: Tenant, audit: Sequence[AuditEvent] = ()) -> None:
        with self._tx(write=True) as cur:
            if cur.execute("SELECT 1 FROM tenants WHERE name = ?", (tenant.name,)).fetchone():
                raise ConflictError(f"a tenant named {tenant.name!r} already exists")
            cur.execute(
                "INSERT INTO tenants VALUES (?, ?, ?, ?, ?, ?)",
                (
                    tenant.id,
                    tenant.name,
                    tenant.tier.value,
                    tenant.status.value,
                    tenant.created_at,
                    tenant.updated_at,
                ),
            )
            self._bump(cur)
            self._append_audit(cur, audit)

    def get_tenant(self, tenant_id: str) -> Tenant | None:
        with self._tx() as cur:
            row = cur.execute(
                f"SELECT {_TENANT_COLS} FROM tenants t WHERE t.id = ?",
                (tenant_id,),
            ).fetchone()
        return None if row is None else _tenant(row)

    def find_tenant(self, id_or_name: str) -> Tenant | None:
        with self._tx() as cur:
            row = cur.execute(
                f"SELECT {_TENANT_COLS} FROM tenants t WHERE t.id = ? OR t.name = ? "
                "ORDER BY t.id = ? DESC LIMIT 1",
                (id_or_name, id_or_name, id_or_name),
            ).fetchone()
        return None if row is None else _tenant(row)

    def list_tenants(self) -> list[Tenant]:
        with self._tx() as cur:
            rows = cur.execute(
                f"SELECT {_TENANT_COLS} FROM tenants t ORDER BY t.created_at, t.id"
            ).fetchall()
        return [_tenant(r) for r in rows]

    def update_tenant(
        self,
        tenant_id: str,
        now: float,
        *,
        status: TenantStatus | None = None,
        tier: TenantTier | None = None,
        audit: Sequence[AuditEvent] = (),
    ) -> Tenant:
        with self._tx(write=True) as cur:
            cur.execute(
                "UPDATE tenants SET status = COALESCE(?, status), tier = COALESCE(?, tier), "
                "updated_at = ? WHERE id = ?",
                (status and status.value, tier and tier.value, now, tenant_id),
            )
            if cur.rowcount == 0:
                raise UnknownTenantError(f"no tenant with id {tenant_id!r}")
            self._bump(cur)
            self._append_audit(cur, audit)
            row = cur.execute(
                f"SELECT {_TENANT_COLS} FROM tenants t WHERE t.id = ?",
                (tenant_id,),
            ).fetchone()
        return _tenant(row)

    def delete_tenant(self, tenant_id: str, audit: Sequence[AuditEvent] = ()) -> None:
        with self._tx(write=True) as cur:
            cur.execute("DELETE FROM tenants WHERE id = ?", (tenant_id,))
            if cur.rowcount == 0:
                raise UnknownTenantError(f"no tenant with id {tenant_id!r}")
            self._bump(cur)
            self._append_audit(cur, audit)

    def insert_key(self, key: APIKey, audit: Sequence[AuditEvent] = ()) -> None:
        with self._tx(write=True) as cur:
            self._insert_key(cur, key)
            self._bump(cur)
            self._append_audit(cur, audit)

    @staticmethod
    def _insert_key(cur: Cursor, key: APIKey) -> None:
        if not cur.execute("SELECT 1 FROM tenants WHERE id = ?", (key.tenant_id,)).fetchone():
            raise UnknownTenantError(f"no tenant with id {key.tenant_id!r}")
        cur.execute(
            "INSERT INTO api_keys VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                key.key_id,
                key.tenant_id,
                key.name,
                key.key_hash,
                key.pepper_version,
                key.created_at,
                key.expires_at,
                key.revoked_at,
                key.last_used_at,
                key.rotated_to,
            ),
        )

    def get_key(self, key_id: str) -> APIKey | None:
        with self._tx() as cur:
            row = cur.execute(
                f"SELECT {_KEY_COLS} FROM api_keys k WHERE k.key_id = ?",
                (key_id,),
            ).fetchone()
        return None if row is None else _key(row)

    def lookup(self, key_hash: bytes) -> tuple[APIKey, Tenant] | None:
        # Always one row (NULLs for an unknown hash), so the database does the same work
        # for an unknown key as for a known one and the timing does not tell them apart.
        with self._tx() as cur:
            row = cur.execute(self._lookup_sql, (key_hash,)).fetchone()
        return self._found(row)

    @staticmethod
    def _found(row: Any) -> tuple[APIKey, Tenant] | None:
        found = row[0] is not None and row[10] is not None
        # A miss decodes a placeholder row, for the same reason.
        entry = (_key(row[:10]), _tenant(row[10:])) if found else _decode_placeholder()
        return entry if found else None

    def list_keys(self, tenant_id: str | None = None) -> list[APIKey]:
        query = f"SELECT {_KEY_COLS} FROM api_keys k"
        with self._tx() as cur:
            if tenant_id is None:
                rows = cur.execute(query + " ORDER BY k.created_at, k.key_id").fetchall()
            else:
                rows = cur.execute(
                    query + " WHERE k.tenant_id = ? ORDER BY k.created_at, k.key_id", (tenant_id,)
                ).fetchall()
        return [_key(r) for r in rows]

    def revoke_key(self, key_id: str, now: float, audit: Sequence[AuditEvent] = ()) -> APIKey:
        with self._tx(write=True) as cur:
            row = cur.execute(
                f"SELECT {_KEY_COLS} FROM api_keys k WHERE k.key_id = ?",
                (key_id,),
            ).fetchone()
            if row is None:
                raise UnknownKeyError(f"no API key with id {key_id!r}")
            if row[7] is not None:
                raise ConflictError(f"API key {key_id} is already revoked")
            cur.execute("UPDATE api_keys SET revoked_at = ? WHERE key_id = ?", (now, key_id))
            self._bump(cur)
            self._append_audit(cur, audit)
        key = _key(row)
        key.revoked_at = now
        return key

    def rotate_key(
        self,
        old_key_id: str,
        new_key: APIKey,
        old_expires_at: float,
        audit: Sequence[AuditEvent] = (),
    ) -> APIKey:
        with self._tx(write=True) as cur:
            row = cur.execute(
                f"SELECT {_KEY_COLS} FROM api_keys k WHERE k.key_id = ?",
                (old_key_id,),
            ).fetchone()
            if row is None:
                raise UnknownKeyError(f"no API key with id {old_key_id!r}")
            old = _key(row)
            if old.revoked_at is not None:
                raise ConflictError(f"API key {old_key_id} is revoked and cannot be rotated")
            if old.rotated_to is not None:
                raise ConflictError(f"API key {old_key_id} was already rotated to {old.rotated_to}")
            self._insert_key(cur, new_key)
            if old.expires_at is None or old.expires_at > old_expires_at:
                old.expires_at = old_expires_at
            old.rotated_to = new_key.key_id
            cur.execute(
                "UPDATE api_keys SET expires_at = ?, rotated_to = ? WHERE key_id = ?",
                (old.expires_at, old.rotated_to, old_key_id),
            )
            self._bump(cur)
            self._append_audit(cur, audit)
        return old

    def touch_keys(self, last_used: Mapping[str, float]) -> None:
        if not last_used:
            return
        with self._tx(write=True) as cur:
            cur.executemany(
                "UPDATE api_keys SET last_used_at = ? WHERE key_id = ? "
                "AND (last_used_at IS NULL OR last_used_at < ?)",
                [(when, key_id, when) for key_id, when in last_used.items()],
            )
