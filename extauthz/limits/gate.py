"""The limits phase of a decision: after the key and tenant are known, apply the tier's
limits (token cap, buckets, daily quota, concurrency) all at once, and turn the verdict
into the answer: allow with RateLimit headers, or 400/429 with the limit named.

Shadow mode (per tier or tenant) answers allow where it would deny: the would-deny is
logged, counted and audited, and nothing is charged (all or nothing, as for a deny).
"""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter

from extauthz.audit import QUOTA_EXCEEDED, RATE_LIMITED, AuditLogger
from extauthz.clock import SYSTEM_CLOCK, Clock
from extauthz.errors import StoreError
from extauthz.limits.base import CONCURRENT, DAY, KEY_RATE, RATE, TOKENS_DAY, Ask, Counters
from extauthz.limits.declared import INVALID, declared_tokens
from extauthz.limits.headers import allow_headers, deny_headers, whole_seconds
from extauthz.limits.quota import QuotaCalendar
from extauthz.model import CheckInput, Decision, Principal
from extauthz.policy import Limits, Policy
from extauthz.reasons import REASONS

log = logging.getLogger("extauthz.limits")

# Verdict.denied_by -> the deny reason clients see (REASONS in authorizer.py).
REASON_OF = {
    RATE: "rate_limited",
    KEY_RATE: "rate_limited",
    DAY: "daily_quota_exceeded",
    TOKENS_DAY: "daily_quota_exceeded",
    CONCURRENT: "concurrency_limit",
}
CAP_REASON = "token_limit_exceeded"
UNAVAILABLE = "limits_unavailable"


class LimitGate:
    def __init__(
        self,
        counters: Counters,
        clock: Clock = SYSTEM_CLOCK,
        audit: AuditLogger | None = None,
    ) -> None:
        self.counters = counters
        self.clock = clock
        self.audit = audit
        self.calendar = QuotaCalendar()
        self.throttle = Throttle(clock)
        # ("deny" | "shadow", reason) -> count; the metrics issue exports these.
        self.stats: Counter[tuple[str, str]] = Counter()
        # tenant -> share of today's request quota used, as of its last allowed request.
        self.quota_used: dict[str, float] = {}
        self._stats_lock = threading.Lock()

    def apply(
        self, allowed: Decision, request: CheckInput, policy: Policy, cost: int
    ) -> Decision | str:
        """The final decision for an identified request, or a plain deny reason."""
        principal = allowed.principal
        if principal is None:
            return allowed
        limits = policy.limits_for(principal.tenant_id, principal.tenant_tier)
        tokens = declared_tokens(request.headers, request.body, policy.tokens)
        if isinstance(tokens, str):
            return INVALID
        if tokens > limits.tokens_per_request:
            message = (
                f"This request declares {tokens} tokens; the tier allows at most "
                f"{limits.tokens_per_request} per request."
            )
            denial = _denial(principal, CAP_REASON, 400, message, ())
            return self._refuse(
                allowed, denial, request, limits=limits, policy=policy, reason=CAP_REASON
            )
        now = self.clock.now()
        day, day_ends_in = self.calendar.day(now, policy.timezone)
        try:
            verdict = self.counters.acquire(
                Ask(
                    principal.tenant_id,
                    principal.key_id,
                    request.request_id,
                    limits,
                    day,
                    cost,
                    tokens,
                    request.path.split("?", 1)[0][:256],
                    request.method[:16],
                    limits.cost_per_1k_tokens,
                    now,
                )
            )
        except StoreError as exc:
            # Shared counters down and the tier fails closed (or no guard around them).
            held = self.throttle.admit(("limits_unavailable",))
            if held is not None:
                log.warning("limits unavailable, 503 (%d more since the last line): %s", held, exc)
            return UNAVAILABLE
        if verdict.allowed:
            if verdict.degraded:
                return allowed  # fail_open: nothing was counted, so no RateLimit headers
            if limits.requests_per_day and len(self.quota_used) < 100_000:
                self.quota_used[principal.tenant_id] = (
                    verdict.requests_today / limits.requests_per_day
                )
            headers = allow_headers(limits, verdict.rate_left, verdict.requests_today, day_ends_in)
            return allowed.with_client_headers(headers)
        by = verdict.denied_by or RATE
        reason = REASON_OF[by]
        retry = whole_seconds(day_ends_in if by in (DAY, TOKENS_DAY) else verdict.retry_after)
        denial = _denial(
            principal, reason, 429, None, deny_headers(limits, by, retry), retry_after=retry
        )
        return self._refuse(
            allowed, denial, request, limits=limits, policy=policy, reason=reason, by=by
        )

    def _refuse(
        self,
        allowed: Decision,
        denial: Decision,
        request: CheckInput,
        *,
        limits: Limits,
        policy: Policy,
        reason: str,
        by: str = "",
    ) -> Decision:
        outcome = "shadow" if limits.shadow else "denied"
        with self._stats_lock:
            self.stats[(outcome, reason)] += 1
        principal = allowed.principal
        if principal is None:  # apply() only gets here with an identified request
            return denial
        if self.audit is not None:  # every denial, never sampled
            self.audit.event(
                QUOTA_EXCEEDED if reason == "daily_quota_exceeded" else RATE_LIMITED,
                outcome,
                tenant_id=principal.tenant_id,
                key_id=principal.key_id,
                reason=reason,
                request_id=request.request_id[:128],
                trace_id=request.trace_id,
                source=request.source_address[:64],
                policy_version=policy.version,
                detail={"limit": by or reason},
            )
        # Logged at most once per tenant, reason and second: a tenant hammering a limit
        # in shadow mode must not flood the log (the audit has every one).
        if limits.shadow:
            held = self.throttle.admit((principal.tenant_id, reason))
            if held is not None:
                log.info(
                    "shadow: would deny reason=%s tenant=%s key_id=%s (%d unlogged since the last)",
                    reason,
                    principal.tenant_id,
                    principal.key_id,
                    held,
                )
        return allowed if limits.shadow else denial


def _denial(
    principal: Principal,
    reason: str,
    status: int,
    message: str | None,
    headers: tuple[tuple[str, str], ...],
    *,
    retry_after: int | None = None,
) -> Decision:
    """A limit's deny answer. It names who was refused (metrics, traces), as an allow
    does."""
    text = message or REASONS[reason].message
    body: dict[str, object] = {"error": reason, "message": text}
    if retry_after is not None:
        body["retry_after"] = retry_after
    client = (("content-type", "application/json"), ("cache-control", "no-store"), *headers)
    return Decision(
        False,
        status,
        reason,
        text,
        principal=principal,
        client_headers=client,
        body=json.dumps(body).encode(),
        reusable=False,
    )


class Throttle:
    """At most one pass per key per ``interval`` seconds; the next pass says how many
    were held back in between."""

    def __init__(self, clock: Clock = SYSTEM_CLOCK, interval: float = 1.0) -> None:
        self.clock = clock
        self.interval = interval
        self._last: dict[tuple[str, ...], tuple[float, int]] = {}
        self._lock = threading.Lock()

    def admit(self, key: tuple[str, ...]) -> int | None:
        """None to hold this one back; else the number held back before it."""
        now = self.clock.monotonic()
        with self._lock:
            last, held = self._last.get(key, (-1e18, 0))
            if now - last < self.interval:
                self._last[key] = (last, held + 1)
                return None
            if len(self._last) > 100_000:
                self._last.clear()  # bounded: at worst a few extra log lines
            self._last[key] = (now, 0)
            return held
