"""An in-process store (``memory://``): for tests and throwaway demos; nothing persists."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Mapping, Sequence

from extauthz.errors import ConflictError, UnknownKeyError, UnknownTenantError
from extauthz.model import APIKey, AuditEvent, Tenant, TenantStatus, TenantTier
from extauthz.store.base import Store
from extauthz.store.memory_records import MemoryRecords


class MemoryStore(MemoryRecords, Store):
    def __init__(self) -> None:
        self.url = "memory://"
        self._lock = threading.Lock()
        self._tenants: dict[str, Tenant] = {}
        self._keys: dict[str, APIKey] = {}
        self._by_hash: dict[bytes, str] = {}
        self._revision = 0
        self._changed_at: float | None = None
        self._meta: dict[str, bytes] = {}
        self._init_records()

    def schema_version(self) -> int:
        return 1

    def revision(self) -> int:
        return self._revision

    def changed_at(self) -> float | None:
        return self._changed_at

    def setdefault_meta(self, name: str, value: bytes) -> bytes:
        with self._lock:
            return self._meta.setdefault(name, value)

    def get_meta(self, name: str) -> bytes | None:
        return self._meta.get(name)

    def create_tenant(self, tenant: Tenant, audit: Sequence[AuditEvent] = ()) -> None:
        with self._lock:
            if tenant.id in self._tenants:
                raise ConflictError(f"a tenant with id {tenant.id!r} already exists")
            if any(t.name == tenant.name for t in self._tenants.values()):
                raise ConflictError(f"a tenant named {tenant.name!r} already exists")
            self._tenants[tenant.id] = dataclasses.replace(tenant)
            self._revision += 1
            self._changed_at = time.time()
            self._append_audit_locked(audit)

    def get_tenant(self, tenant_id: str) -> Tenant | None:
        with self._lock:
            tenant = self._tenants.get(tenant_id)
            return None if tenant is None else dataclasses.replace(tenant)

    def find_tenant(self, id_or_name: str) -> Tenant | None:
        with self._lock:
            tenant = self._tenants.get(id_or_name) or next(
                (t for t in self._tenants.values() if t.name == id_or_name), None
            )
            return None if tenant is None else dataclasses.replace(tenant)

    def list_tenants(self) -> list[Tenant]:
        with self._lock:
            tenants = sorted(self._tenants.values(), key=lambda t: (t.created_at, t.id))
            return [dataclasses.replace(t) for t in tenants]

    def update_tenant(
        self,
        tenant_id: str,
        now: float,
        *,
        status: TenantStatus | None = None,
        tier: TenantTier | None = None,
        audit: Sequence[AuditEvent] = (),
    ) -> Tenant:
        with self._lock:
            tenant = self._tenants.get(tenant_id)
            if tenant is None:
                raise UnknownTenantError(f"no tenant with id {tenant_id!r}")
            tenant.status = status or tenant.status
            tenant.tier = tier or tenant.tier
            tenant.updated_at = now
            self._revision += 1
            self._changed_at = time.time()
            self._append_audit_locked(audit)
            return dataclasses.replace(tenant)

    def delete_tenant(self, tenant_id: str, audit: Sequence[AuditEvent] = ()) -> None:
        with self._lock:
            if self._tenants.pop(tenant_id, None) is None:
                raise UnknownTenantError(f"no tenant with id {tenant_id!r}")
            for key in [k for k in self._keys.values() if k.tenant_id == tenant_id]:
                del self._keys[key.key_id]
                del self._by_hash[key.key_hash]
            self._revision += 1
            self._changed_at = time.time()
            self._append_audit_locked(audit)

    def _insert(self, key: APIKey) -> None:
        if key.tenant_id not in self._tenants:
            raise UnknownTenantError(f"no tenant with id {key.tenant_id!r}")
        if key.key_id in self._keys or key.key_hash in self._by_hash:
            raise ConflictError("an API key with that id or hash already exists")
        self._keys[key.key_id] = dataclasses.replace(key)
        self._by_hash[key.key_hash] = key.key_id

    def insert_key(self, key: APIKey, audit: Sequence[AuditEvent] = ()) -> None:
        with self._lock:
            self._insert(key)
            self._revision += 1
            self._changed_at = time.time()
            self._append_audit_locked(audit)

    def get_key(self, key_id: str) -> APIKey | None:
        with self._lock:
            key = self._keys.get(key_id)
            return None if key is None else dataclasses.replace(key)

    def lookup(self, key_hash: bytes) -> tuple[APIKey, Tenant] | None:
        with self._lock:
            key_id = self._by_hash.get(key_hash)
            if key_id is None:
                return None
            key = self._keys[key_id]
            return dataclasses.replace(key), dataclasses.replace(self._tenants[key.tenant_id])

    def list_keys(self, tenant_id: str | None = None) -> list[APIKey]:
        with self._lock:
            keys = [k for k in self._keys.values() if tenant_id in (None, k.tenant_id)]
            keys.sort(key=lambda k: (k.created_at, k.key_id))
            return [dataclasses.replace(k) for k in keys]

    def revoke_key(self, key_id: str, now: float, audit: Sequence[AuditEvent] = ()) -> APIKey:
        with self._lock:
            key = self._keys.get(key_id)
            if key is None:
                raise UnknownKeyError(f"no API key with id {key_id!r}")
            if key.revoked_at is not None:
                raise ConflictError(f"API key {key_id} is already revoked")
            key.revoked_at = now
            self._revision += 1
            self._changed_at = time.time()
            self._append_audit_locked(audit)
            return dataclasses.replace(key)

    def rotate_key(
        self,
        old_key_id: str,
        new_key: APIKey,
        old_expires_at: float,
        audit: Sequence[AuditEvent] = (),
    ) -> APIKey:
        with self._lock:
            old = self._keys.get(old_key_id)
            if old is None:
                raise UnknownKeyError(f"no API key with id {old_key_id!r}")
            if old.revoked_at is not None:
                raise ConflictError(f"API key {old_key_id} is revoked and cannot be rotated")
            if old.rotated_to is not None:
                raise ConflictError(f"API key {old_key_id} was already rotated to {old.rotated_to}")
            self._insert(new_key)
            if old.expires_at is None or old.expires_at > old_expires_at:
                old.expires_at = old_expires_at
            old.rotated_to = new_key.key_id
            self._revision += 1
            self._changed_at = time.time()
            self._append_audit_locked(audit)
            return dataclasses.replace(old)

    def touch_keys(self, last_used: Mapping[str, float]) -> None:
        with self._lock:
            for key_id, when in last_used.items():
                key = self._keys.get(key_id)
                if key is not None:
                    key.last_used_at = max(key.last_used_at or 0.0, when)

    def close(self) -> None:
        pass
