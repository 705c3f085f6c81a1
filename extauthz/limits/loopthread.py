"""Redis calls for threads that cannot yield (gRPC's check threads): one thread runs an
event loop with the same connection code the HTTP service's loop uses (resp.py), and a
caller blocks on a bare lock until its reply is in.

It replaced a redis-py pipeline on an I/O thread: a sampled profile (py-spy, GIL
holder) had that thread at 117 µs per check, most of it redis-py's layers around each
pipelined round trip (encoding, pool bookkeeping, a getpid per call) and the
``threading.Event`` that woke each caller (README, Benchmarks).
"""

from __future__ import annotations

import _thread
import threading
from typing import Any

from extauthz import suspend
from extauthz.errors import StoreError
from extauthz.limits.resp import LoopConnections, ScriptCall


class LoopThread:
    def __init__(self, connections: LoopConnections, sha: str, script: str, wait: float) -> None:
        self.connections = connections
        self.sha = sha
        self.script = script
        # Redis's own silence is caught by the connection's timeout; this is only a
        # backstop for this process being starved of CPU, kept under Envoy's 500 ms.
        self.wait = wait
        self.calls = 0
        self.loop = suspend.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="extauthz-redis", daemon=True
        )
        self._thread.start()

    def call(self, keys: list[str], args: list[Any]) -> Any:
        """The acquire script's reply for ``keys`` and ``args``; StoreError if Redis
        failed or did not answer within ``wait``."""
        reply = self.run([(self.sha, self.script, keys, args)])[0]
        if isinstance(reply, StoreError):
            raise reply
        return reply

    def run(self, calls: list[ScriptCall]) -> list[Any]:
        """Each (sha, script text, keys, args) call's reply, or its StoreError, sent
        together; StoreError if they were not all answered within ``wait``."""
        if not calls:
            return []
        done = _thread.allocate_lock()
        done.acquire()
        replies: list[Any] = [None] * len(calls)
        left = [len(calls)]

        def answer(i: int) -> suspend.Deliver:
            def deliver(value: Any) -> None:  # on the loop's thread
                replies[i] = value
                left[0] -= 1
                if left[0] == 0:
                    done.release()

            return deliver

        try:
            self.loop.call_soon_threadsafe(
                self._send, [(*call, answer(i)) for i, call in enumerate(calls)]
            )
        except RuntimeError:
            raise StoreError("Redis counters are closed") from None
        if not done.acquire(timeout=self.wait):
            # Already written, it may still be charged (a slot that then expires by its
            # lease; a request counted once too often); not written yet, it never runs.
            raise StoreError(f"Redis counters did not answer within {self.wait * 1000:.0f} ms")
        return replies

    def _send(self, calls: list[tuple[str, str, list[str], list[Any], suspend.Deliver]]) -> None:
        self.calls += len(calls)  # counted here, on the one loop thread, to be exact
        for sha, script, keys, args, deliver in calls:
            try:
                self.connections.on(self.loop).evalsha(sha, script, keys, args, deliver)
            except StoreError as exc:
                deliver(exc)

    def close(self) -> None:
        if not self._thread.is_alive():
            return

        def stop() -> None:
            suspend.end_loop(self.loop)  # closes this loop's connection
            self.loop.call_soon(self.loop.stop)  # after the closed transport is let go

        self.loop.call_soon_threadsafe(stop)
        self._thread.join(2.0)
        if not self._thread.is_alive():
            self.loop.close()
