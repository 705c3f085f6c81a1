"""Prometheus metrics, on prometheus-client's own types and an injected registry (tests
use a fresh one).

Per-check counts and latencies are recorded where they happen; numbers components
already keep (key-cache hits, limit denials, queue depth and drops, reloads) are read
at scrape time by a collector, so the hot path does not pay for them twice. Labels are
bounded: `endpoint` is the policy's route rule (or "other"), `reason` comes from a fixed
table, and `tenant` can be switched off or capped (the rest report as "other"), so a
million junk keys never create a series.
"""

from __future__ import annotations

import importlib.metadata
import platform
import threading
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from extauthz.model import CheckInput, Decision

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)


def _version() -> str:
    try:
        return importlib.metadata.version("extauthz")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class TenantLabels:
    """The first ``cap`` tenants seen get their own label value; later ones "other"."""

    def __init__(self, enabled: bool, cap: int) -> None:
        self.enabled = enabled
        self.cap = cap
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, tenant_id: str) -> str:
        if not self.enabled:
            return ""
        if not tenant_id or tenant_id in self._seen:
            return tenant_id
        with self._lock:
            if len(self._seen) < self.cap:
                self._seen.add(tenant_id)
                return tenant_id
        return "other"


class Metrics:
    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        namespace: str = "extauthz",
        *,
        tenant_label: bool = True,
        tenant_cap: int = 1000,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.namespace = namespace
        ns, reg = namespace, self.registry
        self.tenant = TenantLabels(tenant_label, tenant_cap)
        self.requests = Counter(
            "requests",
            "Checks answered",
            ["endpoint", "status", "tenant"],
            namespace=ns,
            registry=reg,
        )
        self.latency = Histogram(
            "latency_seconds",
            "Time to decide a check",
            namespace=ns,
            registry=reg,
            buckets=LATENCY_BUCKETS,
        )
        self.active = Gauge(
            "active_requests", "Checks being decided now", namespace=ns, registry=reg
        )
        self.decisions = Counter(
            "decisions",
            "Decisions by result and reason",
            ["result", "reason"],
            namespace=ns,
            registry=reg,
        )
        self.check_duration = Histogram(
            "check_duration_seconds",
            "Time from request bytes to answer bytes, by transport",
            ["transport"],
            namespace=ns,
            registry=reg,
            buckets=LATENCY_BUCKETS,
        )
        self.store_errors = Counter(
            "store_errors",
            "Store operations that failed",
            ["operation"],
            namespace=ns,
            registry=reg,
        )
        self.store_latency = Histogram(
            "store_lookup_seconds",
            "Key lookups that reached the store",
            namespace=ns,
            registry=reg,
            buckets=LATENCY_BUCKETS,
        )
        self.revocation = Histogram(
            "revocation_propagation_seconds",
            "From a change to keys or tenants in the store to this server's cache dropping it",
            namespace=ns,
            registry=reg,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
        )
        self.build = Info("build", "extauthz build", namespace=ns, registry=reg)
        self.build.info({"version": _version(), "python": platform.python_version()})
        self._collector: SourcesCollector | None = None
        # Bounded like the labels themselves (routes x statuses x capped tenants).
        self._requests: dict[tuple[str, int, str], Any] = {}
        self._decisions: dict[tuple[bool, str], Any] = {}
        self.transport_duration = {t: self.check_duration.labels(t) for t in ("grpc", "http")}

    def observe(
        self, request: CheckInput, decision: Decision, endpoint: str, seconds: float
    ) -> None:
        """One decided check (called by the authorizer). Labelled children are cached:
        `.labels()` costs more than the increment itself."""
        principal = decision.principal
        tenant = self.tenant(principal.tenant_id) if principal is not None else ""
        key = (endpoint, decision.status, tenant)
        requests = self._requests.get(key)
        if requests is None:
            requests = self.requests.labels(endpoint, str(decision.status), tenant)
            self._requests[key] = requests
        requests.inc()
        outcome = (decision.allowed, decision.reason)
        decided = self._decisions.get(outcome)
        if decided is None:
            result = "allow" if decision.allowed else "deny"
            decided = self._decisions[outcome] = self.decisions.labels(result, decision.reason)
        decided.inc()
        self.latency.observe(seconds)

    def add_sources(self, **sources: Callable[[], Any]) -> None:
        """Numbers read at scrape time (see SourcesCollector)."""
        if self._collector is None:
            self._collector = SourcesCollector(self.registry, self)
        self._collector.sources.update(sources)


class SourcesCollector(Collector):
    """Exports counters and gauges that other components keep themselves."""

    def __init__(self, registry: CollectorRegistry, metrics: Metrics) -> None:
        self.ns = metrics.namespace
        self.metrics = metrics
        self.sources: dict[str, Callable[[], Any]] = {}
        registry.register(self)

    def describe(self) -> list[Any]:
        return []  # dynamic: families are produced at collect time

    def collect(self) -> Iterator[Any]:
        for name, read in list(self.sources.items()):
            yield from getattr(self, f"_{name}")(read())

    def _key_cache(self, stats: dict[str, int]) -> Iterator[Any]:
        family = CounterMetricFamily(
            f"{self.ns}_key_cache_lookups", "Key lookups by cache result", labels=["result"]
        )
        for result, count in sorted(stats.items()):
            family.add_metric([result], count)
        yield family

    def _limit_denials(self, stats: dict[tuple[str, str], int]) -> Iterator[Any]:
        family = CounterMetricFamily(
            f"{self.ns}_limit_denials",
            "Requests a limit refused (or would have, in shadow mode)",
            labels=["limit", "mode"],
        )
        for (mode, reason), count in sorted(stats.items()):
            family.add_metric([reason, "shadow" if mode == "shadow" else "enforced"], count)
        yield family

    def _queues(self, writers: dict[str, Any]) -> Iterator[Any]:
        ns = self.ns
        depth = GaugeMetricFamily(f"{ns}_queue_depth", "Records waiting", labels=["queue"])
        dropped = CounterMetricFamily(
            f"{ns}_queue_dropped",
            "Records lost: the queue was full and the spill file could not be written",
            labels=["queue"],
        )
        spilled = CounterMetricFamily(
            f"{ns}_queue_spilled",
            "Records kept on local disk (the queue was full or the store refused them)",
            labels=["queue"],
        )
        written = CounterMetricFamily(
            f"{ns}_queue_written", "Records written to the store", labels=["queue"]
        )
        failures = CounterMetricFamily(
            f"{ns}_queue_write_failures", "Batch writes that failed", labels=["queue"]
        )
        for name, writer in sorted(writers.items()):
            depth.add_metric([name], writer.pending)
            dropped.add_metric([name], writer.dropped)
            spilled.add_metric([name], writer.spilled)
            written.add_metric([name], writer.written)
            failures.add_metric([name], writer.failures)
        yield from (depth, dropped, spilled, written, failures)

    def _reloads(self, counts: dict[str, int]) -> Iterator[Any]:
        family = CounterMetricFamily(
            f"{self.ns}_policy_reloads", "Policy reloads by outcome", labels=["outcome"]
        )
        for outcome, count in sorted(counts.items()):
            family.add_metric([outcome], count)
        yield family

    def _policy(self, current: tuple[str, str]) -> Iterator[Any]:
        info = InfoMetricFamily(f"{self.ns}_policy", "The policy in force", labels=["source"])
        version, source = current
        info.add_metric([source], {"version": version})
        yield info

    def _quota_used(self, ratios: dict[str, float]) -> Iterator[Any]:
        family = GaugeMetricFamily(
            f"{self.ns}_quota_used_ratio",
            "Share of today's request quota used, per tenant (capped like tenant labels; "
            "'other' is the highest of the rest)",
            labels=["tenant"],
        )
        by_label: dict[str, float] = {}
        for tenant_id, ratio in ratios.items():
            label = self.metrics.tenant(tenant_id) or "all"
            by_label[label] = max(ratio, by_label.get(label, 0.0))
        for label, ratio in sorted(by_label.items()):
            family.add_metric([label], ratio)
        yield family

    def _in_flight(self, held: int) -> Iterator[Any]:
        yield GaugeMetricFamily(
            f"{self.ns}_concurrency_slots_held", "Concurrency slots held (leases)", value=held
        )

    def _degraded(self, state: tuple[bool, dict[str, int]]) -> Iterator[Any]:
        is_open, decisions = state
        yield GaugeMetricFamily(
            f"{self.ns}_counters_degraded",
            "1 while the shared counters are unreachable and tiers follow on_counters_down",
            value=1 if is_open else 0,
        )
        family = CounterMetricFamily(
            f"{self.ns}_degraded_decisions",
            "Decisions taken without the shared counters, by the tier's on_counters_down",
            labels=["mode"],
        )
        for mode, count in sorted(decisions.items()):
            family.add_metric([mode], count)
        yield family
