"""Checks on an event loop that wait for Redis (or PostgreSQL) without blocking it.

The HTTP-service transport runs each check in a greenlet on its event loop. When the
check must wait for a network round trip (a Redis counters call, a PostgreSQL key
lookup), the work is handed to that backend's own thread and the greenlet switches back
to the loop, which serves other connections; the answer (or the timeout) switches into
the greenlet again, on the loop's thread. The decision code stays plain synchronous
Python, and no pool of worker threads is involved.

Anywhere else (gRPC's threads, the CLI, tests) :func:`until` returns NOT_SUSPENDABLE and
the caller blocks as usual.

Check greenlets are kept and reused: a new greenlet costs a fresh frame stack (an mmap
and munmap per check, measured with strace), which was a tenth of the check's CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

import greenlet

NOT_SUSPENDABLE = object()
TIMED_OUT = object()

Deliver = Callable[[Any], None]


IDLE_KEPT = 256  # idle check greenlets kept per thread for the next checks

log = logging.getLogger("extauthz.suspend")
_idle = threading.local()
_loop_closers: dict[asyncio.AbstractEventLoop, list[Callable[[], None]]] = {}


class CheckGreenlet(greenlet.greenlet):
    """Runs checks, one at a time; a check may suspend itself while a round trip is in
    flight. Between checks it waits, idle, to be given the next one."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(self._serve)
        self.loop = loop

    def _serve(self, run: Callable[[], None]) -> None:
        idle = _idle_list()
        while True:
            try:
                run()
            except Exception:  # a check answers its own errors; this is a last resort
                log.exception("check failed outside its own error handling")
            if len(idle) >= IDLE_KEPT or self.parent is None:
                return
            idle.append(self)
            run = self.parent.switch()  # to the loop, until start() hands us a check


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's where it is installed (a dependency on Linux and macOS)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def on_loop_end(loop: asyncio.AbstractEventLoop, close: Callable[[], None]) -> None:
    """Have ``close`` run (on the loop) when the server on ``loop`` stops: connections
    opened on a loop must be closed on it, before it closes."""
    _loop_closers.setdefault(loop, []).append(close)


def end_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Run what on_loop_end() registered for ``loop``; the server calls this last."""
    for close in _loop_closers.pop(loop, []):
        try:
            close()
        except Exception:
            log.exception("closing a connection of the event loop failed")


def _idle_list() -> list[CheckGreenlet]:
    idle: list[CheckGreenlet] | None = getattr(_idle, "greenlets", None)
    if idle is None:
        idle = _idle.greenlets = []
    return idle


def start(run: Callable[[], None], loop: asyncio.AbstractEventLoop) -> None:
    """Run ``run`` now, on this (the loop's) thread, until it finishes or suspends."""
    idle = _idle_list()
    current = greenlet.getcurrent()
    worker = None
    # A kept greenlet switches back to the greenlet that created it, so it is used only
    # from that one (the loop's own), and only on the loop it was made for; others left
    # from an earlier loop on this thread are dropped.
    while idle and worker is None and not isinstance(current, CheckGreenlet):
        candidate = idle.pop()
        if candidate.loop is loop and candidate.parent is current:
            worker = candidate
    (worker or CheckGreenlet(loop)).switch(run)


def current_loop() -> asyncio.AbstractEventLoop | None:
    """The loop of the check greenlet running now; None outside one."""
    current = greenlet.getcurrent()
    return current.loop if isinstance(current, CheckGreenlet) else None


def until(register: Callable[[Deliver], None], timeout: float | None) -> Any:
    """Suspend the current check until ``deliver(value)`` is called (from any thread)
    and return the value; TIMED_OUT after ``timeout`` seconds (None: the registered
    party guarantees an answer, its own error included); NOT_SUSPENDABLE (at once,
    before ``register`` runs) outside a check greenlet."""
    current = greenlet.getcurrent()
    parent = current.parent
    if not isinstance(current, CheckGreenlet) or parent is None:
        return NOT_SUSPENDABLE
    loop = current.loop
    loop_thread = threading.get_ident()
    resumed = suspended = False

    def resume(value: Any) -> None:  # on the loop's thread
        nonlocal resumed
        if resumed:
            return  # the answer after the timeout, or the timeout after the answer
        resumed = True
        if timer is not None:
            timer.cancel()
        current.switch(value)

    def deliver(value: Any) -> None:  # on any thread
        if suspended and greenlet.getcurrent() is parent and threading.get_ident() == loop_thread:
            # Already on the loop, outside any check (a reply read by the loop itself):
            # resume now instead of by a round through the loop's wake-up pipe.
            resume(value)
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
            loop.call_soon_threadsafe(resume, value)

    # The answer cannot arrive before the timer exists: resume() runs on this thread,
    # after the switch below. A register() that raises leaves no timer behind.
    register(deliver)
    timer = loop.call_later(timeout, resume, TIMED_OUT) if timeout is not None else None
    suspended = True
    return parent.switch()  # back to the loop until resume() switches here
