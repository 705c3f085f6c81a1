"""The seed report's examples run against the real implementation."""

from __future__ import annotations

from pathlib import Path

from extauthz import APIKeyManager, Tenant, TenantManager, TenantTier
from extauthz.keys import Pepper
from extauthz.store import open_store


def test_seed_key_examples_run_on_a_real_store(tmp_path: Path) -> None:
    """create_key -> (key_id, full_key), validate_key -> APIKey, revoke_key -> refused."""
    store = open_store(f"sqlite:///{tmp_path}/seed.db")
    tenant_manager = TenantManager(store)
    api_key_manager = APIKeyManager(store, Pepper(b"s" * 32))

    tenant = tenant_manager.create_tenant("Tenant One", TenantTier.FREE, tenant_id="tenant1")
    key_id, full_key = api_key_manager.create_key("tenant1", "my-key")
    assert full_key.startswith("nk_")

    api_key = api_key_manager.validate_key(full_key)
    assert api_key is not None
    assert api_key.is_active
    assert api_key.tenant_id == "tenant1"
    assert api_key.key_id == key_id

    api_key_manager.revoke_key(key_id)
    assert api_key_manager.validate_key(full_key) is None

    assert tenant_manager.get_tenant(tenant.id) == tenant
    assert [t.name for t in tenant_manager.list_tenants()] == ["Tenant One"]
    store.close()


def test_seed_tenant_constructor() -> None:
    """Tenant(name=..., tier=...) builds an active tenant with a fresh id."""
    tenant = Tenant(name="Acme Corp", tier=TenantTier.PROFESSIONAL)
    assert tenant.is_active
    assert tenant.id.startswith("t_")
    assert tenant.tier.value == "professional"


def test_raw_key_is_never_stored(tmp_path: Path) -> None:
    """The SQLite file holds no copy of the key, only its HMAC."""
    path = tmp_path / "k.db"
    store = open_store(f"sqlite:///{path}")
    TenantManager(store).create_tenant("t", tenant_id="t")
    _, full_key = APIKeyManager(store, Pepper(b"s" * 32)).create_key("t")
    store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert full_key.encode() not in raw
    assert full_key.split("_")[1].encode() not in raw
