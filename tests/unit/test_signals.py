"""Stop and reload signals: handled promptly, and never inside a lock the main thread
may hold (a stop that deadlocked on its own Event was found in CI)."""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
import time

from extauthz.signals import StopSignals


def send_later(sig: signal.Signals, delay: float) -> threading.Thread:
    def send() -> None:
        time.sleep(delay)
        os.kill(os.getpid(), sig)

    thread = threading.Thread(target=send)
    thread.start()
    return thread


def test_reloads_run_in_wait_on_the_main_thread_never_inside_the_handler() -> None:
    """SIGHUP asks for a reload; the callback runs from wait(), outside any signal
    handler (where taking a lock could deadlock); SIGINT then ends the wait."""
    inside_handler: list[bool] = []

    def reload() -> None:
        frames, frame = [], sys._getframe()
        while frame is not None:
            frames.append(frame.f_code.co_name)
            frame = frame.f_back
        inside_handler.append("_hangup" in frames)

    with StopSignals() as signals:
        signals.on_reload = reload
        senders = [send_later(signal.SIGHUP, 0.05), send_later(signal.SIGINT, 0.3)]
        started = time.monotonic()
        assert signals.wait() == "SIGINT"
        for sender in senders:
            sender.join()
    assert time.monotonic() - started < 2.0
    assert inside_handler == [False]


def test_a_stop_signal_at_any_moment_of_the_wait_ends_it() -> None:
    """200 SIGINTs, each at a random moment of a busy wait (1 ms polls): every wait
    returns within a second. The handler records the signal and takes no lock."""
    rng = random.Random(14)  # noqa: S311 - test timing, not secrets
    slowest = 0.0
    for _ in range(200):
        with StopSignals(poll=0.001) as signals:
            sender = send_later(signal.SIGINT, rng.uniform(0, 0.004))
            started = time.monotonic()
            assert signals.wait() == "SIGINT"
            slowest = max(slowest, time.monotonic() - started)
            sender.join()
    assert slowest < 1.0


def test_wait_returns_when_the_watched_process_exits() -> None:
    """With ``alive`` returning False, wait() ends with "exited" without any signal."""
    with StopSignals(poll=0.01) as signals:
        assert signals.wait(lambda: False) == "exited"
