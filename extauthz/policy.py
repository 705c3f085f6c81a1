"""The tier policy (`config/policy.yaml`): limits per tier, per-tenant overrides, route
rules, shadow mode and where token counts come from.

Business rules, not process settings. Validation is strict: an unknown key, a wrong
type or a negative number is an error naming the file and line, because a typo in a
limit must never silently become "unlimited". The policy is a frozen snapshot; its
version is a hash of the file's bytes, so logs and records can say which rules decided.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from extauthz.model import TenantTier
from extauthz.policy_reader import Node as _Node
from extauthz.policy_reader import PolicyError
from extauthz.policy_reader import Reader as _Reader

__all__ = ["DEFAULT_TIERS", "Limits", "Policy", "PolicyError", "load_policy", "parse_policy"]


@dataclass(frozen=True)
class RateLimit:
    requests_per_minute: int
    burst: int


@dataclass(frozen=True)
class Limits:
    requests_per_day: int
    tokens_per_request: int
    concurrent: int
    rate_limit: RateLimit  # one bucket per tenant
    cost_per_1k_tokens: float
    shadow: bool = False  # would-deny is logged, counted and audited; the request passes
    key_rate_limit: RateLimit | None = None  # a bucket per key as well, when set
    tokens_per_day: int | None = None  # a daily token budget, when set
    # With shared (Redis) counters out of reach: fail_closed (503 limits_unavailable),
    # fail_open (allow, counted and audited) or local (this replica enforces limit/replicas).
    on_counters_down: str = "local"


@dataclass(frozen=True)
class Route:
    """``path`` matches exactly, ``prefix`` by prefix, both on Envoy's normalised path."""

    path: str | None = None
    prefix: str | None = None
    public: bool = False
    cost: int = 1

    def matches(self, path: str) -> bool:
        if self.path is not None:
            return path == self.path
        return self.prefix is not None and path.startswith(self.prefix)


@dataclass(frozen=True)
class TokenSource:
    header: str | None = "x-max-tokens"
    body_field: str | None = None  # e.g. max_tokens, when Envoy sends the body


@dataclass(frozen=True)
class AuditRules:
    """``allowed``: the share of allowed requests that leave an audit event (0: none, the
    default; 1: all). Denials, admin changes and alerts are always audited."""

    allowed: float = 0.0


@dataclass(frozen=True)
class SecurityRules:
    """Brute-force detection: ``max_auth_failures`` refused credentials from one source
    address (or for one key id) within ``window_seconds`` raise a SECURITY_ALERT, and
    block that source for ``block_seconds`` (0: alert only)."""

    max_auth_failures: int = 20
    window_seconds: int = 60
    block_seconds: int = 300


WEBHOOK_EVENTS = ("QUOTA_EXCEEDED", "KEY_REVOKED", "SECURITY_ALERT")


@dataclass(frozen=True)
class Webhook:
    """Where a tenant's notable events are POSTed, signed with the secret found in the
    environment variable ``secret_env`` (never in this file)."""

    url: str
    secret_env: str
    events: tuple[str, ...] = WEBHOOK_EVENTS


@dataclass(frozen=True)
class RetentionRules:
    usage_days: int = 400
    audit_days: int = 400


# Without Redis, free traffic is refused (it must not reach the backend unlimited) and
# enterprise traffic is served (a paying customer's outage costs more than overuse).
DEFAULT_TIERS: dict[TenantTier, Limits] = {
    TenantTier.FREE: Limits(
        1_000, 4_096, 5, RateLimit(60, 10), 0.0, on_counters_down="fail_closed"
    ),
    TenantTier.STARTER: Limits(10_000, 8_192, 10, RateLimit(600, 50), 0.002),
    TenantTier.PROFESSIONAL: Limits(100_000, 32_768, 50, RateLimit(3_000, 200), 0.0015),
    TenantTier.ENTERPRISE: Limits(
        1_000_000, 131_072, 500, RateLimit(30_000, 1_000), 0.001, on_counters_down="fail_open"
    ),
}


@dataclass(frozen=True)
class Policy:
    tiers: dict[TenantTier, Limits] = field(default_factory=lambda: dict(DEFAULT_TIERS))
    tenants: dict[str, dict[str, Any]] = field(default_factory=dict)
    routes: tuple[Route, ...] = ()
    tokens: TokenSource = TokenSource()
    timezone: str = "UTC"
    version: str = "builtin"
    audit: AuditRules = AuditRules()
    security: SecurityRules = SecurityRules()
    retention: RetentionRules = RetentionRules()
    webhooks: dict[str, Webhook] = field(default_factory=dict)
    # Warnings about a policy that loaded all the same (a deprecated name), "file:line: text".
    notices: tuple[str, ...] = field(default=(), compare=False)
    _merged: dict[tuple[str, TenantTier], Limits] = field(
        default_factory=dict, compare=False, repr=False
    )

    def limits_for(self, tenant_id: str, tier: TenantTier) -> Limits:
        """The tier's limits with the tenant's overrides applied."""
        override = self.tenants.get(tenant_id)
        if not override:
            return self.tiers[tier]
        merged = self._merged.get((tenant_id, tier))
        if merged is None:  # a snapshot never changes, so each merge is done once
            merged = dataclasses.replace(self.tiers[tier], **override)
            self._merged[(tenant_id, tier)] = merged
        return merged

    def route(self, path: str) -> Route | None:
        """The first rule matching ``path`` (its query string ignored), or None."""
        bare = path.split("?", 1)[0]
        return next((r for r in self.routes if r.matches(bare)), None)


# ---------------------------------------------------------------- parsing

_LIMIT_KEYS = {f.name for f in dataclasses.fields(Limits)}


def _limit_fields(r: _Reader, node: _Node, where: str) -> dict[str, Any]:
    fields = r.mapping(node, where, _LIMIT_KEYS)
    parsers: dict[str, Callable[[_Node, str], Any]] = {
        "requests_per_day": lambda n, w: r.integer(n, w, 0),
        "tokens_per_request": lambda n, w: r.integer(n, w, 1),
        "concurrent": lambda n, w: r.integer(n, w, 1),
        "cost_per_1k_tokens": r.number,
        "shadow": r.boolean,
        "rate_limit": lambda n, w: _rate_limit(r, n, w),
        "key_rate_limit": lambda n, w: _rate_limit(r, n, w),
        "tokens_per_day": lambda n, w: r.integer(n, w, 0),
        "on_counters_down": lambda n, w: _choice(r, n, w, COUNTERS_DOWN_MODES),
    }
    return {k: parsers[k](v, f"{where}.{k}") for k, v in fields.items()}


COUNTERS_DOWN_MODES = ("fail_closed", "fail_open", "local")


def _choice(r: _Reader, node: _Node, where: str, choices: tuple[str, ...]) -> str:
    value = r.text(node, where)
    if value not in choices:
        raise r.error(node, f"{where} must be one of {', '.join(choices)}, not {value!r}")
    return value


def _rate_limit(r: _Reader, node: _Node, where: str) -> RateLimit:
    fields = r.mapping(node, where, {"requests_per_minute", "burst"})
    for name in ("requests_per_minute", "burst"):
        if name not in fields:
            raise r.error(node, f"{where} needs {name}")
    return RateLimit(
        r.integer(fields["requests_per_minute"], f"{where}.requests_per_minute", 1),
        r.integer(fields["burst"], f"{where}.burst", 1),
    )


def _routes(r: _Reader, node: _Node) -> tuple[Route, ...]:
    if not isinstance(node, yaml.SequenceNode):
        raise r.error(node, "routes must be a list of rules")
    routes = []
    for i, item in enumerate(node.value):
        where = f"routes[{i}]"
        fields = r.mapping(item, where, {"path", "prefix", "public", "cost"})
        if ("path" in fields) == ("prefix" in fields):
            raise r.error(item, f"{where} needs exactly one of path or prefix")
        target = r.text(fields.get("path") or fields["prefix"], f"{where} path")
        if not target.startswith("/"):
            raise r.error(item, f"{where} path must start with '/'")
        routes.append(
            Route(
                path=target if "path" in fields else None,
                prefix=target if "prefix" in fields else None,
                public=r.boolean(fields["public"], f"{where}.public")
                if "public" in fields
                else False,
                cost=r.integer(fields["cost"], f"{where}.cost", 1) if "cost" in fields else 1,
            )
        )
    return tuple(routes)


def parse_policy(text: str, source: str = "<policy>") -> Policy:
    r = _Reader(source)
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        raise PolicyError(
            f"{source}:{line}: not valid YAML: {getattr(exc, 'problem', exc)}"
        ) from None
    if root is None:
        return Policy(version=_version(text))
    top = r.mapping(
        root,
        "the policy",
        {
            "tiers",
            "tenants",
            "routes",
            "tokens",
            "timezone",
            "audit",
            "security",
            "retention",
            "webhooks",
        },
    )
    tiers = dict(DEFAULT_TIERS)
    if "tiers" in top:
        names = {t.value for t in TenantTier}
        for name, node in r.mapping(top["tiers"], "tiers", names).items():
            tier = TenantTier(name)
            tiers[tier] = dataclasses.replace(
                tiers[tier], **_limit_fields(r, node, f"tiers.{name}")
            )
    tenants = {}
    if "tenants" in top:
        for tenant_id, node in r.mapping(top["tenants"], "tenants", set()).items():
            tenants[tenant_id] = _limit_fields(r, node, f"tenants.{tenant_id}")
    tokens = TokenSource()
    if "tokens" in top:
        fields = r.mapping(top["tokens"], "tokens", {"header", "body_field"})
        tokens = TokenSource(
            header=r.text(fields["header"], "tokens.header").lower()
            if "header" in fields
            else None,
            body_field=r.text(fields["body_field"], "tokens.body_field")
            if "body_field" in fields
            else None,
        )
    timezone = "UTC"
    if "timezone" in top:
        timezone = _timezone(r, top["timezone"])
    routes = _routes(r, top["routes"]) if "routes" in top else ()
    return Policy(
        tiers,
        tenants,
        routes,
        tokens,
        timezone,
        version=_version(text),
        audit=_audit_rules(r, top["audit"]) if "audit" in top else AuditRules(),
        security=_section(r, top, "security", SecurityRules, {"max_auth_failures": 1}),
        retention=_section(r, top, "retention", RetentionRules, {"usage_days": 1, "audit_days": 1}),
        webhooks=_webhooks(r, top["webhooks"]) if "webhooks" in top else {},
        notices=tuple(r.notices),
    )


def _webhooks(r: _Reader, node: _Node) -> dict[str, Webhook]:
    hooks = {}
    for tenant_id, item in r.mapping(node, "webhooks", set()).items():
        where = f"webhooks.{tenant_id}"
        fields = r.mapping(item, where, {"url", "secret_env", "events"})
        for name in ("url", "secret_env"):
            if name not in fields:
                raise r.error(item, f"{where} needs {name}")
        url = r.text(fields["url"], f"{where}.url")
        if not url.startswith(("https://", "http://")):
            raise r.error(fields["url"], f"{where}.url must start with https:// or http://")
        events: tuple[str, ...] = WEBHOOK_EVENTS
        if "events" in fields:
            listed = fields["events"]
            if not isinstance(listed, yaml.SequenceNode):
                raise r.error(listed, f"{where}.events must be a list")
            events = tuple(r.text(n, f"{where}.events") for n in listed.value)
            for name, n in zip(events, listed.value, strict=True):
                if name not in WEBHOOK_EVENTS:
                    known = ", ".join(WEBHOOK_EVENTS)
                    raise r.error(n, f"{where}.events: {name!r} is not one of {known}")
        hooks[tenant_id] = Webhook(url, r.text(fields["secret_env"], f"{where}.secret_env"), events)
    return hooks


def _audit_rules(r: _Reader, node: _Node) -> AuditRules:
    fields = r.mapping(node, "audit", {"allowed", "sample_allowed"})
    if "allowed" in fields and "sample_allowed" in fields:
        raise r.error(
            fields["sample_allowed"],
            "audit.sample_allowed was replaced by audit.allowed: keep only allowed",
        )
    if "sample_allowed" in fields:
        share = _audit_share(r, fields["sample_allowed"], "audit.sample_allowed")
        r.notice(
            fields["sample_allowed"],
            f"audit.sample_allowed is deprecated; read as audit.allowed: {_share_name(share)}. "
            "An audited allowed request now leaves one API_REQUEST event, when Envoy "
            "reports it finished (no AUTH_SUCCESS at the check), and the default is none: "
            "rename it to allowed, or remove it to audit only denials and admin changes",
        )
        return AuditRules(share)
    if "allowed" not in fields:
        return AuditRules()
    return AuditRules(_audit_share(r, fields["allowed"], "audit.allowed"))


def _audit_share(r: _Reader, node: _Node, where: str) -> float:
    """none, all, or a share from 0 to 1."""
    value = r.scalar(node, where)
    named = {"none": 0.0, "all": 1.0}
    if isinstance(value, str) and value.lower() in named:
        return named[value.lower()]
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise r.error(node, f"{where} must be none, all or a share from 0 to 1, not {value!r}")
    return float(value)


def _share_name(share: float) -> str:
    return "none" if share == 0 else "all" if share == 1 else f"{share:g}"


def _section(
    r: _Reader, top: dict[str, _Node], name: str, kind: Any, minimums: dict[str, int]
) -> Any:
    """A section of whole-number fields (security, retention), each at least its minimum
    (default 0)."""
    if name not in top:
        return kind()
    known = {f.name for f in dataclasses.fields(kind)}
    fields = r.mapping(top[name], name, known)
    values = {k: r.integer(v, f"{name}.{k}", minimums.get(k, 0)) for k, v in fields.items()}
    return kind(**values)


def _timezone(r: _Reader, node: _Node) -> str:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    name = r.text(node, "timezone")
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise r.error(node, f"unknown time zone {name!r} (e.g. UTC, Europe/Berlin)") from None
    return name


def _version(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def load_policy(path: Path) -> Policy:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"{path}:1: cannot read the policy file: {exc}") from None
    return parse_policy(text, str(path))
