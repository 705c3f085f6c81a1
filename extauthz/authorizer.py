"""The decision core: request -> key -> tenant -> decision. No gRPC, no HTTP, no protobuf.

Phases, in order (each may end the request with a deny):
  1. refuse keys in the query string (they end up in logs and browser history);
     then a public route (policy) is allowed without a key, identity headers stripped;
  2. find exactly one key in the configured headers;
  3. check its format and checksum (no store access for junk);
  4. resolve it through the cache and the store: known, not revoked, not expired;
  5. check the tenant is active;
  6. apply the tier's limits (limits/gate.py), all at once, all or nothing;
  7. allow, with identity headers for the upstream, the key header removed and
     RateLimit headers for the client.

The policy is read once per request (``self.policy`` is swapped whole on reload).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time

from extauthz.apikeys import KeyResolver, Resolution
from extauthz.audit import AUTH_FAILURE, AUTH_SUCCESS, SECURITY_ALERT, AuditLogger, sampled
from extauthz.bruteforce import BruteForceGuard
from extauthz.errors import StoreError
from extauthz.keys import MAX_KEY_LEN
from extauthz.limits.gate import LimitGate
from extauthz.model import CheckInput, Decision, Principal, Tenant
from extauthz.policy import Policy, Route
from extauthz.reasons import REASONS, Reason, deny_decision
from extauthz.telemetry.metrics import Metrics
from extauthz.telemetry.tracing import CheckTracer

log = logging.getLogger("extauthz.authorizer")
__all__ = ["REASONS", "Authorizer", "Reason", "deny_decision"]
IDENTITY_HEADERS = ("x-tenant-id", "x-tenant-tier", "x-api-key-id")
MAX_CACHED_DECISIONS = 100_000


def _endpoint(route: Route | None) -> str:
    """The metrics label for a request's route: its policy rule, or "other" (a raw path
    would be a label per URL)."""
    if route is None:
        return "other"
    return route.path if route.path is not None else f"{route.prefix}*"


class Authorizer:
    def __init__(
        self,
        resolver: KeyResolver,
        key_headers: tuple[str, ...] = ("x-api-key", "authorization"),
        query_key_params: tuple[str, ...] = ("api_key", "apikey"),
        policy: Policy | None = None,
        *,
        gate: LimitGate | None = None,
        audit: AuditLogger | None = None,
        guard: BruteForceGuard | None = None,
        metrics: Metrics | None = None,
        tracer: CheckTracer | None = None,
    ) -> None:
        self.resolver = resolver
        self.key_headers = key_headers
        self.query_key_params = frozenset(query_key_params)
        self.policy = policy or Policy()
        self.gate = gate
        self.audit = audit
        self.guard = guard
        self.metrics = metrics
        self.tracer = tracer
        # A public path needs no key, but the upstream must still never see forged
        # identity headers or a key someone sent anyway. `authorization` is removed only
        # when it holds a Bearer token: other schemes there belong to the upstream.
        plain = tuple(h for h in key_headers if h != "authorization")
        self._public = Decision(True, 200, "public", remove_headers=IDENTITY_HEADERS + plain)
        self._public_bearer = Decision(
            True, 200, "public", remove_headers=IDENTITY_HEADERS + key_headers
        )
        # Deny answers never vary per request, so build each once.
        self.denials = {reason: deny_decision(reason, key_headers) for reason in REASONS}
        self._allowed: dict[tuple[str, str], Decision] = {}
        self._allowed_generation = -1
        # Parts of allow answers shared between keys (see _allow_answer).
        self._tenant_parts: dict[str, tuple[tuple[str, str], tuple[str, str]]] = {}
        self._removed: dict[str, tuple[str]] = {}

    def check(self, request: CheckInput) -> Decision:
        # One policy snapshot and one route match for the whole decision, its audit
        # events and its metrics (a reload mid-request must not mix two policies).
        policy = self.policy
        route = policy.route(request.path) if policy.routes else None
        tracer = self.tracer
        if tracer is None or not tracer.wants(request):
            return self._measured(request, policy, route)
        with tracer.span(request) as span:
            decision = self._measured(request, policy, route)
            tracer.finish(span, decision)
            return decision

    def _measured(self, request: CheckInput, policy: Policy, route: Route | None) -> Decision:
        metrics = self.metrics
        if metrics is None:
            return self._check(request, policy, route)
        started = time.perf_counter()
        decision = self._check(request, policy, route)
        metrics.observe(request, decision, _endpoint(route), time.perf_counter() - started)
        return decision

    def _check(self, request: CheckInput, policy: Policy, route: Route | None) -> Decision:
        if self.guard is not None:
            blocked = self.guard.blocked_for(request.source_address)
            if blocked > 0:
                if self.audit is not None:  # denials are never sampled
                    self.audit.event(
                        AUTH_FAILURE,
                        "denied",
                        reason="source_blocked",
                        request_id=request.request_id[:128],
                        trace_id=request.trace_id,
                        source=request.source_address[:64],
                        policy_version=policy.version,
                    )
                return self._blocked(blocked)
        decision = self._decide(request, policy, route)
        if not decision.allowed and log.isEnabledFor(logging.DEBUG):
            # Never the key, the query string or the Authorization header: only facts.
            log.debug(
                "deny reason=%s status=%d path=%s source=%s request_id=%s",
                decision.reason,
                decision.status,
                request.path.split("?", 1)[0][:200],
                request.source_address,
                request.request_id[:64],
            )
        if self.audit is not None and decision.reason != "public":
            return self._audited(request, decision, policy)
        return decision

    def _audited(self, request: CheckInput, decision: Decision, policy: Policy) -> Decision:
        """Audit the outcome: every refused credential (and brute-force alerts). Limit
        denials are audited by the gate; allowed requests (policy ``audit.allowed``) when
        Envoy reports them finished, or here with ``audit_blocking``, where "no audit, no
        allow" needs the event written before the answer."""
        audit = self.audit
        if audit is None:
            return decision
        principal = decision.principal
        if decision.allowed:
            if audit.blocking and sampled(policy.audit.allowed):
                ok = audit.event(
                    AUTH_SUCCESS,
                    "success",
                    tenant_id=principal.tenant_id if principal else "",
                    key_id=principal.key_id if principal else "",
                    request_id=request.request_id[:128],
                    trace_id=request.trace_id,
                    source=request.source_address[:64],
                    policy_version=policy.version,
                )
                if not ok:
                    return self.denials["audit_unavailable"]
            return decision
        if decision.status not in (401, 403):
            return decision
        key_id = principal.key_id if principal else ""
        audit.event(
            AUTH_FAILURE,
            "denied",
            tenant_id=principal.tenant_id if principal else "",
            key_id=key_id,
            reason=decision.reason,
            request_id=request.request_id[:128],
            trace_id=request.trace_id,
            source=request.source_address[:64],
            policy_version=policy.version,
        )
        if self.guard is not None:
            rules = policy.security
            for kind, value in self.guard.failed(request.source_address, key_id, rules):
                log.warning(
                    "brute force: %d auth failures for %s %s", rules.max_auth_failures, kind, value
                )
                audit.event(
                    SECURITY_ALERT,
                    "blocked" if kind == "source" and rules.block_seconds else "alert",
                    # A key's alert goes to its tenant (and the tenant's webhook).
                    tenant_id=principal.tenant_id if principal and kind == "key_id" else "",
                    key_id=value if kind == "key_id" else "",
                    source=value if kind == "source" else "",
                    reason="brute_force",
                    policy_version=policy.version,
                    detail={
                        "failures": rules.max_auth_failures,
                        "window_seconds": rules.window_seconds,
                        "blocked_seconds": rules.block_seconds if kind == "source" else 0,
                    },
                )
        return decision

    def _blocked(self, seconds: float) -> Decision:
        retry = str(max(1, math.ceil(seconds)))
        base = self.denials["source_blocked"]
        body = json.loads(base.body)
        body["retry_after"] = int(retry)
        return Decision(
            False,
            429,
            "source_blocked",
            base.message,
            client_headers=(*base.client_headers, ("retry-after", retry)),
            body=json.dumps(body).encode(),
            reusable=False,
        )

    def _decide(self, request: CheckInput, policy: Policy, route: Route | None) -> Decision:
        if self.query_key_params and "?" in request.path and self._key_in_query(request.path):
            return self.denials["key_in_query"]
        cost = 1
        if route is not None:
            if route.public:
                return self._public_bearer if self._has_bearer(request) else self._public
            cost = route.cost
        found = self._find_keys(request)
        if isinstance(found, str):
            return self.denials[found]
        header, presented = found
        result = self._resolve(presented)
        if isinstance(result, Decision):
            return result
        key, tenant = result.key, result.tenant
        if key is None or tenant is None:  # resolve() always sets both on success
            return self.denials["internal_error"]
        # The same key through the same header always gets the same answer until the
        # cache is dropped, so build it once (transports also cache its encoding).
        allowed = self._allowed_now()
        decision = allowed.get((key.key_id, header))
        if decision is None:
            decision = self._allow_answer(key.key_id, tenant, header)
            if len(allowed) < MAX_CACHED_DECISIONS:
                allowed[(key.key_id, header)] = decision
        if self.gate is None:
            return decision
        final = self.gate.apply(decision, request, policy, cost)
        return self.denials[final] if isinstance(final, str) else final

    def _allow_answer(self, key_id: str, tenant: Tenant, header: str) -> Decision:
        """The allow answer for one key, built once per key. Its parts that depend only on
        the tenant or the header are shared between keys: with 100,000 keys cached,
        every tuple per key is megabytes."""
        tenant_part = self._tenant_parts.get(tenant.id)
        if tenant_part is None:
            tenant_part = (("x-tenant-id", tenant.id), ("x-tenant-tier", tenant.tier.value))
            self._tenant_parts[tenant.id] = tenant_part
        return Decision(
            allowed=True,
            status=200,
            reason="ok",
            principal=Principal(tenant.id, tenant.tier, key_id),
            upstream_headers=(*tenant_part, ("x-api-key-id", key_id)),
            remove_headers=self._removed.setdefault(header, (header,)),
        )

    def _resolve(self, presented: str) -> Resolution | Decision:
        """The key's resolution, or the deny answer for a key that is not valid."""
        try:
            result = self.resolver.resolve(presented)
        except StoreError as exc:
            # Fail closed: without the store we cannot tell a revoked key from a good one.
            log.warning("store lookup failed, denying with 503: %s", exc)
            if self.metrics is not None:
                self.metrics.store_errors.labels("lookup").inc()
            return self.denials["store_unavailable"]
        if result.reason is None:
            return result
        if result.key is None or result.tenant is None:
            return self.denials[result.reason]
        # A known key (revoked, expired, suspended tenant): the audit names it.
        return dataclasses.replace(
            self.denials[result.reason],
            principal=Principal(result.tenant.id, result.tenant.tier, result.key.key_id),
            reusable=False,
        )

    def _allowed_now(self) -> dict[tuple[str, str], Decision]:
        generation = self.resolver.generation
        if generation != self._allowed_generation:
            # A new dict, not clear(): a thread still holding the old one cannot put a
            # stale answer into the new generation.
            self._allowed, self._allowed_generation = {}, generation
            self._tenant_parts = {}  # a tenant's tier may have changed
        return self._allowed

    def _has_bearer(self, request: CheckInput) -> bool:
        if "authorization" not in self.key_headers:
            return False
        value = request.headers.get("authorization")
        values = value if isinstance(value, tuple) else (value or "",)
        return any(v.lstrip().lower().startswith("bearer") for v in values)

    def _key_in_query(self, path: str) -> bool:
        query = path.split("?", 1)[1].split("#", 1)[0]
        for pair in query.split("&"):
            name = pair.split("=", 1)[0].lower()
            if name in self.query_key_params:
                return True
        return False

    def _find_keys(self, request: CheckInput) -> tuple[str, str] | str:
        """The one (header, key) pair, or a deny reason."""
        found: list[tuple[str, str]] = []
        for header in self.key_headers:
            raw = request.headers.get(header)
            if raw is None:
                continue
            values = raw if isinstance(raw, tuple) else (raw,)
            for value in values:
                if len(value) > 4 * MAX_KEY_LEN:
                    return "malformed_key"  # capped before any parsing, hashing or logging
                # Envoy joins repeated headers with ',', which no key contains.
                for part in value.split(","):
                    token = self._token(header, part.strip())
                    if token is not None:
                        found.append((header, token))
        if not found:
            return "missing_key"
        if len(found) > 1:
            return "multiple_keys"
        return found[0]

    @staticmethod
    def _token(header: str, value: str) -> str | None:
        if header != "authorization":
            return value or None
        scheme, _, token = value.partition(" ")
        # Other schemes (Basic, Digest) belong to the upstream; they are not our keys.
        if scheme.lower() != "bearer":
            return None
        return token.strip() or ""
