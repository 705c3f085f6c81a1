"""Plain data shared by the core, the stores and the transports. No protobuf, no HTTP."""

from __future__ import annotations

import enum
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from extauthz.errors import ConfigError

_ID_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def new_id(prefix: str, length: int = 16) -> str:
    """A random public identifier such as ``t_3kTq9...``; never a secret."""
    return prefix + "".join(secrets.choice(_ID_ALPHABET) for _ in range(length))


class TenantTier(enum.Enum):
    FREE = "free"
    STARTER = "starter"
    PROFESSIONAL = "professional"
    ENTERPRISE = "enterprise"

    @classmethod
    def parse(cls, text: str) -> TenantTier:
        try:
            return cls(text.strip().lower())
        except ValueError:
            names = ", ".join(t.value for t in cls)
            raise ConfigError(f"unknown tier {text!r}: use one of {names}") from None


class TenantStatus(enum.Enum):
    ACTIVE = "active"
    SUSPENDED = "suspended"


@dataclass(slots=True)
class Tenant:
    name: str
    tier: TenantTier = TenantTier.FREE
    status: TenantStatus = TenantStatus.ACTIVE
    id: str = field(default_factory=lambda: new_id("t_"))
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)

    @property
    def is_active(self) -> bool:
        return self.status is TenantStatus.ACTIVE

    def to_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "name": self.name,
            "tier": self.tier.value,
            "status": self.status.value,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


@dataclass(slots=True)
class APIKey:
    """A stored key. The secret itself is never kept; ``key_hash`` is its peppered HMAC."""

    key_id: str
    tenant_id: str
    name: str
    key_hash: bytes = field(repr=False)
    pepper_version: int = 1
    created_at: float = 0.0
    expires_at: float | None = None
    revoked_at: float | None = None
    last_used_at: float | None = None
    rotated_to: str | None = None

    def state_at(self, now: float) -> str:
        """``active``, ``revoked`` or ``expired`` at Unix time ``now``."""
        if self.revoked_at is not None and self.revoked_at <= now:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"

    @property
    def is_active(self) -> bool:
        """Seed-compatible property; the core uses :meth:`state_at` with its own clock."""
        return self.state_at(time.time()) == "active"


@dataclass(frozen=True, slots=True)
class CheckInput:
    """One request as Envoy described it, already out of its wire format.

    ``headers`` has lowercase names; a header sent twice arrives joined with ``,``
    (that is how Envoy builds its map), or as a tuple of values from transports that
    keep them apart.
    """

    method: str
    path: str
    headers: Mapping[str, str | tuple[str, ...]]
    host: str = ""
    source_address: str = ""
    request_id: str = ""
    body: bytes | None = None  # only when Envoy sends it (with_request_body)

    @property
    def trace_id(self) -> str:
        """The W3C trace id from ``traceparent`` (32 hex digits), or ""."""
        value = self.headers.get("traceparent")
        if not isinstance(value, str) or len(value) != 55 or value[2] != "-":
            return ""
        trace = value[3:35]
        if trace == "0" * 32 or any(c not in "0123456789abcdef" for c in trace):
            return ""
        return trace


@dataclass(frozen=True, slots=True)
class Principal:
    tenant_id: str
    tenant_tier: TenantTier
    key_id: str


@dataclass(frozen=True, slots=True)
class Decision:
    """The core's answer. Transports turn it into a CheckResponse or an HTTP reply."""

    allowed: bool
    status: int
    reason: str
    message: str = ""
    principal: Principal | None = None
    # Headers set (overwriting any client copy) on the request sent upstream.
    upstream_headers: tuple[tuple[str, str], ...] = ()
    # Request headers removed before the upstream sees them (the key carrier).
    remove_headers: tuple[str, ...] = ()
    # Headers on the response to the client: the deny answer's, or RateLimit on allow.
    client_headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    # False for per-request answers (RateLimit counts): transports must not cache them.
    reusable: bool = True
    # For a per-request allow: the reusable decision it extends with client_headers, so
    # a transport can reuse that one's cached encoding and append only the new headers.
    base: Decision | None = None

    def with_client_headers(self, headers: tuple[tuple[str, str], ...]) -> Decision:
        """This (reusable) decision plus per-request client headers; built by hand
        because dataclasses.replace costs several microseconds on the hot path."""
        return Decision(
            self.allowed,
            self.status,
            self.reason,
            self.message,
            self.principal,
            self.upstream_headers,
            self.remove_headers,
            headers,
            self.body,
            False,
            self,
        )


# AuditEvent and UsageRecord are built several times per request (hot path, writer):
# plain slotted classes, since a frozen dataclass pays one object.__setattr__ per field.
# Treat them as immutable all the same.
@dataclass(slots=True)
class AuditEvent:
    """One audit record. Never holds a key or an Authorization header: ids and facts."""

    action: str  # e.g. CONFIG_CHANGED, QUOTA_EXCEEDED, RATE_LIMITED
    outcome: str  # success, failure, denied, shadow
    ts: float
    tenant_id: str = ""
    key_id: str = ""
    actor: str = ""  # "system", "admin", or empty for a request's own principal
    reason: str = ""
    request_id: str = ""
    source: str = ""
    policy_version: str = ""
    detail: str = ""  # JSON object text
    seq: int = 0  # assigned by the store, gap-free
    trace_id: str = ""
    hash: str = ""  # hex HMAC chaining this row to the previous one (auditchain.py)

    def to_dict(self) -> dict[str, object]:
        return {f: getattr(self, f) for f in self.__slots__}


@dataclass(slots=True)
class UsageRecord:
    """One finished (or, if Envoy never reported it, ``incomplete``) allowed request."""

    request_id: str
    ts: float  # when the check allowed it
    day: str  # its quota day, in the policy's time zone
    tenant_id: str
    key_id: str
    route: str = ""
    method: str = ""
    status: int = 0  # the response code Envoy logged; 0 when incomplete
    latency_ms: float = 0.0
    request_bytes: int = 0
    response_bytes: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    cost: float = 0.0
    incomplete: bool = False

    def to_dict(self) -> dict[str, object]:
        return {f: getattr(self, f) for f in self.__slots__}


# One per access-log entry: a plain slotted class like Decision (frozen would pay an
# object.__setattr__ per field). Treat it as immutable all the same.
@dataclass(slots=True)
class Completion:
    """What Envoy's access log says about one finished request."""

    request_id: str
    status: int  # 0 when Envoy never sent a response (the client went away first)
    latency_ms: float
    request_bytes: int
    response_bytes: int
    tokens_in: int | None  # the first usage header; None if the upstream sent none
    tokens_out: int | None  # the others, summed
    tenant_id: str = ""  # the tenant Envoy logged for the request, if any

    @property
    def tokens(self) -> int | None:
        if self.tokens_in is None and self.tokens_out is None:
            return None
        return (self.tokens_in or 0) + (self.tokens_out or 0)
