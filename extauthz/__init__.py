"""extauthz: an external-authorization sidecar for Envoy.

The seed's Python API, backed by real stores::

    from extauthz import open_runtime
    rt = open_runtime()                       # settings from EXTAUTHZ_* / defaults
    tenant = rt.tenants.create_tenant("Acme Corp", TenantTier.PROFESSIONAL)
    key_id, full_key = rt.keys.create_key(tenant.id, "my-key")
"""

from __future__ import annotations

from extauthz.apikeys import APIKeyManager, KeyResolver
from extauthz.authorizer import Authorizer
from extauthz.limits import RateLimiter
from extauthz.model import APIKey, CheckInput, Decision, Tenant, TenantStatus, TenantTier
from extauthz.tenants import TenantManager

__version__ = "0.1.0"

__all__ = [
    "APIKey",
    "APIKeyManager",
    "Authorizer",
    "CheckInput",
    "Decision",
    "KeyResolver",
    "RateLimiter",
    "Tenant",
    "TenantManager",
    "TenantStatus",
    "TenantTier",
    "open_runtime",
]


def open_runtime(config_file: str | None = None):  # type: ignore[no-untyped-def]
    """Settings -> a Runtime with ``.tenants`` and ``.keys`` managers on the configured store."""
    from extauthz.app import Runtime
    from extauthz.settings import load_settings

    return Runtime.open(load_settings(config_file))
