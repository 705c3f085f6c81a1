"""API key lifecycle (create, validate, revoke, rotate) and the validation cache.

The cache is keyed by the key's HMAC, never the key itself. It holds positive entries
(key + tenant) and negative ones (unknown hash), both with a TTL and a bounded size.
Expiry and revocation times are re-checked against the clock on every hit, so a key
that expires while cached is refused on the next request; other changes (revoke, suspend)
reach the cache through ``refresh()``, which a server polls a few times a second.
"""

from __future__ import annotations

import hmac
import threading
import time
from collections.abc import Callable, Mapping
from typing import NamedTuple

from cachetools import TTLCache

from extauthz.audit import KEY_CREATED, KEY_REVOKED, KEY_ROTATED, make_event
from extauthz.clock import SYSTEM_CLOCK, Clock
from extauthz.errors import StoreError, UnknownKeyError, UnknownTenantError
from extauthz.keys import KeyFormat, Pepper, generate_key, shown
from extauthz.model import APIKey, AuditEvent, Tenant, new_id
from extauthz.store import Store

_Entry = tuple[APIKey, Tenant]
_NO_HASH = bytes(32)


class Resolution(NamedTuple):
    """The outcome of checking one presented key. ``reason`` is None when it is valid."""

    reason: str | None
    key: APIKey | None = None
    tenant: Tenant | None = None


_MALFORMED = Resolution("malformed_key")
_UNKNOWN = Resolution("unknown_key")
_BAD_CHECKSUM = Resolution("bad_checksum")


class KeyResolver:
    """Presented key -> (key, tenant) or a reason, through the cache."""

    def __init__(
        self,
        store: Store,
        pepper: Pepper,
        clock: Clock = SYSTEM_CLOCK,
        *,
        prefix: str = "nk",
        ttl: float = 30.0,
        negative_ttl: float = 5.0,
        size: int = 100_000,
        max_stale: float = 300.0,
    ) -> None:
        self.store = store
        self.pepper = pepper
        self.clock = clock
        self.format = KeyFormat(prefix)
        self._lock = threading.Lock()
        self.ttl = ttl
        # One entry per key, with the time it was read: fresh for ``ttl``, then kept up
        # to the hard age for use only while the store cannot answer (known keys keep
        # working through a short database outage). One cache, not a fresh one and a
        # stale one, and a plain dict rather than a TTLCache, whose bookkeeping (a
        # link object and a second dict entry) cost ~140 bytes per key. Bounded by
        # ``size``: the oldest read goes first.
        self._size = size
        self._max_age = max(ttl, max_stale)
        self._hits: dict[bytes, tuple[_Entry, float]] = {}
        self._misses: TTLCache[bytes, bool] = TTLCache(size, negative_ttl, timer=clock.monotonic)
        # Ten keys of one tenant share one Tenant object rather than ten copies.
        self._tenants: dict[str, Tenant] = {}
        self._last_used: dict[str, float] = {}
        self._revision = -1
        # Cache results, read by the metrics collector: hit, negative_hit, miss.
        self.stats: dict[str, int] = {"hit": 0, "negative_hit": 0, "miss": 0, "stale": 0}
        # Called with the seconds a change in the store took to drop this cache.
        self.on_change: Callable[[float], None] | None = None
        self.on_lookup: Callable[[float], None] | None = None  # seconds a store lookup took
        self._generation = 0
        self._refreshing = threading.Lock()  # upkeep's poll and pushed changes

    def resolve(self, presented: str) -> Resolution:
        if not self.format.well_shaped(presented):
            return _MALFORMED
        key_hash = self.pepper.hash_key(presented)
        with self._lock:
            cached = self._hits.get(key_hash)
            entry: _Entry | None = None
            if cached is not None and self.clock.monotonic() - cached[1] < self.ttl:
                entry, negative = cached[0], False
                self.stats["hit"] += 1
            else:
                negative = key_hash in self._misses
                self.stats["negative_hit" if negative else "miss"] += 1
            generation = self._generation
        if negative:
            return _UNKNOWN
        if entry is None:
            if not self.format.checksum_ok(presented):  # never reaches the store
                return _BAD_CHECKSUM
            # Unknown and known-but-revoked keys both cost exactly one lookup here, so
            # response time does not tell an attacker which of the two a key is.
            found = self._fetch(key_hash, generation)
            if found is None:
                # The same constant-time compare a found key gets, so that a miss does
                # not answer measurably faster than a revoked key.
                hmac.compare_digest(key_hash, _NO_HASH)
                return _UNKNOWN
            entry = found
        key, tenant = entry
        # Found by an index (or dict) on the hash: compare once more in constant time.
        if not hmac.compare_digest(key_hash, key.key_hash):
            return _UNKNOWN
        now = self.clock.now()
        state = key.state_at(now)
        if state != "active":
            return Resolution("key_revoked" if state == "revoked" else "key_expired", key, tenant)
        if not tenant.is_active:
            return Resolution("tenant_suspended", key, tenant)
        # No lock: flush_last_used() swaps the dict and copies it atomically; a write
        # that lands in the old dict after the copy only loses one last-used time.
        self._last_used[key.key_id] = now
        return Resolution(None, key, tenant)

    def _fetch(self, key_hash: bytes, generation: int) -> _Entry | None:
        """The store's answer, cached; while the store fails, a stale copy if one is
        young enough (else the StoreError goes up: the caller answers 503)."""
        started = time.perf_counter()
        try:
            found = self.store.lookup(key_hash)
        except StoreError:
            found = self._stale_entry(key_hash)
            if found is None:
                raise
            return found
        if self.on_lookup is not None:
            self.on_lookup(time.perf_counter() - started)
        with self._lock:
            # If the cache was dropped while we read, what we read may predate the
            # change that dropped it: use it for this request, but do not cache it.
            if generation == self._generation and found is None:
                self._misses[key_hash] = True
            elif generation == self._generation and found is not None:
                key, tenant = found
                shared = self._tenants.get(tenant.id)
                if shared == tenant:
                    tenant = shared
                else:
                    self._tenants[tenant.id] = tenant
                # The cached key holds no copies of what the tenant and the cache's
                # own key already hold (the hash only once it is known to be equal:
                # resolve() compares them again in constant time).
                key.tenant_id = tenant.id
                if hmac.compare_digest(key.key_hash, key_hash):
                    key.key_hash = key_hash
                found = (key, tenant)
                hits = self._hits
                hits.pop(key_hash, None)  # re-read: it moves to the young end
                if len(hits) >= self._size:
                    del hits[next(iter(hits))]
                hits[key_hash] = (found, self.clock.monotonic())
        return found

    def _stale_entry(self, key_hash: bytes) -> _Entry | None:
        with self._lock:
            cached = self._hits.get(key_hash)
            if cached is None or self.clock.monotonic() - cached[1] >= self._max_age:
                return None
            self.stats["stale"] += 1
        return cached[0]

    @property
    def generation(self) -> int:
        """Bumped whenever the cache is dropped; lets callers drop what they built on it."""
        return self._generation

    def invalidate(self) -> None:
        with self._lock:
            self._generation += 1
            self._hits.clear()
            self._misses.clear()
            self._tenants.clear()

    def refresh(self) -> bool:
        """Drop the cache if the store changed since the last call. True if it did."""
        with self._refreshing:
            revision = self.store.revision()
            if revision == self._revision:
                return False
            first = self._revision < 0
            self._revision = revision
            self.invalidate()
        if not first and self.on_change is not None:
            changed = self.store.changed_at()
            if changed is not None:
                self.on_change(max(0.0, self.clock.now() - changed))
        return True

    def flush_last_used(self) -> int:
        """Write the batched last-used times to the store; returns how many keys."""
        pending, self._last_used = self._last_used, {}
        snapshot = dict(pending)  # one C-level copy: safe against concurrent writers
        self.store.touch_keys(snapshot)
        return len(snapshot)


class APIKeyManager:
    """The seed's key API, backed by a real store: ``create_key``, ``validate_key``, ..."""

    def __init__(
        self,
        store: Store,
        pepper: Pepper,
        clock: Clock = SYSTEM_CLOCK,
        *,
        prefix: str = "nk",
        resolver: KeyResolver | None = None,
        actor: str = "admin",
    ) -> None:
        self.store = store
        self.pepper = pepper
        self.clock = clock
        self.prefix = prefix
        self.actor = actor  # who the audit names for changes made through this manager
        self.resolver = resolver or KeyResolver(store, pepper, clock, prefix=prefix)

    def _new(self, tenant_id: str, name: str, expires_in: float | None) -> tuple[APIKey, str]:
        full_key = generate_key(self.prefix)
        now = self.clock.now()
        key = APIKey(
            key_id=new_id("key_"),
            tenant_id=tenant_id,
            name=name,
            key_hash=self.pepper.hash_key(full_key),
            pepper_version=self.pepper.version,
            created_at=now,
            expires_at=None if expires_in is None else now + expires_in,
        )
        return key, full_key

    def create_key(
        self, tenant_id: str, name: str = "default", expires_in: float | None = None
    ) -> tuple[str, str]:
        """Create a key for an existing tenant. Returns ``(key_id, full_key)``; the full key
        is never stored and cannot be shown again."""
        if self.store.get_tenant(tenant_id) is None:
            raise UnknownTenantError(f"no tenant with id {shown(tenant_id)}")
        key, full_key = self._new(tenant_id, name, expires_in)
        detail = {"name": name, "expires_at": key.expires_at}
        self.store.insert_key(key, [self._event(KEY_CREATED, key, detail)])
        self.resolver.invalidate()
        return key.key_id, full_key

    def _event(self, action: str, key: APIKey, detail: Mapping[str, object]) -> AuditEvent:
        # Written by the store in the same transaction as the change itself.
        return make_event(
            self.clock,
            action,
            "success",
            tenant_id=key.tenant_id,
            key_id=key.key_id,
            actor=self.actor,
            detail=detail,
        )

    def validate_key(self, full_key: str) -> APIKey | None:
        """The key's record if it is valid now (known, not revoked or expired, tenant
        active), else None."""
        result = self.resolver.resolve(full_key)
        return result.key if result.reason is None else None

    def key_id_of(self, ref: str) -> str:
        """The key id ``ref`` names: a key id as it is, or, when someone passes the secret
        key itself, the id of the key it is (the secret is never echoed)."""
        if not self.resolver.format.well_shaped(ref):
            return ref
        found = self.store.lookup(self.pepper.hash_key(ref))
        if found is None:
            raise UnknownKeyError(
                "no such API key (the value given is a secret key, so it is not shown)"
            )
        return found[0].key_id

    def revoke_key(self, key_id: str) -> APIKey:
        """Revoke by key id (or by the secret key itself, see ``key_id_of``)."""
        key_id = self.key_id_of(key_id)
        known = self.store.get_key(key_id)
        if known is None:
            raise UnknownKeyError(f"no API key with id {shown(key_id)}")
        event = self._event(KEY_REVOKED, known, {"name": known.name})
        key = self.store.revoke_key(key_id, self.clock.now(), [event])
        self.resolver.invalidate()
        return key

    def rotate_key(self, key_id: str, grace: float = 3600.0) -> tuple[str, str]:
        """A new key for the same tenant; the old one keeps working for ``grace`` seconds."""
        key_id = self.key_id_of(key_id)
        old = self.store.get_key(key_id)
        if old is None:
            raise UnknownKeyError(f"no API key with id {shown(key_id)}")
        key, full_key = self._new(old.tenant_id, old.name, None)
        ends = self.clock.now() + grace
        events = [
            self._event(KEY_CREATED, key, {"name": key.name, "rotated_from": key_id}),
            self._event(KEY_ROTATED, old, {"rotated_to": key.key_id, "old_key_ends_at": ends}),
        ]
        self.store.rotate_key(key_id, key, ends, events)
        self.resolver.invalidate()
        return key.key_id, full_key

    def get_key(self, key_id: str) -> APIKey:
        key = self.store.get_key(self.key_id_of(key_id))
        if key is None:
            raise UnknownKeyError(f"no API key with id {shown(key_id)}")
        return key

    def list_keys(self, tenant_id: str | None = None) -> list[APIKey]:
        return self.store.list_keys(tenant_id)
