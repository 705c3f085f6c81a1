"""The sidecar's own threads carry operating-system names, so `top -H` and the bench
can tell the access-log, writer and transport threads from the check threads."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from extauthz.threadnames import name_this_thread, named

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="names come from /proc")


def os_names() -> set[str]:
    return {p.read_text().strip() for p in Path("/proc/self/task").glob("*/comm")}


def test_a_named_thread_shows_its_name_in_proc_and_longer_names_are_cut_to_15_bytes() -> None:
    """The name is the thread's own (the caller keeps its name); a name over 15 bytes
    (the kernel's limit) is cut rather than refused."""
    seen: list[set[str]] = []
    release = threading.Event()

    def body() -> None:
        seen.append(os_names())
        release.wait(5)

    thread = threading.Thread(target=named("extauthz-a-very-long-name", body))
    thread.start()
    for _ in range(100):
        if seen:
            break
        release.wait(0.01)
    release.set()
    thread.join(5)
    assert "extauthz-a-very" in seen[0]
    assert "extauthz-a-very" not in os_names()


def test_naming_the_same_thread_twice_is_harmless() -> None:
    """The access-log handler names its thread on every stream: the second call changes
    nothing."""
    done: list[str] = []

    def body() -> None:
        name_this_thread("extauthz-twice")
        name_this_thread("extauthz-twice")
        done.append(Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text())

    thread = threading.Thread(target=body)
    thread.start()
    thread.join(5)
    assert done == ["extauthz-twice\n"]
