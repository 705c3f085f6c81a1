"""One suite, every store backend: memory://, sqlite:// and postgresql:// (conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from extauthz.errors import ConflictError, UnknownKeyError, UnknownTenantError
from extauthz.model import APIKey, Tenant, TenantStatus, TenantTier
from extauthz.store import Store, open_store


def tenant(name: str = "acme", tid: str = "t1") -> Tenant:
    return Tenant(name=name, tier=TenantTier.STARTER, id=tid, created_at=1.0, updated_at=1.0)


def key(kid: str = "k1", tid: str = "t1", h: bytes = b"h1") -> APIKey:
    return APIKey(key_id=kid, tenant_id=tid, name="n", key_hash=h, created_at=2.0)


def test_tenant_round_trips(store: Store) -> None:
    """A created tenant reads back equal, by id and by name."""
    store.create_tenant(tenant())
    assert store.get_tenant("t1") == tenant()
    assert store.find_tenant("acme") == tenant()
    assert store.find_tenant("t1") == tenant()
    assert store.get_tenant("nope") is None
    assert [t.id for t in store.list_tenants()] == ["t1"]


def test_duplicate_tenant_name_conflicts(store: Store) -> None:
    """Tenant names are unique."""
    store.create_tenant(tenant())
    with pytest.raises(ConflictError):
        store.create_tenant(tenant(tid="t2"))


def test_update_tenant_changes_status_and_tier_and_bumps_revision(store: Store) -> None:
    """Suspending and re-tiering are stored and bump the revision caches poll."""
    store.create_tenant(tenant())
    before = store.revision()
    updated = store.update_tenant("t1", 5.0, status=TenantStatus.SUSPENDED)
    assert (updated.status, updated.tier, updated.updated_at) == (
        TenantStatus.SUSPENDED,
        TenantTier.STARTER,
        5.0,
    )
    assert (
        store.update_tenant("t1", 6.0, tier=TenantTier.ENTERPRISE).status is TenantStatus.SUSPENDED
    )
    assert store.revision() > before
    with pytest.raises(UnknownTenantError):
        store.update_tenant("nope", 1.0, status=TenantStatus.ACTIVE)


def test_key_lookup_by_hash_returns_key_and_tenant(store: Store) -> None:
    """lookup(hash) returns the key and its tenant in one call; unknown hashes return None."""
    store.create_tenant(tenant())
    store.insert_key(key())
    found = store.lookup(b"h1")
    assert found is not None
    assert found[0] == key()
    assert found[1].id == "t1"
    assert store.lookup(b"other") is None


def test_key_for_unknown_tenant_is_refused(store: Store) -> None:
    """A key cannot be created for a tenant that does not exist."""
    with pytest.raises(UnknownTenantError):
        store.insert_key(key())


def test_revoke_marks_once(store: Store) -> None:
    """Revoke stores the time; a second revoke is a conflict; unknown ids are not found."""
    store.create_tenant(tenant())
    store.insert_key(key())
    rev = store.revision()
    assert store.revoke_key("k1", 9.0).revoked_at == 9.0
    assert store.get_key("k1").revoked_at == 9.0  # type: ignore[union-attr]
    assert store.revision() > rev
    with pytest.raises(ConflictError):
        store.revoke_key("k1", 10.0)
    with pytest.raises(UnknownKeyError):
        store.revoke_key("nope", 10.0)


def test_rotate_inserts_new_key_and_ends_old_one(store: Store) -> None:
    """Rotation adds the new key and sets the old key's expiry and successor atomically."""
    store.create_tenant(tenant())
    store.insert_key(key())
    old = store.rotate_key("k1", key("k2", h=b"h2"), 100.0)
    assert (old.expires_at, old.rotated_to) == (100.0, "k2")
    assert store.get_key("k2") is not None
    with pytest.raises(ConflictError):
        store.rotate_key("k1", key("k3", h=b"h3"), 100.0)
    assert store.get_key("k3") is None  # nothing half-done


def test_touch_keys_writes_last_used_without_going_backwards(store: Store) -> None:
    """last_used_at only moves forward and does not bump the revision."""
    store.create_tenant(tenant())
    store.insert_key(key())
    rev = store.revision()
    store.touch_keys({"k1": 50.0, "ghost": 1.0})
    store.touch_keys({"k1": 40.0})
    assert store.get_key("k1").last_used_at == 50.0  # type: ignore[union-attr]
    assert store.revision() == rev


def test_delete_tenant_deletes_its_keys(store: Store) -> None:
    """Deleting a tenant removes its keys: their hashes no longer resolve."""
    store.create_tenant(tenant())
    store.insert_key(key())
    store.delete_tenant("t1")
    assert store.lookup(b"h1") is None
    assert store.list_keys() == []
    with pytest.raises(UnknownTenantError):
        store.delete_tenant("t1")


def test_list_keys_filters_by_tenant(store: Store) -> None:
    """list_keys(tenant) returns only that tenant's keys, oldest first."""
    store.create_tenant(tenant())
    store.create_tenant(tenant("other", "t2"))
    store.insert_key(key())
    store.insert_key(key("k2", "t2", b"h2"))
    assert [k.key_id for k in store.list_keys("t2")] == ["k2"]
    assert [k.key_id for k in store.list_keys()] == ["k1", "k2"]


def test_sqlite_schema_is_versioned_and_reopens(tmp_path: Path) -> None:
    """The SQLite file records its schema version and opens again without re-migrating."""
    url = f"sqlite:///{tmp_path}/v.db"
    first = open_store(url)
    first.create_tenant(tenant())
    version = first.schema_version()
    first.close()
    again = open_store(url)
    assert again.schema_version() == version >= 1
    assert again.get_tenant("t1") is not None
    again.close()


def test_setdefault_meta_keeps_the_first_value(store: Store) -> None:
    """The first value stored under a name wins; later ones are ignored."""
    assert store.get_meta("x") is None
    assert store.setdefault_meta("x", b"one") == b"one"
    assert store.setdefault_meta("x", b"two") == b"one"
    assert store.get_meta("x") == b"one"
