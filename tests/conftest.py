from __future__ import annotations

import pytest

from extauthz.apikeys import APIKeyManager, KeyResolver
from extauthz.authorizer import Authorizer
from extauthz.keys import Pepper
from extauthz.model import TenantTier
from extauthz.tenants import TenantManager
from extauthz.testing import CountingStore, ManualClock

PEPPER = Pepper(b"p" * 32)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def store() -> CountingStore:
    return CountingStore()


@pytest.fixture
def resolver(store: CountingStore, clock: ManualClock) -> KeyResolver:
    return KeyResolver(store, PEPPER, clock, ttl=30, negative_ttl=5, size=1000)


@pytest.fixture
def keys(store: CountingStore, clock: ManualClock, resolver: KeyResolver) -> APIKeyManager:
    return APIKeyManager(store, PEPPER, clock, resolver=resolver)


@pytest.fixture
def tenants(store: CountingStore, clock: ManualClock) -> TenantManager:
    return TenantManager(store, clock)


@pytest.fixture
def authorizer(resolver: KeyResolver) -> Authorizer:
    return Authorizer(resolver)


@pytest.fixture
def acme_key(tenants: TenantManager, keys: APIKeyManager) -> tuple[str, str]:
    """(key_id, full_key) of an active key of the PROFESSIONAL tenant 'acme'."""
    tenants.create_tenant("acme", TenantTier.PROFESSIONAL, tenant_id="acme")
    return keys.create_key("acme", "test")
