"""The seed's tenant API (``create_tenant``, ``get_tenant``, ``list_tenants``) on a real store."""

from __future__ import annotations

import re

from extauthz.audit import DATA_MODIFIED, make_event
from extauthz.clock import SYSTEM_CLOCK, Clock
from extauthz.errors import ConfigError, UnknownTenantError
from extauthz.keys import shown
from extauthz.model import AuditEvent, Tenant, TenantStatus, TenantTier
from extauthz.store import Store

_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class TenantManager:
    def __init__(self, store: Store, clock: Clock = SYSTEM_CLOCK, actor: str = "admin") -> None:
        self.store = store
        self.clock = clock
        self.actor = actor  # who the audit names for changes made through this manager

    def _event(self, tenant_id: str, change: str, **detail: object) -> list[AuditEvent]:
        # Written by the store in the same transaction as the change itself.
        return [
            make_event(
                self.clock,
                DATA_MODIFIED,
                "success",
                tenant_id=tenant_id,
                actor=self.actor,
                reason=change,
                detail=detail,
            )
        ]

    def create_tenant(
        self,
        name: str,
        tier: TenantTier | str = TenantTier.FREE,
        tenant_id: str | None = None,
    ) -> Tenant:
        name = name.strip()
        if not name or len(name) > 200 or any(ord(c) < 32 for c in name):
            raise ConfigError("a tenant name must be 1-200 printable characters")
        if tenant_id is not None and not _ID_RE.fullmatch(tenant_id):
            raise ConfigError("a tenant id must be 1-64 letters, digits, '_', '.' or '-'")
        tier = tier if isinstance(tier, TenantTier) else TenantTier.parse(tier)
        now = self.clock.now()
        tenant = Tenant(name=name, tier=tier, created_at=now, updated_at=now)
        if tenant_id is not None:
            tenant.id = tenant_id
        self.store.create_tenant(
            tenant, self._event(tenant.id, "tenant.create", name=name, tier=tier.value)
        )
        return tenant

    def get_tenant(self, tenant_id: str) -> Tenant | None:
        return self.store.get_tenant(tenant_id)

    def find(self, id_or_name: str) -> Tenant:
        """By id, else by name; UnknownTenantError if neither matches."""
        tenant = self.store.find_tenant(id_or_name)
        if tenant is None:
            raise UnknownTenantError(f"no tenant with id or name {shown(id_or_name)}")
        return tenant

    def list_tenants(self) -> list[Tenant]:
        return self.store.list_tenants()

    def suspend(self, tenant_id: str) -> Tenant:
        return self.store.update_tenant(
            tenant_id,
            self.clock.now(),
            status=TenantStatus.SUSPENDED,
            audit=self._event(tenant_id, "tenant.suspend"),
        )

    def resume(self, tenant_id: str) -> Tenant:
        return self.store.update_tenant(
            tenant_id,
            self.clock.now(),
            status=TenantStatus.ACTIVE,
            audit=self._event(tenant_id, "tenant.resume"),
        )

    def set_tier(self, tenant_id: str, tier: TenantTier) -> Tenant:
        return self.store.update_tenant(
            tenant_id,
            self.clock.now(),
            tier=tier,
            audit=self._event(tenant_id, "tenant.set_tier", tier=tier.value),
        )

    def delete(self, tenant_id: str) -> None:
        self.store.delete_tenant(tenant_id, self._event(tenant_id, "tenant.delete"))
