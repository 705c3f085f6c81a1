"""What lua/acquire.lua is called with: its KEYS and ARGV for one request.

Key names, the limits' arguments and the head of the lease's payload are the same for
every request of one key on one route on one day, so they are built once and cached
(building them for each check was a tenth of its cost in the sidecar).
"""

from __future__ import annotations

import json
from typing import Any

from extauthz.limits.base import Ask
from extauthz.policy import Limits

DAY_TTL = 3 * 86_400  # a day's counts outlive the day (yesterday's late settlements)
CACHED = 4096  # shapes kept; the cache starts over when full

_json_string = json.encoder.encode_basestring_ascii
_Shape = tuple[list[str], list[Any], str]  # keys, limit arguments, payload head


def tenant_key(prefix: str, tenant_id: str, part: str) -> str:
    """Everything of one tenant under one hash tag (one Redis Cluster slot)."""
    return f"{prefix}:{{{tenant_id}}}:{part}"


class AcquireArgs:
    def __init__(self, lease_ttl: float) -> None:
        self.lease_ttl = lease_ttl
        self._shapes: dict[tuple[Any, ...], tuple[Limits, float, _Shape]] = {}

    def __call__(self, ask: Ask, prefix: str, now_ms: int) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV; ``now_ms`` 0 lets the script read Redis's clock."""
        keys, limit_args, head = self._shape(ask, prefix)
        # The lease's payload (for its usage record) is JSON: the cached head, then the
        # fields of this request.
        payload = f"{head}{ask.started!r},{_json_string(ask.lease_id)}]"
        args = [
            ask.cost,
            ask.tokens,
            *limit_args,
            ask.lease_id or f"-anonymous-{id(ask)}",
            payload,
            DAY_TTL,
            now_ms,
        ]
        return keys, args

    def _shape(self, ask: Ask, prefix: str) -> _Shape:
        limits = ask.limits
        shape = (prefix, ask.tenant_id, ask.key_id, ask.day, ask.tokens, ask.route, ask.method)
        cached = self._shapes.get(shape)
        if cached is not None and cached[0] is limits and cached[1] == ask.price:
            return cached[2]
        tenant, key_rate = ask.tenant_id, limits.key_rate_limit
        keys = [
            tenant_key(prefix, tenant, "bucket"),
            tenant_key(prefix, tenant, f"key:{ask.key_id}"),
            tenant_key(prefix, tenant, f"day:{ask.day}"),
            tenant_key(prefix, tenant, "leases"),
            tenant_key(prefix, tenant, "lease-payloads"),
            f"{prefix}:lease:",
            f"{prefix}:expired",
        ]
        limit_args = [
            limits.rate_limit.burst,
            limits.rate_limit.requests_per_minute / 60.0,
            key_rate.burst if key_rate else 0,
            key_rate.requests_per_minute / 60.0 if key_rate else 0,
            limits.requests_per_day,
            limits.tokens_per_day if limits.tokens_per_day is not None else -1,
            limits.concurrent,
            int(self.lease_ttl * 1000),
        ]
        fields = [tenant, ask.key_id, ask.day, ask.tokens, ask.route, ask.method, ask.price]
        head = json.dumps(fields)[:-1] + ", "
        if len(self._shapes) >= CACHED:
            self._shapes.clear()
        self._shapes[shape] = (limits, ask.price, (keys, limit_args, head))
        return keys, limit_args, head
