"""RateLimit-Policy and RateLimit headers (IETF httpapi ratelimit-headers draft, -10).

Each limit is a named policy: ``"burst"`` (the tenant's token bucket: q tokens,
refilled over w seconds), ``"key-burst"`` (the key's bucket), ``"daily"`` (requests per
quota day), ``"daily-tokens"`` and ``"concurrency"`` (slots; no window). An allowed
response describes the bucket and the daily quota; a 429 names only the limit that
denied, with ``r=0`` and ``t`` equal to Retry-After.
"""

from __future__ import annotations

import math
from functools import lru_cache

from extauthz.limits.base import CONCURRENT, DAY, KEY_RATE, RATE, TOKENS_DAY
from extauthz.policy import Limits, RateLimit

POLICY_NAMES = {
    RATE: "burst",
    KEY_RATE: "key-burst",
    DAY: "daily",
    TOKENS_DAY: "daily-tokens",
    CONCURRENT: "concurrency",
}


def whole_seconds(seconds: float) -> int:
    """Retry-After and ``t=``: whole seconds, rounded up, never 0 (0 invites a retry storm)."""
    if not math.isfinite(seconds):
        return 86_400
    return max(1, math.ceil(seconds - 1e-9))


def _window(rate: RateLimit) -> int:
    return whole_seconds(rate.burst * 60 / rate.requests_per_minute)


def _policy_item(by: str, limits: Limits) -> str:
    name = POLICY_NAMES[by]
    if by == RATE:
        return f'"{name}";q={limits.rate_limit.burst};w={_window(limits.rate_limit)}'
    if by == KEY_RATE and limits.key_rate_limit is not None:
        return f'"{name}";q={limits.key_rate_limit.burst};w={_window(limits.key_rate_limit)}'
    if by == DAY:
        return f'"{name}";q={limits.requests_per_day};w=86400'
    if by == TOKENS_DAY:
        return f'"{name}";q={limits.tokens_per_day};qu="tokens";w=86400'
    return f'"{name}";q={limits.concurrent}'


@lru_cache(maxsize=4096)
def policy_header(limits: Limits, by: str | None = None) -> str:
    """``RateLimit-Policy``: the limit named ``by``, or the bucket and the daily quota."""
    if by is not None:
        return _policy_item(by, limits)
    return _policy_item(RATE, limits) + ", " + _policy_item(DAY, limits)


# Limits objects live as long as their policy snapshot; hashing a frozen dataclass of
# nine fields on every request (lru_cache) cost more than the rest of this function.
_ALLOW_POLICY: dict[int, tuple[Limits, str]] = {}


def allow_headers(
    limits: Limits, rate_left: float, requests_today: int, day_ends_in: float
) -> tuple[tuple[str, str], ...]:
    cached = _ALLOW_POLICY.get(id(limits))
    if cached is None or cached[0] is not limits:
        if len(_ALLOW_POLICY) > 4096:
            _ALLOW_POLICY.clear()
        cached = _ALLOW_POLICY[id(limits)] = (limits, policy_header(limits))
    rate = limits.rate_limit
    refill = (rate.burst - rate_left) * 60 / rate.requests_per_minute
    left_today = max(0, limits.requests_per_day - requests_today)
    return (
        ("ratelimit-policy", cached[1]),
        (
            "ratelimit",
            f'"burst";r={math.floor(rate_left)};t={whole_seconds(refill) if refill > 0 else 0}, '
            f'"daily";r={left_today};t={whole_seconds(day_ends_in)}',
        ),
    )


def deny_headers(limits: Limits, by: str, retry_after: int) -> tuple[tuple[str, str], ...]:
    return (
        ("retry-after", str(retry_after)),
        ("ratelimit-policy", policy_header(limits, by)),
        ("ratelimit", f'"{POLICY_NAMES[by]}";r=0;t={retry_after}'),
    )
