"""Transport adapters: the only modules that import gRPC or protobuf."""

from __future__ import annotations

from collections.abc import Callable

from extauthz.model import Decision


def last_value(value: str | tuple[str, ...] | None) -> str:
    """A header's value, or its last value when it was sent more than once."""
    if isinstance(value, tuple):
        return value[-1]
    return value or ""


class EncodedAnswers:
    """Wire bytes per Decision, encoded once. The authorizer reuses one Decision object
    per key and header (and per deny reason), so its encoding can be reused too. Each
    entry holds the decision itself, so its id() cannot be recycled while cached."""

    # Hot keys, not every cached key: a key past the bound is encoded again (a few us).
    # Through Envoy, 100,000 distinct keys took the sidecar to 211 MB with a bound of
    # 100,000 and to 180 MB with 10,000 (bench/coldkeys.py, HTTP service).
    def __init__(self, encode: Callable[[Decision], bytes], limit: int = 10_000) -> None:
        self.encode = encode
        self.limit = limit
        self._cache: dict[int, tuple[Decision, bytes]] = {}

    def __call__(self, decision: Decision) -> bytes:
        if not decision.reusable:
            return self.encode(decision)
        cached = self._cache.get(id(decision))
        if cached is not None and cached[0] is decision:
            return cached[1]
        data = self.encode(decision)
        if len(self._cache) >= self.limit:
            self._cache = {}  # a new dict: concurrent readers keep a consistent old one
        self._cache[id(decision)] = (decision, data)
        return data
