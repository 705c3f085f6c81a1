"""Operating-system names for the sidecar's own threads (``top -H``, ``ps -L``, and the
bench's CPU split by thread). Python 3.11 names threads only inside Python."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading
from collections.abc import Callable
from typing import Any

_PR_SET_NAME = 15  # linux/prctl.h
_prctl: Any = None
if sys.platform == "linux":
    try:
        _prctl = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).prctl
    except (OSError, AttributeError):
        _prctl = None
_named = threading.local()


def name_this_thread(name: str) -> None:
    """Give the calling thread ``name`` (15 bytes at most) in /proc/<pid>/task/*/comm,
    once per thread: later calls on the same thread are a lookup."""
    if getattr(_named, "name", None) == name:
        return
    _named.name = name
    if _prctl is not None:
        _prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def named(name: str, target: Callable[[], object]) -> Callable[[], None]:
    """``target`` run on a thread that first names itself ``name``."""

    def run() -> None:
        name_this_thread(name)
        target()

    return run
