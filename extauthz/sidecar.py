"""The running server: the Sidecar (Check over gRPC and/or HTTP, the access-log
receiver, health and metrics), started and stopped in order. Its background work is in
upkeep.py; the signals that stop it or reload its policy, in signals.py.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import HealthServicer

from extauthz.addresses import parse_hostport
from extauthz.app import Runtime
from extauthz.audit import SECURITY_ALERT, sampled
from extauthz.errors import ConfigError, ExtauthzError
from extauthz.limits.base import Release
from extauthz.limits.degraded import GuardedCounters
from extauthz.model import Completion
from extauthz.reload import PolicyWatcher
from extauthz.transport.als import AccessLogReceiver
from extauthz.transport.fluentd import FluentdReceiver
from extauthz.transport.grpc_authz import SERVICE as GRPC_SERVICE
from extauthz.transport.grpc_authz import GrpcAuthz, GrpcServer
from extauthz.transport.http_authz import GREENLETS, INLINE, THREADS, HttpAuthzThread
from extauthz.transport.ops import OpsServer
from extauthz.upkeep import Upkeep
from extauthz.usage import completed, incomplete
from extauthz.webhooks import WebhookDispatcher

log = logging.getLogger("extauthz")


def _nothing() -> None:
    pass


def http_waits(runtime: Runtime) -> str:
    """Where HTTP-service checks wait (transport/http_authz.py): inline unless they make
    network round trips (Redis counters, a PostgreSQL store)."""
    if not (runtime.counters.remote or runtime.store.remote):
        return INLINE
    return THREADS if runtime.settings.audit_blocking else GREENLETS


class Sidecar:
    """The running authorization service: gRPC Check and/or the HTTP-service endpoint,
    the access-log receiver, and upkeep. Both transports share one Authorizer (one
    cache, one store, one set of counters)."""

    def __init__(self, runtime: Runtime, mode: str | None = None) -> None:
        self.runtime = runtime
        self.mode = mode or runtime.settings.mode
        self.authorizer = runtime.authorizer()
        self.watcher: PolicyWatcher | None = None
        if runtime.settings.policy_file is not None:
            self.watcher = PolicyWatcher(
                runtime.settings.policy_file, (self.authorizer, runtime), runtime.audit
            )
        self.webhooks = WebhookDispatcher(runtime.store, lambda: runtime.policy)
        self.upkeep = Upkeep(runtime, self.watcher, self.webhooks)
        self.als = AccessLogReceiver(self._finished, runtime.settings.usage_headers)
        self.grpc: GrpcServer | None = None
        self.als_server: GrpcServer | None = None
        self.fluentd: FluentdReceiver | None = None
        self.http: HttpAuthzThread | None = None
        self.ops: OpsServer | None = None
        self.health: HealthServicer | None = None
        self.started = False
        self._unsubscribe: Callable[[], None] | None = None
        self.ports: dict[str, int] = {}
        metrics = runtime.metrics
        metrics.add_sources(
            key_cache=lambda: dict(runtime.resolver.stats),
            limit_denials=lambda: dict(self.authorizer.gate.stats) if self.authorizer.gate else {},
            queues=lambda: {"audit": runtime.audit.writer, "usage": runtime.usage.writer},
            reloads=lambda: {
                "success": self.watcher.reloads if self.watcher else 0,
                "failure": self.watcher.failures if self.watcher else 0,
            },
            policy=lambda: (
                runtime.policy.version,
                str(runtime.settings.policy_file or "builtin"),
            ),
            in_flight=runtime.counters.leases_held,
            degraded=lambda: (
                (runtime.counters.breaker.is_open, dict(runtime.counters.degraded))
                if isinstance(runtime.counters, GuardedCounters)
                else (False, {})
            ),
            quota_used=lambda: (
                dict(self.authorizer.gate.quota_used) if self.authorizer.gate else {}
            ),
        )

    def _ready(self) -> dict[str, tuple[bool, str]]:
        try:
            self.runtime.store.revision()
            store = (True, self.runtime.store.url.split("://", 1)[0])
        except ExtauthzError as exc:
            store = (False, str(exc))
        counters = self.runtime.counters
        degraded = isinstance(counters, GuardedCounters) and counters.breaker.is_open
        return {
            "store": store,
            # Still ready while degraded: every tier has an answer (on_counters_down).
            "counters": (True, counters.url.split("://", 1)[0] + (" degraded" if degraded else "")),
            "policy": (True, self.runtime.policy.version),
            "transports": (self.started, ", ".join(sorted(self.ports)) or "none"),
        }

    def _finished(self, batch: list[Completion]) -> None:
        """Access-log entries: free the slots, settle the tokens, bill the requests."""
        runtime = self.runtime
        settled_all = runtime.counters.release_many(
            [Release(d.request_id, d.tokens, d.tenant_id) for d in batch]
        )
        # Denied, public, or reported already: nothing to bill (again).
        billed = [(d, s) for d, s in zip(batch, settled_all, strict=True) if s is not None]
        if not billed:
            return
        runtime.usage.add_many([completed(s, d) for d, s in billed])
        # One event per audited allowed request, written here at its end, unless
        # audit_blocking wrote it at the check (before the answer).
        audit = runtime.audit
        share = 0.0 if audit.blocking else runtime.policy.audit.allowed
        if not share:
            return
        for done, settled in billed:
            if sampled(share):
                audit.log_api_request(
                    settled.tenant_id,
                    settled.route,
                    settled.method,
                    done.status,
                    key_id=settled.key_id,
                    request_id=done.request_id[:128],
                    policy_version=runtime.policy.version,
                    detail={
                        "check": "allowed",
                        "latency_ms": round(done.latency_ms, 3),
                        "tokens": done.tokens if done.tokens is not None else settled.reserved,
                    },
                )

    def start(
        self,
        grpc_addr: str | None = None,
        http_addr: str | None = None,
        als_addr: str | None = None,
        metrics_addr: str | None = None,
    ) -> dict[str, int]:
        """Bind and start; returns the bound ports, e.g. ``{"grpc_port": 9001, ...}``."""
        settings = self.runtime.settings
        try:
            if self.mode in ("grpc", "both"):
                addr = grpc_addr or settings.grpc_addr
                self.grpc = GrpcServer.for_checks(
                    GrpcAuthz(self.authorizer, self.authorizer.metrics), settings.grpc_workers
                )
                self.health = self.grpc.add_health()
                self.ports["grpc_port"] = self.grpc.bind(addr)
            if self.mode in ("http", "both", "bridge"):
                host, port = parse_hostport(http_addr or settings.http_addr, "http address")
                self.http = HttpAuthzThread(
                    self.authorizer,
                    self.authorizer.metrics,
                    waits=http_waits(self.runtime),
                    bridge=self.mode == "bridge",
                )
                self.ports["http_port"] = self.http.start(host, port)
            # One thread per open stream (Envoy opens one per worker thread), apart from
            # the Check threads; beyond 64 streams grpcio refuses with RESOURCE_EXHAUSTED.
            if settings.access_log == "fluentd":
                host, port = parse_hostport(als_addr or settings.als_addr, "access-log address")
                # On the HTTP service's loop when its checks never wait on the network.
                shared = self.http.loop if self.http and self.http.server.waits == INLINE else None
                self.fluentd = FluentdReceiver(self._finished, settings.usage_headers, shared)
                self.ports["als_port"] = self.fluentd.start(host, port)
            else:
                self.als_server = GrpcServer([self.als.handler()], workers=64)
                self.ports["als_port"] = self.als_server.bind(als_addr or settings.als_addr)
            if self.runtime.metrics_on:
                host, port = parse_hostport(metrics_addr or settings.metrics_addr, "metrics")
                self.ops = OpsServer(self.runtime.metrics.registry, self._ready)
                self.ports["metrics_port"] = self.ops.start(host, port)
        except OSError as exc:
            self._stop_transports(0)
            raise ConfigError(
                f"{exc} (see EXTAUTHZ_GRPC_ADDR / EXTAUTHZ_HTTP_ADDR / EXTAUTHZ_ALS_ADDR)"
            ) from None
        self.runtime.resolver.refresh()
        self._check_counters()
        # Pushed changes (PostgreSQL NOTIFY) drop the cache at once; polling stays.
        self._unsubscribe = self.runtime.store.subscribe(self._store_changed)
        self._verify_audit_tail()
        self.runtime.audit.start()
        self.runtime.usage.start()
        self.webhooks.start()
        self.upkeep.start()
        for server in (self.grpc, self.als_server):
            if server is not None:
                server.start()
        if self.health is not None:
            for service in ("", GRPC_SERVICE):
                self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self.started = True
        for name, port in self.ports.items():
            log.info("%s listening on port %d", name.split("_")[0], port)
        return self.ports

    def _check_counters(self) -> None:
        """Say at start, not at the first request, that the shared counters are out of
        reach, and what each tier gets meanwhile (serving goes on: it is degraded mode)."""
        try:
            self.runtime.counters.ping()
        except ExtauthzError as exc:
            modes = ", ".join(
                f"{tier.value} {limits.on_counters_down}"
                for tier, limits in self.runtime.policy.tiers.items()
            )
            log.warning(
                "%s; until they answer each tier follows its on_counters_down (%s: "
                "fail_closed answers 503 limits_unavailable, fail_open allows without "
                "limits, local uses this replica's own share)",
                exc,
                modes,
            )

    def _store_changed(self) -> None:
        try:
            self.runtime.resolver.refresh()
        except ExtauthzError as exc:
            log.warning("store change notification: refresh failed: %s", exc)

    def _verify_audit_tail(self, rows: int = 1000) -> None:
        """Check the newest rows and the signed head before serving: a log edited or cut
        short while we were down is reported at once (and audited), not at the next
        `audit verify`. Serving goes on: refusing traffic would not undo the edit."""
        audit = self.runtime.audit
        head = self.runtime.store.audit_head()
        first = max(1, head.seq - rows + 1) if head is not None else None
        result = audit.verify(first=first) if first is not None else audit.verify()
        if result.ok:
            log.info("audit chain tail verified (%d rows)", result.checked)
            return
        log.critical("audit chain verification failed: %s", result.problem)
        audit.event(
            SECURITY_ALERT,
            "alert",
            actor="system",
            reason="audit_chain_broken",
            detail={"problem": str(result.problem)},
        )

    def reload_policy(self) -> None:
        """Ask for a policy reload (SIGHUP); upkeep does it within revocation_poll."""
        if self.watcher is None:
            log.warning(
                "SIGHUP: no policy file configured (EXTAUTHZ_POLICY_FILE), nothing to reload"
            )
            return
        self.watcher.requested.set()

    def _stop_transports(self, grace: float) -> None:
        self.started = False
        if self.health is not None:
            self.health.enter_graceful_shutdown()
        if self.grpc is not None:
            self.grpc.stop(grace)
        # Entries for the checks just answered may still be in flight from Envoy.
        linger = min(grace, 0.5)
        fluentd = self.fluentd
        if self.http is not None:
            # A fluentd receiver on the HTTP loop closes before that loop ends.
            then = None
            if fluentd is not None and fluentd.shared:
                then = functools.partial(fluentd.close, linger)
            self.http.stop(grace, then)
        if self.als_server is not None:
            self.als_server.stop(linger)
        if fluentd is not None:
            fluentd.stop(linger)

    def stop(self) -> None:
        grace = self.runtime.settings.shutdown_grace
        log.info("stopping: answering in-flight checks (up to %.1fs)", grace)
        self._stop_transports(grace)
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self.upkeep.is_alive():
            self.upkeep.stop()
        # Leases still open will never be reported: bill them as incomplete, however
        # many there are (straight to the store, or kept on disk for the next start).
        counters = self.runtime.counters
        ended = []
        for source in (counters.drain_expired, counters.end_leases):
            try:
                ended += source()
            except ExtauthzError as exc:
                log.warning("could not read the open leases from the counters: %s", exc)
        if ended:
            log.info("billing %d open requests as incomplete", len(ended))
        self.runtime.usage.add_now([incomplete(settled) for settled in ended])
        runtime = self.runtime
        runtime.audit.log_incomplete(ended, runtime.policy.audit.allowed, runtime.policy.version)
        for name, close in (
            ("audit events", self.runtime.audit.close),
            ("usage records", self.runtime.usage.close),
            ("daily counts", self.runtime.journal.flush if self.runtime.journal else _nothing),
        ):
            try:
                close()
            except ExtauthzError as exc:
                log.error("could not write %s on stop: %s", name, exc)
        self.webhooks.close()
        if self.runtime.tracer is not None:
            self.runtime.tracer.shutdown()  # exports the spans still buffered
        if self.ops is not None:
            self.ops.stop()
        log.info("stopped")
