"""Redis calls for threads that cannot yield (gRPC's check threads, the access log): each
thread has its own plain blocking connection, and sends and reads its call itself.

It replaced a Redis thread that ran the event-loop client (resp.py) for the other
threads. Handing each call to that thread and back cost two thread wake-ups and two
hand-overs of the GIL per check. On the bench host's 2 cores, those cost more CPU than
the round trip itself: the Redis thread alone took 70 µs per check in gRPC mode (docs/
benchmarks.md).

Timeouts are the kernel's (SO_RCVTIMEO, SO_SNDTIMEO), so a call is one send and usually
one receive, with no poll before each (TLS connections keep Python's socket timeout: see
BlockingConnection). A timeout or any error closes the connection, so a late reply is
never read as the next call's; the thread's next call opens a new one.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any

import hiredis

from extauthz.errors import StoreError
from extauthz.limits.endpoint import Endpoint
from extauthz.limits.resp import ScriptCall, error, forgot_script

_READ = 65536


class BlockingConnection:
    """One connection, used by one thread at a time."""

    def __init__(self, endpoint: Endpoint, timeout: float, wait: float | None = None) -> None:
        self.timeout = timeout
        # Each receive waits at most ``timeout``; a reply in several pieces at most
        # ``wait`` in all (a backstop, like Envoy's own timeout above it).
        self.wait = wait if wait is not None else timeout
        try:
            self._sock = endpoint.connect(timeout)  # TLS handshake included
        except OSError as exc:
            reason = str(exc) or f"no connection within {timeout * 1000:.0f} ms"
            raise StoreError(f"Redis counters failed: {reason}") from None
        # Closed with its thread too (the thread's local is dropped when it ends).
        weakref.finalize(self, self._sock.close)
        if isinstance(self._sock, ssl.SSLSocket):
            # Python's own timeout: on a blocking TLS socket, OpenSSL's "want read"
            # after the kernel's timeout is retried forever.
            self._sock.settimeout(timeout)
        else:
            # Blocking, with the kernel's timeouts: Python's own timeout would poll
            # before every send and receive.
            self._sock.settimeout(None)
            seconds, micros = int(timeout), max(1, int(timeout % 1 * 1_000_000))
            limit = struct.pack("ll", seconds, micros)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)
        self._reader = hiredis.Reader()
        self.closed = False
        for reply in self._exchange([hiredis.pack_command(tuple(c)) for c in endpoint.hello]):
            if isinstance(reply, hiredis.ReplyError):  # AUTH, SELECT
                self.close()
                raise error(reply)

    def run(self, calls: Sequence[ScriptCall]) -> list[Any]:
        """Each call's reply (a StoreError for a script error), in one round trip;
        scripts Redis forgot (NOSCRIPT after a restart) are sent again as EVAL."""
        packed = [
            hiredis.pack_command(("EVALSHA", sha, len(keys), *keys, *args))
            for sha, _, keys, args in calls
        ]
        replies = self._exchange(packed)
        forgotten = [i for i, reply in enumerate(replies) if forgot_script(reply)]
        if forgotten:
            again = [
                hiredis.pack_command(("EVAL", text, len(keys), *keys, *args))
                for _, text, keys, args in (calls[i] for i in forgotten)
            ]
            for i, reply in zip(forgotten, self._exchange(again), strict=True):
                replies[i] = reply
        return [error(r) if isinstance(r, hiredis.ReplyError) else r for r in replies]

    def _exchange(self, commands: list[bytes]) -> list[Any]:
        if not commands:
            return []
        if self.closed:
            raise StoreError("Redis counters failed: connection closed")
        deadline = time.monotonic() + self.wait
        replies: list[Any] = []
        try:
            self._sock.sendall(b"".join(commands))
            while True:
                reply = self._reader.gets()
                if reply is not False:
                    replies.append(reply)
                    if len(replies) == len(commands):
                        return replies
                    continue
                if time.monotonic() > deadline:
                    raise TimeoutError
                data = self._sock.recv(_READ)
                if not data:
                    raise StoreError("Redis counters failed: connection closed by Redis")
                self._reader.feed(data)
        except (BlockingIOError, TimeoutError):  # the kernel's timeout (EAGAIN), or Python's
            self.close()
            raise StoreError(
                f"Redis counters did not answer within {self.timeout * 1000:.0f} ms"
            ) from None
        except (OSError, hiredis.ProtocolError) as exc:
            self.close()
            raise StoreError(f"Redis counters failed: {exc}") from None
        except StoreError:
            self.close()
            raise

    def close(self) -> None:
        """From any thread: a call blocked on this connection gets its error at once."""
        self.closed = True
        with contextlib.suppress(OSError):  # never connected, or already broken
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()


class ThreadConnections:
    """A BlockingConnection per calling thread, opened on its first call and again after
    one broke."""

    def __init__(
        self, endpoint: Endpoint, timeout: float, *, sha: str, script: str, wait: float
    ) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.wait = wait
        self.sha = sha
        self.script = script
        self.calls = 0  # scripts run (tests); a lost count under a race is harmless
        self._local = threading.local()
        # Every open connection, for close(); one that broke, or whose thread ended,
        # drops out by itself when its thread lets go of it.
        self._open: weakref.WeakSet[BlockingConnection] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._closed = False

    def call(self, keys: list[str], args: list[Any]) -> Any:
        """The acquire script's reply for ``keys`` and ``args``, or StoreError."""
        reply = self.run([(self.sha, self.script, keys, args)])[0]
        if isinstance(reply, StoreError):
            raise reply
        return reply

    def run(self, calls: list[ScriptCall]) -> list[Any]:
        """Each (sha, script text, keys, args) call's reply, or its StoreError, sent
        together; StoreError if the connection failed or Redis did not answer."""
        if not calls:
            return []
        connection = self._connection()
        self.calls += len(calls)
        return connection.run(calls)

    def _connection(self) -> BlockingConnection:
        connection: BlockingConnection | None = getattr(self._local, "connection", None)
        if connection is not None and not connection.closed:
            return connection
        if self._closed:
            raise StoreError("Redis counters are closed")
        connection = BlockingConnection(self.endpoint, self.timeout, self.wait)
        self._local.connection = connection
        with self._lock:
            self._open.add(connection)
        return connection

    def close(self) -> None:
        self._closed = True
        with self._lock:
            connections, self._open = list(self._open), weakref.WeakSet()
        for connection in connections:
            connection.close()
