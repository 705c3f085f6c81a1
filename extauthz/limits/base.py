"""The counter interface every limit backend implements (memory, Redis, and the
degraded-mode guard around Redis).

One call, :meth:`Counters.acquire`, checks every limit of a request and charges all of
them, or none: a request refused by its daily quota must not also have drained its
token bucket. With Redis that is one Lua script; in memory, one lock.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from extauthz.policy import Limits

# What `Verdict.denied_by` can name, in the order limits are checked.
RATE, KEY_RATE, DAY, TOKENS_DAY, CONCURRENT = "rate", "key_rate", "day", "tokens_day", "concurrent"


# Ask and Verdict are built on every check: plain slotted classes, because a frozen
# dataclass costs ~2 us to construct (one object.__setattr__ per field). Treat them
# as immutable all the same.
@dataclass(slots=True)
class Ask:
    """What one request wants to take."""

    tenant_id: str
    key_id: str
    lease_id: str  # Envoy's x-request-id: the access-log entry names the same id
    limits: Limits
    day: str  # the quota day in the policy's time zone, e.g. "2026-11-26"
    cost: int = 1  # request units (a route's weight): bucket tokens and daily requests
    tokens: int = 0  # declared tokens, reserved now and settled from the access log
    # Carried on the lease for the usage record written when it ends:
    route: str = ""
    method: str = ""
    price: float = 0.0  # the tier's cost per 1K tokens at check time
    started: float = 0.0  # wall time of the check


@dataclass(slots=True)
class Verdict:
    allowed: bool
    denied_by: str | None = None  # one of the names above
    retry_after: float = 0.0  # seconds until a bucket denial could pass
    requests_today: int = 0  # after this request's charge, or as it stands when denied
    tokens_today: int = 0
    rate_left: float = 0.0  # tokens left in the tenant's bucket
    in_flight: int = 0  # the tenant's held concurrency slots, this request's included
    degraded: bool = False  # allowed unchecked: shared counters down, the tier fails open


# One per released lease, on the access-log path: slotted, not frozen (see Ask).
@dataclass(slots=True)
class Settlement:
    """A released lease: its reservation, and the real token count when one was reported."""

    tenant_id: str
    key_id: str
    day: str
    reserved: int
    actual: int | None
    route: str = ""
    method: str = ""
    price: float = 0.0
    started: float = 0.0
    request_id: str = ""


class Release(NamedTuple):
    """One access-log entry's release: the lease, the reported tokens, and the tenant
    Envoy logged for the request (empty if unknown), which lets shared counters find
    the lease without a global index. A NamedTuple: one is built per finished request."""

    lease_id: str
    actual_tokens: int | None = None
    tenant_id: str = ""


class Counters(abc.ABC):
    url: str
    remote = False  # calls cross the network (and may wait on it)

    @abc.abstractmethod
    def acquire(self, ask: Ask) -> Verdict:
        """Check every limit of ``ask`` and, only if all pass, charge them all: a bucket
        token per cost unit, the daily requests and reserved tokens, and a concurrency
        slot held under ``ask.lease_id`` until released or expired."""

    @abc.abstractmethod
    def release(self, lease_id: str, actual_tokens: int | None = None) -> Settlement | None:
        """Free the slot held under ``lease_id`` and settle its reservation against
        ``actual_tokens`` (refund or overage). None if no such lease: a second release,
        or one after the lease expired, changes nothing."""

    def release_many(self, releases: Sequence[Release]) -> list[Settlement | None]:
        """:meth:`release` for a batch (one access-log message), in order; shared
        backends do it in one round trip."""
        return [self.release(r.lease_id, r.actual_tokens) for r in releases]

    @abc.abstractmethod
    def add_usage(self, tenant_id: str, day: str, requests: int = 0, tokens: int = 0) -> None:
        """Count usage that did not come through :meth:`acquire` (the seed's
        ``record_usage``, or counts loaded at start)."""

    @abc.abstractmethod
    def usage(self, tenant_id: str, day: str) -> tuple[int, int]:
        """(requests, tokens) counted for the tenant on ``day``."""

    @abc.abstractmethod
    def in_flight(self, tenant_id: str) -> int:
        """Concurrency slots the tenant holds now (unexpired leases)."""

    @abc.abstractmethod
    def rate_left(self, tenant_id: str, limits: Limits) -> float:
        """Tokens in the tenant's bucket now (the bucket is full if never used)."""

    @abc.abstractmethod
    def maintain(self, keep_days: frozenset[str] = frozenset()) -> int:
        """Expire overdue leases and forget idle state (and, given ``keep_days``, the
        counts of other days where the backend keeps them itself); returns the leases
        expired."""

    @abc.abstractmethod
    def leases_held(self) -> int:
        """Slots held now, across tenants, where the backend can tell cheaply (else 0)."""

    @abc.abstractmethod
    def end_leases(self) -> list[Settlement]:
        """At shutdown: the leases nobody can release any more, ended now. Memory
        counters die with the process, so all of them; shared counters, none."""

    @abc.abstractmethod
    def drain_expired(self) -> list[Settlement]:
        """Leases that expired without a release since the last call (their requests
        get an `incomplete` usage record)."""

    def ping(self) -> None:  # noqa: B027 - nothing to reach for local counters
        """Raise StoreError if the backend cannot be reached now."""

    def close(self) -> None:  # noqa: B027 - optional for backends without resources
        """Release backend resources."""
