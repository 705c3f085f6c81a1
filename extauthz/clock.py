"""Time, injected: the core never calls time.time() itself, so tests move time by hand."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Wall-clock time in Unix seconds (for expiry and records)."""
        ...

    def monotonic(self) -> float:
        """A clock that never goes back (for cache ages and intervals)."""
        ...


class SystemClock:
    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


SYSTEM_CLOCK = SystemClock()
