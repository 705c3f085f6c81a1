"""Redis calls made on the HTTP service's own event loop, without a thread in between.

A check greenlet (suspend.py) that needs Redis queues its command on the loop's one
connection and yields; the commands queued in one turn of the loop leave in one write,
and each reply switches straight back into its check when it is read. Compared with
handing the call to an I/O thread this saves two thread hand-offs and the GIL traffic
they cause, which on the bench host cost more CPU than the round trip itself (docs/
benchmarks.md).

Failures look like redis-py's to the caller: a StoreError, shared by every call that
was waiting on the same broken connection (the breaker counts it once). A call not
answered within ``timeout`` breaks the connection; the next call opens a new one.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import hiredis

from extauthz import suspend
from extauthz.errors import StoreError
from extauthz.limits.endpoint import Endpoint

log = logging.getLogger("extauthz.limits")

Deliver = Callable[[Any], None]  # gets the reply, or the StoreError
ScriptCall = tuple[str, str, list[str], list[Any]]  # sha, script text, KEYS, ARGV


class _Waiting:
    __slots__ = ("deliver", "retry", "sent")

    def __init__(self, deliver: Deliver, sent: float, retry: tuple[Any, ...] | None) -> None:
        self.deliver = deliver
        self.sent = sent
        # For a Redis that forgot the script: the same call as EVAL (packed only then:
        # packing the script's text for every call cost more than the call itself).
        self.retry = retry


class LoopConnection(asyncio.Protocol):
    """One connection to Redis, used only from ``loop``'s thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, endpoint: Endpoint, timeout: float) -> None:
        self.loop = loop
        self.timeout = timeout
        self._waiting: deque[_Waiting] = deque()
        self._out: list[bytes] = []
        self._flush_soon = False
        self.commands = self.writes = 0  # sent so far, and in how many writes
        self._transport: asyncio.Transport | None = None
        self._reader = hiredis.Reader()
        self._timer: asyncio.TimerHandle | None = None
        self._suspect: _Waiting | None = None
        self.closed = False
        for command in endpoint.hello:  # AUTH, SELECT: their errors break the connection
            self._send(hiredis.pack_command(tuple(command)), self._hello_answered)
        loop.create_task(self._connect(endpoint))

    async def _connect(self, endpoint: Endpoint) -> None:
        try:
            # The TLS handshake, if any, within the same bound.
            await asyncio.wait_for(endpoint.open_on(self.loop, lambda: self), self.timeout)
        except (OSError, TimeoutError) as exc:
            reason = str(exc) or f"no connection within {self.timeout * 1000:.0f} ms"
            self._break(StoreError(f"Redis counters failed: {reason}"))

    def _hello_answered(self, reply: Any) -> None:
        if isinstance(reply, Exception):
            self._break(reply if isinstance(reply, StoreError) else error(reply))

    def evalsha(
        self, sha: str, script: str, keys: list[str], args: list[Any], deliver: Deliver
    ) -> None:
        """Run a script by its SHA (again as EVAL if Redis restarted and forgot it);
        ``deliver`` gets the reply, or a StoreError, on this loop's thread."""
        if self.closed:
            raise StoreError("Redis counters failed: connection closed")
        tail = (len(keys), *keys, *args)
        self._send(hiredis.pack_command(("EVALSHA", sha, *tail)), deliver, ("EVAL", script, *tail))

    def _send(self, command: bytes, deliver: Deliver, retry: tuple[Any, ...] | None = None) -> None:
        self._waiting.append(_Waiting(deliver, self.loop.time(), retry))
        self._out.append(command)
        if not self._flush_soon and not self._in_flight():
            # Everything queued in this turn of the loop goes in one write.
            self._flush_soon = True
            self.loop.call_soon(self._flush)
        if self._timer is None:
            self._timer = self.loop.call_at(self._waiting[0].sent + self.timeout, self._expire)

    def _flush(self) -> None:
        """One write at a time is in flight: what is queued meanwhile leaves when its
        replies are in, together. At low load each command leaves at once; under load a
        write (and Redis's read) carries many commands."""
        self._flush_soon = False
        if self._transport is not None and self._out and not self._in_flight():
            self.commands += len(self._out)
            self.writes += 1
            self._transport.write(b"".join(self._out))
            self._out.clear()

    def _in_flight(self) -> bool:
        """Whether written commands still wait for replies (every waiting call not in
        the unwritten queue has been written)."""
        return len(self._waiting) > len(self._out)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.closed:
            transport.close()
            return
        self._transport = transport  # type: ignore[assignment]
        self._flush()

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while True:
            try:
                reply = self._reader.gets()
            except hiredis.ProtocolError as exc:
                self._break(StoreError(f"Redis counters failed: {exc}"))
                return
            if reply is False:
                break
            if not self._waiting:
                self._break(StoreError("Redis counters failed: a reply nobody asked for"))
                return
            waiting = self._waiting.popleft()
            if isinstance(reply, hiredis.ReplyError):
                if waiting.retry is not None and forgot_script(reply):
                    self._send(hiredis.pack_command(waiting.retry), waiting.deliver)
                    continue
                reply = error(reply)
            _deliver(waiting.deliver, reply)  # the check runs on from here
            if self.closed:
                return  # broken meanwhile: the remaining waiters have had their error

        if self._out and not self._in_flight():
            self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._break(StoreError(f"Redis counters failed: {exc or 'connection closed by Redis'}"))

    def _expire(self) -> None:
        self._timer = None
        if not self._waiting:
            return
        oldest = self._waiting[0]
        due = oldest.sent + self.timeout
        if self.loop.time() < due:
            self._timer = self.loop.call_at(due, self._expire)
        elif oldest is not self._suspect:
            # Timers run before the loop reads its sockets: after a busy turn (a burst
            # of checks on a small host) the reply may already be here, unread. Look
            # once more after the next read.
            self._suspect = oldest
            self._timer = self.loop.call_later(0.001, self._expire)
        else:
            self._break(
                StoreError(f"Redis counters did not answer within {self.timeout * 1000:.0f} ms")
            )

    def _break(self, error: StoreError) -> None:
        """Fail every waiting call with one shared error and close: a reply that comes
        late must not be taken for the next call's."""
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._transport is not None:
            self._transport.abort()
            self._transport = None
        self._out.clear()
        waiting, self._waiting = self._waiting, deque()
        for entry in waiting:
            _deliver(entry.deliver, error)

    def close(self) -> None:
        self._break(StoreError("Redis counters are closed"))


class LoopConnections:
    """One LoopConnection per event loop, opened on first use there and again after it
    broke, closed when the loop's server stops."""

    def __init__(self, endpoint: Endpoint, timeout: float) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self._by_loop: dict[asyncio.AbstractEventLoop, LoopConnection] = {}

    def on(self, loop: asyncio.AbstractEventLoop) -> LoopConnection:
        """``loop``'s connection; call on the loop's thread."""
        connection = self._by_loop.get(loop)
        if connection is None or connection.closed:
            if connection is None:
                suspend.on_loop_end(loop, lambda: self._by_loop.pop(loop).close())
            connection = LoopConnection(loop, self.endpoint, self.timeout)
            self._by_loop[loop] = connection
        return connection

    def close(self) -> None:
        """From any thread: close them on their loops."""
        for loop, connection in list(self._by_loop.items()):
            if not loop.is_closed():
                loop.call_soon_threadsafe(connection.close)

    def __iter__(self) -> Iterator[LoopConnection]:
        return iter(list(self._by_loop.values()))


def forgot_script(reply: Any) -> bool:
    """Redis answered NOSCRIPT: it restarted and forgot the script (BAD_INPUTS #17),
    which therefore did not run at all and can be sent again as EVAL."""
    return isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT")


def error(reply: Exception) -> StoreError:
    """A Redis error reply as the StoreError callers get."""
    return StoreError(f"Redis counters failed: {reply}")


def _deliver(deliver: Deliver, value: Any) -> None:
    try:
        deliver(value)
    except Exception:
        log.exception("Redis reply callback failed")
