"""Fakes shipped for tests (ours and users'): a hand-moved clock, a store that counts."""

from __future__ import annotations

import threading

from extauthz.model import APIKey, Tenant
from extauthz.store.memory import MemoryStore


class ManualClock:
    """Time that moves only when a test says so."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._now = start
        self._mono = 1000.0

    def now(self) -> float:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        self._now += seconds
        self._mono += seconds

    def jump(self, wall: float = 0.0, monotonic: float = 0.0) -> None:
        """Move one clock alone, either way: an NTP step, or a misbehaving host."""
        self._now += wall
        self._mono += monotonic


class CountingStore(MemoryStore):
    """A memory store that counts hot-path lookups and can be made to block or fail."""

    def __init__(self) -> None:
        super().__init__()
        self.lookups = 0
        self.fail: Exception | None = None
        self.gate: threading.Event | None = None  # lookups wait on it, after reading
        self.entered = threading.Event()

    def lookup(self, key_hash: bytes) -> tuple[APIKey, Tenant] | None:
        self.lookups += 1
        if self.fail is not None:
            raise self.fail
        found = super().lookup(key_hash)
        # Signal and wait after reading, so a test can change the store "mid-lookup".
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        return found
