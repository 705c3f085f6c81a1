"""Composition root: Settings -> store, pepper, counters, audit, managers -> Authorizer.

The Runtime is what both the CLI and the server build; sidecar.py runs it as a server.
"""

from __future__ import annotations

import getpass
import hmac
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from opentelemetry import trace as otel_trace

from extauthz.apikeys import APIKeyManager, KeyResolver
from extauthz.audit import LIMITS_DEGRADED, AuditLogger
from extauthz.auditchain import AuditChain, audit_key
from extauthz.authorizer import Authorizer
from extauthz.bruteforce import BruteForceGuard
from extauthz.clock import SYSTEM_CLOCK, Clock
from extauthz.errors import ConfigError, ExtauthzError, UnknownTenantError
from extauthz.keys import Pepper, check_prefix, shown
from extauthz.limits.base import Counters
from extauthz.limits.degraded import GuardedCounters
from extauthz.limits.gate import LimitGate
from extauthz.limits.memory import MemoryCounters
from extauthz.limits.quota import QuotaJournal, TenantQuota, quota_window
from extauthz.policy import Policy, load_policy
from extauthz.settings import REDIS_SCHEMES, Settings
from extauthz.store import Store, open_store
from extauthz.telemetry.metrics import Metrics
from extauthz.telemetry.tracing import CheckTracer, make_provider
from extauthz.tenants import TenantManager
from extauthz.usage import UsageTracker

if TYPE_CHECKING:
    from extauthz.limits.redis import RedisCounters

log = logging.getLogger("extauthz")


def _redis_counters() -> type[RedisCounters]:
    """The Redis counters class; a clear error when the redis extra is not installed."""
    try:
        from extauthz.limits.redis import RedisCounters
    except ImportError as exc:
        raise ConfigError(
            f"counters_url redis://... needs the Redis client ({exc.name} is not "
            "installed): pip install 'extauthz[redis]'"
        ) from None
    return RedisCounters


def load_pepper(settings: Settings) -> Pepper:
    if settings.pepper:
        return Pepper.from_hex(settings.pepper, "EXTAUTHZ_PEPPER")
    return Pepper.load(settings.pepper_path)


def open_secured(settings: Settings) -> tuple[Store, Pepper, bool]:
    """Open the store and the pepper, creating the pepper file if this is a new
    deployment, and refuse a pepper that is not the one the database's keys were made
    with (every key would silently become unknown). Returns (store, pepper, created)."""
    store = open_store(settings.db_url, timeout=settings.store_timeout)
    try:
        check_name = "pepper_check_v1"
        created = False
        if not settings.pepper and not settings.pepper_path.exists():
            if store.get_meta(check_name) is not None:
                raise ConfigError(
                    f"pepper file {settings.pepper_path} does not exist, but the database "
                    f"{settings.db_url} holds keys made with a pepper: restore the file or "
                    "set EXTAUTHZ_PEPPER (a new pepper would invalidate every key)"
                )
            created = Pepper.create(settings.pepper_path)
        pepper = load_pepper(settings)
        stored = store.setdefault_meta(check_name, pepper.fingerprint())
        if not hmac.compare_digest(stored, pepper.fingerprint()):
            source = "EXTAUTHZ_PEPPER" if settings.pepper else str(settings.pepper_path)
            raise ConfigError(
                f"the pepper from {source} is not the one the database {settings.db_url} "
                "was initialised with: every key would be refused"
            )
    except BaseException:
        store.close()
        raise
    return store, pepper, created


def admin_actor() -> str:
    """Who is at the keyboard, for admin actions in the audit: ``admin:<os user>``."""
    try:
        return "admin:" + getpass.getuser()
    except (KeyError, OSError):
        return "admin"


def init(settings: Settings) -> dict[str, object]:
    """Create the pepper file (0600) and the database schema. Safe to run again."""
    store, _, created = open_secured(settings)
    try:
        version = store.schema_version()
    finally:
        store.close()
    return {
        "pepper_file": None if settings.pepper else str(settings.pepper_path),
        "pepper_created": created,
        "database_url": settings.db_url,
        "schema_version": version,
    }


@dataclass
class Runtime:
    """Everything built from settings that both the CLI and the server use."""

    settings: Settings
    store: Store
    clock: Clock
    resolver: KeyResolver
    keys: APIKeyManager
    tenants: TenantManager
    counters: Counters
    journal: QuotaJournal | None  # memory counters' durable copy; Redis keeps its own
    audit: AuditLogger
    usage: UsageTracker
    policy: Policy
    guard: BruteForceGuard
    metrics: Metrics
    tracer: CheckTracer | None = None

    @classmethod
    def open(cls, settings: Settings, clock: Clock = SYSTEM_CLOCK) -> Runtime:
        check_prefix(settings.key_prefix)
        policy = Policy()
        if settings.policy_file is not None:
            policy = load_policy(settings.policy_file)
            for notice in policy.notices:
                log.warning("policy: %s", notice)
        # Before the store opens: a bad exporter setting must not leave it open.
        provider = make_provider(settings.trace_exporter, settings.trace_sample_ratio)
        # On first use this creates the pepper: the embedded default needs no setup step.
        store, pepper, _ = open_secured(settings)
        # The audit chain's key comes from the pepper: it never sits in the database.
        store.audit_chain = AuditChain(audit_key(pepper.secret))
        resolver = KeyResolver(
            store,
            pepper,
            clock,
            prefix=settings.key_prefix,
            ttl=settings.key_cache_ttl,
            negative_ttl=settings.key_cache_negative_ttl,
            size=settings.key_cache_size,
            max_stale=settings.key_cache_max_stale,
        )
        actor = admin_actor()
        keys = APIKeyManager(
            store, pepper, clock, prefix=settings.key_prefix, resolver=resolver, actor=actor
        )
        counters: Counters
        journal = None
        try:
            if settings.counters_url.startswith(REDIS_SCHEMES):
                counters = GuardedCounters(
                    _redis_counters()(
                        settings.counters_url, settings.lease_ttl, timeout=settings.counters_timeout
                    ),
                    clock,
                    replicas=settings.replicas,
                    lease_ttl=settings.lease_ttl,
                    # Failures closer together than this are one stall (degraded.py).
                    window=max(2 * settings.counters_timeout, 0.1),
                )
            else:
                counters = MemoryCounters(clock, settings.lease_ttl)
                journal = QuotaJournal(store, counters)
                journal.load(quota_window(clock.now(), policy.timezone)[0])
        except BaseException:
            store.close()
            raise
        # What the store cannot take yet waits here, on this host (records.py).
        spill_dir = settings.data_dir / "spill"
        audit = AuditLogger(
            store,
            clock,
            interval=settings.flush_interval,
            blocking=settings.audit_blocking,
            spill_dir=spill_dir,
        )
        runtime = cls(
            settings,
            store,
            clock,
            resolver,
            keys,
            TenantManager(store, clock, actor=actor),
            counters,
            journal,
            audit,
            UsageTracker(
                store, clock, Policy, interval=settings.flush_interval, spill_dir=spill_dir
            ),
            policy,
            BruteForceGuard(clock),
            Metrics(
                namespace=settings.metrics_namespace,
                tenant_label=settings.metrics_tenant_label,
                tenant_cap=settings.metrics_tenant_cap,
            ),
        )
        if provider is not None:
            runtime.tracer = CheckTracer(provider, settings.trace_sample_ratio)
            # Also the global provider, for the seed-style `trace_function` decorator.
            otel_trace.set_tracer_provider(provider)
        if isinstance(counters, GuardedCounters):
            counters.on_change = runtime._counters_degraded
        resolver.on_change = runtime.metrics.revocation.observe
        resolver.on_lookup = runtime.metrics.store_latency.observe
        runtime.usage.policy = lambda: runtime.policy  # follows reloads
        return runtime

    def _counters_degraded(self, started: bool, decisions: dict[str, int]) -> None:
        """Audit when degraded mode starts, and when it ends with what it decided."""
        self.audit.event(
            LIMITS_DEGRADED,
            "started" if started else "ended",
            actor="system",
            reason="counters_unreachable",
            detail={"decisions": decisions} if not started else None,
        )

    def authorizer(self) -> Authorizer:
        if self.settings.policy_file is not None:
            log.info("policy version %s from %s", self.policy.version, self.settings.policy_file)
        return Authorizer(
            self.resolver,
            self.settings.key_headers,
            self.settings.query_key_params,
            self.policy,
            gate=LimitGate(self.counters, self.clock, self.audit),
            audit=self.audit,
            guard=self.guard,
            metrics=self.metrics if self.metrics_on else None,
            tracer=self.tracer,
        )

    @property
    def metrics_on(self) -> bool:
        """EXTAUTHZ_METRICS_ADDR=off also stops recording them on the hot path."""
        return self.settings.metrics_addr.lower() not in ("", "off")

    def quota(self, tenant_id: str) -> TenantQuota:
        """The seed's quota API for one tenant (is_within_quota, record_usage, ...)."""
        tenant = self.tenants.get_tenant(tenant_id)
        if tenant is None:
            raise UnknownTenantError(f"no tenant {shown(tenant_id)}")
        return TenantQuota(tenant.id, tenant.tier, self.counters, lambda: self.policy, self.clock)

    def flush(self) -> None:
        """Write daily counts, audit events and usage records now (the server does this
        every flush_interval). All are tried; what fails stays queued for the next
        flush, and the error is raised."""
        try:
            if self.journal is not None:
                self.journal.flush()
        finally:
            try:
                self.audit.flush()
            finally:
                self.usage.flush()

    def close(self) -> None:
        try:
            self.flush()
        except ExtauthzError as exc:
            log.error("could not write daily counts / audit events on close: %s", exc)
        self.counters.close()
        self.store.close()
