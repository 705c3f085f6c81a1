"""Checks on an event loop that wait for Redis (or PostgreSQL) without blocking it.

The HTTP-service transport runs each check in a greenlet on its event loop. When the
check must wait for a network round trip (a Redis counters call, a PostgreSQL key
lookup), the work is handed to that backend's own thread and the greenlet switches back
to the loop, which serves other connections; the answer (or the timeout) switches into
the greenlet again, on the loop's thread. The decision code stays plain synchronous
Python, and no pool of worker threads is involved.

Anywhere else (gRPC's threads, the CLI, tests) :func:`until` returns NOT_SUSPENDABLE and
the caller blocks as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import greenlet

NOT_SUSPENDABLE = object()
TIMED_OUT = object()

Deliver = Callable[[Any], None]


class CheckGreenlet(greenlet.greenlet):
    """A check that may suspend itself while a round trip is in flight."""

    def __init__(self, run: Callable[[], None], loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(run)
        self.loop = loop


def start(run: Callable[[], None], loop: asyncio.AbstractEventLoop) -> None:
    """Run ``run`` now, on this (the loop's) thread, until it finishes or suspends."""
    CheckGreenlet(run, loop).switch()


def until(register: Callable[[Deliver], None], timeout: float) -> Any:
    """Suspend the current check until ``deliver(value)`` is called (from any thread)
    and return the value; TIMED_OUT after ``timeout`` seconds; NOT_SUSPENDABLE (at
    once, before ``register`` runs) outside a check greenlet."""
    current = greenlet.getcurrent()
    parent = current.parent
    if not isinstance(current, CheckGreenlet) or parent is None:
        return NOT_SUSPENDABLE
    loop = current.loop
    resumed = False

    def resume(value: Any) -> None:  # on the loop's thread
        nonlocal resumed
        if resumed:
            return  # the answer after the timeout, or the timeout after the answer
        resumed = True
        timer.cancel()
        current.switch(value)

    def deliver(value: Any) -> None:  # on any thread
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
            loop.call_soon_threadsafe(resume, value)

    # The answer cannot arrive before the timer exists: resume() runs on this thread,
    # after the switch below. A register() that raises leaves no timer behind.
    register(deliver)
    timer = loop.call_later(timeout, resume, TIMED_OUT)
    return parent.switch()  # back to the loop until resume() switches here
