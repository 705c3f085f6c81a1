"""Signals for a long-running command: SIGTERM and SIGINT stop it gracefully, SIGHUP
reloads the policy, and SIGUSR1 prints every thread's stack to stderr (to see what a
server that does not stop, or answer, is doing) and goes on."""

from __future__ import annotations

import faulthandler
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType


class StopSignals:
    """Catches SIGTERM and SIGINT from the moment it is created, so a signal that arrives
    while the server is still starting is not lost (nor kills it without a graceful
    stop): ``wait()`` then returns as soon as it is called."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self.received: list[str] = []
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
            self.on_reload()

    def _handler(self, signum: int, _frame: FrameType | None) -> None:
        self.received.append(signal.Signals(signum).name)
        self._stop.set()

    def wait(self, alive: Callable[[], bool] | None = None) -> str:
        """Block until a signal, or until ``alive()`` turns False; returns the cause."""
        while not self._stop.wait(0.2):
            if alive is not None and not alive():
                return "exited"
        return self.received[0]

    def __enter__(self) -> StopSignals:
        return self

    def __exit__(self, *_exc: object) -> None:
        for sig, old in self._previous.items():
            signal.signal(sig, old)
        faulthandler.unregister(signal.SIGUSR1)
