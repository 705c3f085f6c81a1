"""The store interface: tenants, API keys, daily quota counts, the audit trail and usage.
SQLite (the embedded default), PostgreSQL (shared by replicas) and memory implement it.

Every method raises only our own errors (StoreError, ConflictError, Unknown*Error);
driver exceptions never cross this interface.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Mapping, Sequence

from extauthz.auditchain import Anchor, AuditChain
from extauthz.model import APIKey, AuditEvent, Tenant, TenantStatus, TenantTier, UsageRecord


class Store(abc.ABC):
    url: str
    remote = False  # calls cross the network (and may wait on it)

    @abc.abstractmethod
    def schema_version(self) -> int:
        """The schema version now in the database."""

    @abc.abstractmethod
    def revision(self) -> int:
        """A counter bumped by every change to tenants or keys, polled to drop caches."""

    @abc.abstractmethod
    def changed_at(self) -> float | None:
        """Unix time of the last revision bump (None if never)."""

    @abc.abstractmethod
    def setdefault_meta(self, name: str, value: bytes) -> bytes:
        """Store ``value`` under ``name`` unless one is there; return what is stored."""

    @abc.abstractmethod
    def get_meta(self, name: str) -> bytes | None: ...

    # tenants
    @abc.abstractmethod
    def create_tenant(self, tenant: Tenant, audit: Sequence[AuditEvent] = ()) -> None:
        """Insert; ConflictError if the id or name is taken."""

    @abc.abstractmethod
    def get_tenant(self, tenant_id: str) -> Tenant | None: ...

    @abc.abstractmethod
    def find_tenant(self, id_or_name: str) -> Tenant | None:
        """By id first, then by exact name."""

    @abc.abstractmethod
    def list_tenants(self) -> list[Tenant]: ...

    @abc.abstractmethod
    def update_tenant(
        self,
        tenant_id: str,
        now: float,
        *,
        status: TenantStatus | None = None,
        tier: TenantTier | None = None,
        audit: Sequence[AuditEvent] = (),
    ) -> Tenant:
        """Change status and/or tier; UnknownTenantError if absent."""

    @abc.abstractmethod
    def delete_tenant(self, tenant_id: str, audit: Sequence[AuditEvent] = ()) -> None:
        """Delete the tenant and all its keys; UnknownTenantError if absent."""

    # keys
    @abc.abstractmethod
    def insert_key(self, key: APIKey, audit: Sequence[AuditEvent] = ()) -> None:
        """Insert; UnknownTenantError if its tenant does not exist."""

    @abc.abstractmethod
    def get_key(self, key_id: str) -> APIKey | None: ...

    @abc.abstractmethod
    def lookup(self, key_hash: bytes) -> tuple[APIKey, Tenant] | None:
        """The hot-path read: the key with this hash and its tenant, in one query."""

    @abc.abstractmethod
    def list_keys(self, tenant_id: str | None = None) -> list[APIKey]: ...

    @abc.abstractmethod
    def revoke_key(self, key_id: str, now: float, audit: Sequence[AuditEvent] = ()) -> APIKey:
        """Mark revoked at ``now``; UnknownKeyError if absent, ConflictError if revoked."""

    @abc.abstractmethod
    def rotate_key(
        self,
        old_key_id: str,
        new_key: APIKey,
        old_expires_at: float,
        audit: Sequence[AuditEvent] = (),
    ) -> APIKey:
        """In one transaction: insert ``new_key`` and end the old key at ``old_expires_at``
        (or earlier, if it already expires sooner). Returns the old key as updated."""

    @abc.abstractmethod
    def touch_keys(self, last_used: Mapping[str, float]) -> None:
        """Write last-used times in one batch (no revision bump: caches stay valid)."""

    # daily quota counts (memory counters' durable copy)
    @abc.abstractmethod
    def add_quota_counts(self, changes: Mapping[tuple[str, str], tuple[int, int]]) -> None:
        """Add (requests, tokens) to each (tenant, day) row, in one transaction."""

    @abc.abstractmethod
    def quota_counts(self, day: str) -> dict[str, tuple[int, int]]:
        """Tenant id -> (requests, tokens) counted on ``day``."""

    # audit: a hash chain (auditchain.py); admin changes pass their events to the
    # mutating methods above so both commit in one transaction.
    audit_chain: AuditChain | None = None

    @abc.abstractmethod
    def append_audit(self, events: Sequence[AuditEvent]) -> list[AuditEvent]:
        """Number, chain and append in one transaction; returns the stored rows."""

    @abc.abstractmethod
    def query_audit(
        self,
        *,
        tenant_id: str | None = None,
        action: str | None = None,
        key_id: str | None = None,
        since: float | None = None,
        until: float | None = None,
        after_seq: int = 0,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> list[AuditEvent]:
        """Events matching every filter given, by sequence number."""

    @abc.abstractmethod
    def audit_rows(self, first: int = 1, last: int | None = None) -> Iterator[AuditEvent]:
        """Rows with first <= seq <= last in seq order, read in batches (for verify)."""

    @abc.abstractmethod
    def audit_head(self) -> Anchor | None:
        """The signed (seq, hash) of the last row, or None for an empty log."""

    @abc.abstractmethod
    def audit_checkpoint(self) -> Anchor | None:
        """The signed (seq, hash) of the last pruned row, or None if never pruned."""

    @abc.abstractmethod
    def prune_audit(self, before: float) -> int:
        """Delete the rows older than ``before`` (a prefix of the chain) and record a
        checkpoint at the last one deleted, in one transaction; returns rows deleted."""

    # usage
    @abc.abstractmethod
    def add_usage(self, records: Sequence[UsageRecord]) -> int:
        """Insert; a request id already recorded is skipped (never billed twice),
        except that a complete record replaces an incomplete one. Returns rows written."""

    @abc.abstractmethod
    def query_usage(
        self,
        *,
        tenant_id: str | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> list[UsageRecord]: ...

    @abc.abstractmethod
    def prune_usage(self, before: float) -> int: ...

    def list_audit(self, limit: int = 100, action: str | None = None) -> list[AuditEvent]:
        """The newest ``limit`` events (optionally of one action), oldest first."""
        return self.query_audit(action=action, limit=limit, newest_first=True)[::-1]

    def try_lead(self, role: str) -> bool:
        """Whether this process should do ``role`` (a job one process at a time does,
        such as sending webhooks) now. Processes sharing a database elect one; alone,
        always True."""
        return True

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None] | None:
        """Call ``callback`` soon after any process changes tenants or keys; returns a
        function that stops it. None where the backend cannot push (callers poll
        :meth:`revision`, which they do anyway as the bound)."""
        return None

    @abc.abstractmethod
    def close(self) -> None: ...
