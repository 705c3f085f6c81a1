"""Signals for a long-running command: SIGTERM and SIGINT stop it gracefully, SIGHUP
reloads the policy, and SIGUSR1 prints every thread's stack to stderr (to see what a
server that does not stop, or answer, is doing) and goes on.

The handlers only record what arrived. A Python signal handler runs on the main thread
between two of its bytecodes, possibly while that thread holds a lock; a handler that
took one (an ``Event.set()``, logging) could wait forever for itself. That happened: a
SIGINT landed while ``Event.wait`` held the event's own lock, and `up` never stopped.
So ``wait()`` polls, and runs the reload callback itself, outside any handler.
"""

from __future__ import annotations

import faulthandler
import signal
import sys
import time
from collections.abc import Callable
from types import FrameType


class StopSignals:
    """Catches SIGTERM and SIGINT from the moment it is created, so a signal that arrives
    while the server is still starting is not lost (nor kills it without a graceful
    stop): ``wait()`` then returns as soon as it is called."""

    def __init__(self, poll: float = 0.1) -> None:
        self.poll = poll
        self.received: list[str] = []
        self.reloads_asked = 0
        self.on_reload: Callable[[], None] | None = None  # SIGHUP
        self._previous = {
            sig: signal.signal(sig, self._handler) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        self._previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._hangup)
        # In C, from any state of the interpreter: works when Python threads are stuck.
        faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)

    def _hangup(self, signum: int, frame: FrameType | None) -> None:
        if self.on_reload is None:
            self._handler(signum, frame)  # nothing to reload: a hang-up stops, as before
        else:
            self.reloads_asked += 1  # run by wait(), outside this handler

    def _handler(self, signum: int, _frame: FrameType | None) -> None:
        self.received.append(signal.Signals(signum).name)  # no lock taken: see above

    def wait(self, alive: Callable[[], bool] | None = None) -> str:
        """Block until a stop signal, or until ``alive()`` turns False; returns the
        cause. Reloads asked meanwhile (SIGHUP) are run here, one per signal."""
        reloads_done = 0
        while not self.received:
            while reloads_done < self.reloads_asked and self.on_reload is not None:
                reloads_done += 1
                self.on_reload()
            if alive is not None and not alive():
                return "exited"
            time.sleep(self.poll)
        return self.received[0]

    def __enter__(self) -> StopSignals:
        return self

    def __exit__(self, *_exc: object) -> None:
        for sig, old in self._previous.items():
            signal.signal(sig, old)
        faulthandler.unregister(signal.SIGUSR1)
