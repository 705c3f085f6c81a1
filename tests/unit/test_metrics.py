"""Prometheus metrics from the decision core, on a fresh registry per test."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from extauthz.apikeys import APIKeyManager, KeyResolver
from extauthz.authorizer import Authorizer
from extauthz.keys import generate_key
from extauthz.model import CheckInput, TenantTier
from extauthz.telemetry.metrics import Metrics
from extauthz.tenants import TenantManager
from extauthz.testing import CountingStore, ManualClock


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    found = registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def setup(
    store: CountingStore, clock: ManualClock, resolver: KeyResolver, **kw: object
) -> tuple[Authorizer, Metrics, list[str]]:
    metrics = Metrics(CollectorRegistry(), **kw)  # type: ignore[arg-type]
    authorizer = Authorizer(resolver, metrics=metrics)
    tenants, keys = TenantManager(store, clock), APIKeyManager(store, resolver.pepper, clock)
    made = []
    for i in range(3):
        tenants.create_tenant(f"n{i}", TenantTier.FREE, tenant_id=f"t{i}")
        made.append(keys.create_key(f"t{i}")[1])
    metrics.add_sources(key_cache=lambda: dict(resolver.stats))
    return authorizer, metrics, made


def check(authorizer: Authorizer, key: str) -> None:
    authorizer.check(CheckInput("GET", "/v1", {"x-api-key": key}))


def test_checks_are_counted_by_status_reason_and_tenant(
    store: CountingStore, clock: ManualClock, resolver: KeyResolver
) -> None:
    authorizer, metrics, keys = setup(store, clock, resolver)
    for _ in range(3):
        check(authorizer, keys[0])
    check(authorizer, generate_key())
    reg = metrics.registry
    assert value(reg, "extauthz_requests_total", endpoint="other", status="200", tenant="t0") == 3
    assert value(reg, "extauthz_requests_total", endpoint="other", status="401", tenant="") == 1
    assert value(reg, "extauthz_decisions_total", result="deny", reason="unknown_key") == 1
    assert value(reg, "extauthz_latency_seconds_count") == 4
    assert value(reg, "extauthz_key_cache_lookups_total", result="hit") == 2
    assert value(reg, "extauthz_key_cache_lookups_total", result="miss") == 2


def test_junk_keys_never_create_series(
    store: CountingStore, clock: ManualClock, resolver: KeyResolver
) -> None:
    """BAD_INPUTS #22: 5,000 different junk keys add counts, not series."""
    authorizer, metrics, _ = setup(store, clock, resolver)
    check(authorizer, generate_key())
    before = generate_latest(metrics.registry).count(b"\n")
    for _ in range(5000):
        check(authorizer, generate_key())
    assert generate_latest(metrics.registry).count(b"\n") == before
    assert (
        value(metrics.registry, "extauthz_decisions_total", result="deny", reason="unknown_key")
        == 5001
    )


def test_tenant_label_is_capped_or_off(
    store: CountingStore, clock: ManualClock, resolver: KeyResolver
) -> None:
    """With a cap of 2 the third tenant reports as "other"; switched off, no tenant."""
    authorizer, metrics, keys = setup(store, clock, resolver, tenant_cap=2)
    for key in keys:
        check(authorizer, key)
    reg = metrics.registry
    labels = [
        value(reg, "extauthz_requests_total", endpoint="other", status="200", tenant=t)
        for t in ("t0", "t1", "other")
    ]
    assert labels == [1, 1, 1]
    authorizer, metrics, keys = setup(CountingStore(), clock, resolver, tenant_label=False)
    metrics.tenant.enabled = False
    authorizer.check(CheckInput("GET", "/v1", {}))
    assert (
        value(
            metrics.registry, "extauthz_requests_total", endpoint="other", status="401", tenant=""
        )
        == 1
    )
