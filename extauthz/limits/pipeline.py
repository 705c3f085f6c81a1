"""Concurrent checks share Redis round trips, through redis-py: what a ``rediss://`` URL
uses when it names a TLS option extauthz's own clients (resp.py, blocking.py) do not
handle (endpoint.py).

Every check still runs its own script, in exactly one round trip, but the checks that
arrive while a round trip is in flight go together in the next one, pipelined, from a
single I/O thread. Measured on the bench host (2 cores), 16 threads each making their
own call cost ~330 us of CPU per call, mostly threads contending for the GIL and the
connection pool; pipelined from one thread, a fraction of that (docs/benchmarks.md).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import redis
from redis.commands.core import Script

from extauthz import suspend
from extauthz.errors import StoreError
from extauthz.limits.resp import ScriptCall
from extauthz.threadnames import named

log = logging.getLogger("extauthz.limits")


class _Call:
    __slots__ = (
        "answered",
        "args",
        "cancelled",
        "done",
        "error",
        "keys",
        "on_done",
        "result",
        "script",
    )

    def __init__(
        self,
        script: tuple[str, str],
        keys: list[str],
        args: list[Any],
        on_done: Callable[[_Call], None] | None = None,
    ) -> None:
        self.script = script  # sha, text
        self.keys = keys
        self.args = args
        self.on_done = on_done
        self.done = threading.Event()
        self.result: Any = None
        self.error: StoreError | None = None
        self.answered = False
        self.cancelled = False

    def fail(self, error: StoreError) -> None:
        if not self.answered:
            self.error, self.answered = error, True


class ScriptPipeline:
    """Runs ``script`` (or the script a call names) for each caller, batching the
    calls that wait at the same time into one round trip."""

    def __init__(
        self, client: redis.Redis, script: Script, wait: float, max_batch: int = 128
    ) -> None:
        self.client = client
        text = script.script
        self.script = (script.sha, text if isinstance(text, str) else bytes(text).decode())
        self.wait = wait  # the most a caller waits for its answer
        self.max_batch = max_batch
        self.batches = 0
        self.calls = 0
        self._queue: deque[_Call] = deque()
        self._ready = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(
            target=named("extauthz-redis", self._run), name="extauthz-redis", daemon=True
        )
        self._thread.start()

    def submit(
        self,
        keys: list[str],
        args: list[Any],
        on_done: Callable[[_Call], None] | None = None,
        script: tuple[str, str] | None = None,
    ) -> _Call:
        """Queue a call; ``on_done(call)`` runs on the I/O thread when it is answered."""
        call = _Call(script or self.script, keys, args, on_done)
        with self._ready:
            if self._closed:
                raise StoreError("Redis counters are closed")
            self._queue.append(call)
            self._ready.notify()
        return call

    def call(self, keys: list[str], args: list[Any]) -> Any:
        """The script's reply, waiting for it (from an event loop: without blocking it,
        see suspend.py)."""
        submitted: list[_Call] = []
        outcome = suspend.until(
            lambda deliver: submitted.append(self.submit(keys, args, deliver)), self.wait
        )
        if outcome is suspend.NOT_SUSPENDABLE:
            return self.result(self.submit(keys, args))
        if outcome is suspend.TIMED_OUT:
            submitted[0].cancelled = True
            raise StoreError(f"Redis counters did not answer within {self.wait * 1000:.0f} ms")
        return _reply(outcome)

    def run(self, calls: list[ScriptCall]) -> list[Any]:
        """Each (sha, script text, keys, args) call's reply, or its StoreError, sent
        together (blocking: for threads, not a check greenlet)."""
        submitted = [self.submit(keys, args, script=(sha, text)) for sha, text, keys, args in calls]
        replies: list[Any] = []
        for call in submitted:
            try:
                replies.append(self.result(call))
            except StoreError as exc:
                replies.append(exc)
        return replies

    def result(self, call: _Call) -> Any:
        """Block until ``call`` is answered (at most ``wait``); its reply or StoreError."""
        if not call.done.wait(self.wait):
            # Not sent yet: it never will be. Already sent: it may still be charged (a
            # slot that then expires by its lease; a request counted once too often).
            call.cancelled = True
            raise StoreError(f"Redis counters did not answer within {self.wait * 1000:.0f} ms")
        return _reply(call)

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._queue and not self._closed:
                    self._ready.wait()
                if self._closed and not self._queue:
                    return
                batch: list[_Call] = []
                while self._queue and len(batch) < self.max_batch:
                    call = self._queue.popleft()
                    if not call.cancelled:
                        batch.append(call)
            if batch:
                self._send(batch)

    def _send(self, batch: list[_Call]) -> None:
        self.batches += 1
        self.calls += len(batch)
        try:
            retry = self._round_trip(batch)
            if retry:
                # Redis restarted and forgot the scripts (BAD_INPUTS #17).
                for text in {call.script[1] for call in retry}:
                    self.client.script_load(text)
                self._round_trip(retry)
        except redis.RedisError as exc:
            error = StoreError(f"Redis counters failed: {exc}")
            # Those queued meanwhile would wait out the same timeout: fail them now.
            with self._ready:
                waiting, self._queue = list(self._queue), deque()
            for call in waiting:
                call.fail(error)
                _finish(call)
            for call in batch:
                call.fail(error)
        except Exception as exc:  # never leave a caller waiting for nothing
            log.exception("Redis pipeline failed unexpectedly")
            for call in batch:
                call.fail(StoreError(f"Redis counters failed: {type(exc).__name__}"))
        for call in batch:
            call.fail(StoreError("Redis counters failed: no reply"))  # if still unanswered
            _finish(call)

    def _round_trip(self, calls: list[_Call]) -> list[_Call]:
        """One pipelined round trip; returns the calls Redis had no script for (they
        did not run at all, so running them again is safe)."""
        with self.client.pipeline(transaction=False) as pipe:
            for call in calls:
                pipe.evalsha(call.script[0], len(call.keys), *call.keys, *call.args)
            replies = pipe.execute(raise_on_error=False)
        retry = []
        for call, reply in zip(calls, replies, strict=True):
            if isinstance(reply, redis.exceptions.NoScriptError):
                retry.append(call)
            elif isinstance(reply, Exception):
                call.fail(StoreError(f"Redis counters failed: {reply}"))
            else:
                call.result, call.answered = reply, True
        return retry

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify()
        self._thread.join(timeout=2.0)


def _reply(call: _Call) -> Any:
    if call.error is not None:
        raise call.error
    return call.result


def _finish(call: _Call) -> None:
    call.done.set()
    if call.on_done is not None:
        try:
            call.on_done(call)
        except Exception:
            log.exception("Redis reply callback failed")
