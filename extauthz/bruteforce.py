"""Brute-force detection: too many refused credentials from one source address, or for
one key id, within a window raise a SECURITY_ALERT; the source is then blocked for a
cool-down (policy ``security``). State is in memory, bounded, on the injected clock."""

from __future__ import annotations

import threading
from collections import OrderedDict, deque

from extauthz.clock import SYSTEM_CLOCK, Clock
from extauthz.policy import SecurityRules

MAX_TRACKED = 100_000  # sources + key ids remembered; the least recently failing go first


class BruteForceGuard:
    def __init__(self, clock: Clock = SYSTEM_CLOCK) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._blocked: OrderedDict[str, float] = OrderedDict()

    def blocked_for(self, source: str) -> float:
        """Seconds ``source`` stays blocked (0: not blocked)."""
        if not source or not self._blocked:
            return 0.0
        with self._lock:
            until = self._blocked.get(source)
            if until is None:
                return 0.0
            left = until - self.clock.monotonic()
            if left <= 0:
                del self._blocked[source]
                return 0.0
            return left

    def failed(self, source: str, key_id: str, rules: SecurityRules) -> list[tuple[str, str]]:
        """Count one refused credential; returns what just crossed the threshold, as
        ("source", address) and/or ("key_id", id), and blocks such a source."""
        now = self.clock.monotonic()
        crossed = []
        with self._lock:
            for kind, value in (("source", source), ("key_id", key_id)):
                if not value:
                    continue
                name = f"{kind}:{value}"
                times = self._failures.get(name)
                if times is None:
                    times = self._failures[name] = deque(maxlen=rules.max_auth_failures)
                    if len(self._failures) > MAX_TRACKED:
                        self._failures.popitem(last=False)
                else:
                    self._failures.move_to_end(name)
                times.append(now)
                if len(times) >= rules.max_auth_failures and now - times[0] <= rules.window_seconds:
                    times.clear()  # the next alert needs as many failures again
                    crossed.append((kind, value))
                    if kind == "source" and rules.block_seconds > 0:
                        self._blocked[value] = now + rules.block_seconds
                        if len(self._blocked) > MAX_TRACKED:
                            self._blocked.popitem(last=False)
        return crossed
