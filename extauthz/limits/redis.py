"""Counters in Redis (``redis://``, ``rediss://``, ``unix://``), shared by every replica.

One Lua script per check (lua/acquire.lua) tests every limit and charges all or none,
on Redis's own clock (``TIME``), so replicas' clocks do not matter. Scripts are called by
SHA and reloaded if Redis forgets them (a restart: BAD_INPUTS #17). Each tenant's keys
share a hash tag (``{tenant}``), so they live in one Redis Cluster slot; every key has a
TTL. Leases are a sorted set per tenant (members expire by score); a small index from
lease id to tenant lets the access log release a lease knowing only the request id.
Checks on the HTTP service's event loop send their script on that loop's own connection
(resp.py); other callers (gRPC's threads, the access log) send theirs on a blocking
connection of their own thread (blocking.py); both over TCP, TLS or a Unix socket
(endpoint.py). Only TLS options those do not handle keep redis-py (pipeline.py).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import resources
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from extauthz import suspend
from extauthz.clock import Clock
from extauthz.errors import StoreError, redact
from extauthz.limits.base import Ask, Counters, Release, Settlement, Verdict
from extauthz.limits.blocking import ThreadConnections
from extauthz.limits.endpoint import Endpoint
from extauthz.limits.pipeline import ScriptPipeline
from extauthz.limits.redis_args import DAY_TTL, AcquireArgs, tenant_key
from extauthz.limits.resp import LoopConnections, ScriptCall
from extauthz.policy import Limits


def _script(name: str) -> str:
    return resources.files("extauthz.limits").joinpath("lua", name).read_text()


class RedisCounters(Counters):
    remote = True

    def __init__(
        self,
        url: str,
        lease_ttl: float = 60.0,
        prefix: str = "extauthz",
        timeout: float = 0.05,
        clock: Clock | None = None,
    ) -> None:
        self.url = url
        # Redis's own clock unless a test injects one (then its monotonic time).
        self.clock = clock
        self.lease_ttl = lease_ttl
        self.prefix = prefix
        try:
            # Connecting is bounded like every call (a blackholed host must not hold a
            # decision), and nothing is retried here: the breaker above decides.
            self.redis = redis.Redis.from_url(
                url,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                retry=Retry(NoBackoff(), 0),
                retry_on_timeout=False,
            )
        except ValueError as exc:
            raise StoreError(f"bad Redis URL {redact(url)!r}: {exc}") from None
        self._acquire_text = _script("acquire.lua")
        self._acquire = self.redis.register_script(self._acquire_text)
        # Checks on the HTTP service's event loop talk to Redis from the loop itself,
        # where the commands queued while one write is in flight leave together; the
        # others (gRPC's threads, the access log) on their own thread's connection.
        # Every receive waits at most ``timeout``; ``wait`` bounds a reply in pieces
        # and a caller starved of CPU (seen in CI: 300 checks at once on 2 cores waited
        # over 100 ms): generous, and under Envoy's 500 ms.
        try:
            endpoint = Endpoint.from_client(self.redis)
        except (OSError, ValueError) as exc:  # TLS files that cannot be read or used
            raise StoreError(f"bad Redis URL {redact(url)!r}: {exc}") from None
        self._on_loops = None if endpoint is None else LoopConnections(endpoint, timeout)
        self._checks: ThreadConnections | ScriptPipeline = (
            ThreadConnections(
                endpoint,
                timeout,
                sha=self._acquire.sha,
                script=self._acquire_text,
                wait=timeout + 0.35,
            )
            if endpoint is not None
            # TLS options the two clients do not handle: redis-py, pipelined from an
            # I/O thread.
            else ScriptPipeline(self.redis, self._acquire, wait=timeout + 0.35)
        )
        self._acquire_args = AcquireArgs(lease_ttl)
        self._release = self.redis.register_script(_script("release.lua"))
        self._release_text = _script("release_tenant.lua")
        self._release_tenant = self.redis.register_script(self._release_text)

    # key names: everything of one tenant under one hash tag
    def _k(self, tenant_id: str, part: str) -> str:
        return tenant_key(self.prefix, tenant_id, part)

    def _run(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            return script(keys=keys, args=args)  # EVALSHA, EVAL again after NOSCRIPT
        except redis.RedisError as exc:
            raise StoreError(f"Redis counters failed: {exc}") from None

    def acquire(self, ask: Ask) -> Verdict:
        reply = self._call(*self._acquire_args(ask, self.prefix, self._now_ms() or 0))
        allowed, by, retry_ms, requests, tokens, level_milli, held = reply
        by = by.decode() if isinstance(by, bytes) else by
        return Verdict(
            bool(allowed),
            by or None,
            int(retry_ms) / 1000.0,
            int(requests),
            int(tokens),
            int(level_milli) / 1000.0,
            int(held),
        )

    def _call(self, keys: list[str], args: list[Any]) -> Any:
        """The acquire script's reply: from the event loop's own connection when the
        check runs on one, else from this thread's own connection."""
        loop = suspend.current_loop()
        if loop is None or self._on_loops is None:
            return self._checks.call(keys, args)
        connection = self._on_loops.on(loop)
        sha, text = self._acquire.sha, self._acquire_text
        # No timer per check: the connection answers every call within its timeout,
        # with the reply or an error.
        outcome = suspend.until(
            lambda deliver: connection.evalsha(sha, text, keys, args, deliver), None
        )
        if isinstance(outcome, StoreError):
            raise outcome
        return outcome

    def release(self, lease_id: str, actual_tokens: int | None = None) -> Settlement | None:
        try:
            raw = self.redis.get(f"{self.prefix}:lease:{lease_id}")
        except redis.RedisError as exc:
            raise StoreError(f"Redis counters failed: {exc}") from None
        if raw is None:
            return None
        settled = _settlement(raw, actual_tokens)
        tenant = settled.tenant_id
        freed = self._run(
            self._release,
            [
                self._k(tenant, "leases"),
                self._k(tenant, "lease-payloads"),
                f"{self.prefix}:lease:{lease_id}",
                self._k(tenant, f"day:{settled.day}"),
            ],
            [lease_id, -1 if actual_tokens is None else actual_tokens, settled.reserved],
        )
        return settled if freed else None

    def release_many(self, releases: Sequence[Release]) -> list[Settlement | None]:
        """Those whose tenant is known in one round trip (one script call per tenant);
        the rest one by one (through the global lease index)."""
        results: list[Settlement | None] = [None] * len(releases)
        by_tenant: dict[str, list[int]] = {}
        for i, r in enumerate(releases):
            if r.tenant_id:
                by_tenant.setdefault(r.tenant_id, []).append(i)
            else:
                results[i] = self.release(r.lease_id, r.actual_tokens)
        if not by_tenant:
            return results
        replies = self._release_hinted(
            [(tenant, [releases[i] for i in indexes]) for tenant, indexes in by_tenant.items()]
        )
        for indexes, freed in zip(by_tenant.values(), replies, strict=True):
            for i, payload in zip(indexes, freed, strict=True):
                if payload:
                    results[i] = _settlement(payload, releases[i].actual_tokens)
        return results

    def _release_hinted(self, groups: list[tuple[str, list[Release]]]) -> list[Any]:
        calls: list[ScriptCall] = []
        for tenant, releases in groups:
            args: list[Any] = [self._k(tenant, "day:"), f"{self.prefix}:lease:"]
            for r in releases:
                args += (r.lease_id, -1 if r.actual_tokens is None else r.actual_tokens)
            keys = [self._k(tenant, "leases"), self._k(tenant, "lease-payloads")]
            calls.append((self._release_tenant.sha, self._release_text, keys, args))
        replies = self._checks.run(calls)  # one round trip; scripts Redis forgot reloaded
        failed = next((x for x in replies if isinstance(x, StoreError)), None)
        if failed is not None:
            raise failed
        return replies

    def add_usage(self, tenant_id: str, day: str, requests: int = 0, tokens: int = 0) -> None:
        key = self._k(tenant_id, f"day:{day}")
        try:
            with self.redis.pipeline() as pipe:
                pipe.hincrby(key, "requests", requests)
                pipe.hincrby(key, "tokens", tokens)
                pipe.expire(key, DAY_TTL)
                pipe.execute()
        except redis.RedisError as exc:
            raise StoreError(f"Redis counters failed: {exc}") from None

    def usage(self, tenant_id: str, day: str) -> tuple[int, int]:
        try:
            requests, tokens = self.redis.hmget(
                self._k(tenant_id, f"day:{day}"), "requests", "tokens"
            )
        except redis.RedisError as exc:
            raise StoreError(f"Redis counters failed: {exc}") from None
        return int(requests or 0), max(0, int(tokens or 0))

    def _now_ms(self) -> int | None:
        if self.clock is None:
            return None
        return int(self.clock.monotonic() * 1000)

    def _redis_now_ms(self) -> int:
        injected = self._now_ms()
        if injected is not None:
            return injected
        now_s, now_us = self.redis.time()
        return int(now_s) * 1000 + int(now_us) // 1000

    def in_flight(self, tenant_id: str) -> int:
        key = self._k(tenant_id, "leases")
        try:
            return int(self.redis.zcount(key, f"({self._redis_now_ms()}", "+inf"))
        except redis.RedisError as exc:
            raise StoreError(f"Redis counters failed: {exc}") from None

    def rate_left(self, tenant_id: str, limits: Limits) -> float:
        try:
            level, ts = self.redis.hmget(self._k(tenant_id, "bucket"), "level", "ts")
            now_ms = self._redis_now_ms()
        except redis.RedisError as exc:
            raise StoreError(f"Redis counters failed: {exc}") from None
        burst = float(limits.rate_limit.burst)
        if level is None:
            return burst
        elapsed = max(0.0, (now_ms - int(ts or 0)) / 1000.0)
        return min(burst, float(level) + elapsed * limits.rate_limit.requests_per_minute / 60.0)

    def maintain(self, keep_days: frozenset[str] = frozenset()) -> int:
        return 0  # every key carries a TTL; leases expire by score at the next acquire

    def end_leases(self) -> list[Settlement]:
        return []  # shared: another replica (or this one, restarted) releases them

    def drain_expired(self) -> list[Settlement]:
        key = f"{self.prefix}:expired"
        try:
            with self.redis.pipeline() as pipe:
                pipe.lrange(key, 0, -1)
                pipe.delete(key)
                payloads, _ = pipe.execute()
        except redis.RedisError as exc:
            raise StoreError(f"Redis counters failed: {exc}") from None
        return [_settlement(p, None) for p in payloads]

    def leases_held(self) -> int:
        return 0  # per tenant only (in_flight): a global count would need a scan

    def ping(self) -> None:
        try:
            self.redis.ping()
        except redis.RedisError as exc:
            raise StoreError(f"Redis counters at {redact(self.url)} unreachable: {exc}") from None

    def close(self) -> None:
        if self._on_loops is not None:
            self._on_loops.close()
        self._checks.close()
        self.redis.close()


def _settlement(raw: bytes | str, actual: int | None) -> Settlement:
    tenant, key_id, day, reserved, route, method, price, started, request_id = json.loads(raw)
    return Settlement(
        tenant,
        key_id,
        day,
        int(reserved),
        actual,
        route,
        method,
        float(price),
        float(started),
        request_id,
    )
