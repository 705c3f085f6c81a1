"""Envoy ext_authz in HTTP-service mode: Envoy forwards the request's method, path and
allowed headers to us; a 200 allows it, anything else is the deny answer itself.

httptools (llhttp, the parser behind Node.js) on uvloop: a real HTTP/1.1 parser at a
cost close to a bare socket loop. Checks run inline on the event loop: a cache hit is
microseconds and a SQLite miss tens of microseconds, less than a thread hand-off costs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import httptools

from extauthz import suspend
from extauthz.authorizer import Authorizer
from extauthz.model import CheckInput, Decision
from extauthz.telemetry.metrics import Metrics
from extauthz.threadnames import named
from extauthz.transport import EncodedAnswers, last_value
from extauthz.transport.bridge import BridgeAnswers, read_bridged

log = logging.getLogger("extauthz.http")

INLINE, GREENLETS, THREADS = "inline", "greenlets", "threads"  # where checks wait
MAX_HEAD_BYTES = 64 * 1024  # Envoy's own header limit is 60 KiB; more is not from Envoy
MAX_BODY_BYTES = 16 * 1024 * 1024  # far above max_body_bytes: a bound, not a setting
_REASON = {
    200: b"OK",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
}


def render(decision: Decision, keep_alive: bool = True) -> bytes:
    """The HTTP/1.1 response Envoy turns into allow (200) or the client's deny answer."""
    lines = [b"HTTP/1.1 %d %s" % (decision.status, _REASON.get(decision.status, b"Error"))]
    if decision.allowed:
        # Set on the upstream request by Envoy (allowed_upstream_headers: overwrite).
        lines += [f"{k}: {v}".encode() for k, v in decision.upstream_headers]
        if decision.remove_headers:
            removed = ",".join(decision.remove_headers)
            lines.append(b"x-envoy-auth-headers-to-remove: " + removed.encode())
    # On allow, Envoy copies only allowed_client_headers_on_success (RateLimit) to the
    # client's response; on deny, allowed_client_headers.
    lines += [f"{k}: {v}".encode() for k, v in decision.client_headers]
    lines.append(b"content-length: %d" % len(decision.body))
    if not keep_alive:
        lines.append(b"connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + decision.body


class _Protocol(asyncio.Protocol):
    """One connection from Envoy; requests on it are answered in order."""

    def __init__(self, server: HttpAuthzServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.busy = False  # a check is being decided on a worker thread
        self.parser = httptools.HttpRequestParser(self)
        self._reset()

    def _reset(self) -> None:
        self.url = b""
        self.headers: dict[str, Any] = {}
        self.head_bytes = 0
        self.body: list[bytes] = []
        self.body_bytes = 0

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            # httptools wraps exceptions from our callbacks in its own error type.
            too_large = self.head_bytes > MAX_HEAD_BYTES
            self._reply(self.server.too_large if too_large else self.server.bad_request, close=True)

    # httptools callbacks
    def on_url(self, url: bytes) -> None:
        self.url += url
        self._count(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        key = name.decode("latin-1").lower()
        text = value.decode("utf-8", "replace")
        old = self.headers.get(key)
        if old is None:
            self.headers[key] = text
        else:  # a repeated header stays visible as such: the core refuses two keys
            self.headers[key] = (*(old if isinstance(old, tuple) else (old,)), text)

    def on_body(self, body: bytes) -> None:
        self.body_bytes += len(body)
        if self.body_bytes > MAX_BODY_BYTES:
            raise ValueError("request body too large")
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.server.waits != INLINE:
            self._deferred()
            return
        metrics = self.server.metrics
        if metrics is None:
            self._answer()
            return
        started = time.perf_counter()
        metrics.active.inc()
        try:
            self._answer()
        finally:
            metrics.active.dec()
            metrics.transport_duration["http"].observe(time.perf_counter() - started)

    def _answer(self) -> None:
        keep_alive = self.parser.should_keep_alive() and not self.server.closing
        try:
            request = self._input()
            payload = (
                self._payload(self.server.check(request), keep_alive)
                if request is not None
                else self.server.invalid
            )
        except Exception:
            log.exception("check failed")  # fail closed with an explicit answer
            payload = self.server.internal_error
        self._reset()
        self._reply(payload, close=not keep_alive)

    def _payload(self, decision: Decision, keep_alive: bool) -> bytes:
        if self.server.bridge is not None:
            return self.server.bridge(decision, keep_alive)
        if decision.base is not None and not decision.body and keep_alive:
            return self.server.with_headers(decision.base, decision.client_headers)
        return self.server.encode(decision) if keep_alive else render(decision, False)

    def _deferred(self) -> None:
        """Decide where a network round trip cannot stall every other connection on this
        loop: in a greenlet that yields while it waits (suspend.py), or on a worker
        thread. Reading pauses until the answer is written, so answers on one connection
        stay in order."""
        keep_alive = self.parser.should_keep_alive() and not self.server.closing
        request = self._input()
        self._reset()
        if request is None:
            self._reply(self.server.invalid, close=not keep_alive)
            return
        if self.server.waiting >= self.server.max_waiting:
            # Past this many checks waiting on Redis or PostgreSQL, more would only
            # wait longer than Envoy does: answer at once, explicitly.
            self.server.shed += 1
            if self.server.metrics is not None:
                self.server.metrics.decisions.labels("deny", "overloaded").inc()
            self._reply(self.server.overloaded, close=not keep_alive)
            return
        self.server.waiting += 1
        self.busy = True
        if self.transport is not None:
            self.transport.pause_reading()
        started = time.perf_counter()
        if self.server.metrics is not None:
            self.server.metrics.active.inc()
        loop = self.server.loop or asyncio.get_running_loop()
        if self.server.executor is None:
            suspend.start(lambda: self._decided(self._decide(request), keep_alive, started), loop)
            return
        future = loop.run_in_executor(self.server.executor, self._decide, request)
        future.add_done_callback(lambda done: self._decided(done.result(), keep_alive, started))

    def _decide(self, request: CheckInput) -> Decision | None:
        try:
            return self.server.check(request)
        except Exception:
            log.exception("check failed")
            return None  # answered as internal_error: fail closed, explicitly

    def _decided(self, decision: Decision | None, keep_alive: bool, started: float) -> None:
        """On the loop: write the deferred answer and read on."""
        try:
            payload = (
                self._payload(decision, keep_alive)
                if decision is not None
                else self.server.internal_error
            )
        except Exception:
            log.exception("encoding the answer failed")
            payload = self.server.internal_error
        metrics = self.server.metrics
        if metrics is not None:
            metrics.active.dec()
            metrics.transport_duration["http"].observe(time.perf_counter() - started)
        self.server.waiting -= 1
        self.busy = False
        self._reply(payload, close=not keep_alive)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def _count(self, n: int) -> None:
        self.head_bytes += n
        if self.head_bytes > MAX_HEAD_BYTES:
            raise ValueError("request head too large")

    def _input(self) -> CheckInput | None:
        if self.server.bridge is not None:
            return read_bridged(
                self.parser.get_method(),
                self.url.decode("utf-8", "replace"),
                self.headers.get("content-type"),
                b"".join(self.body),
            )
        return CheckInput(
            method=self.parser.get_method().decode("latin-1"),
            path=self.url.decode("utf-8", "replace"),
            headers=self.headers,
            host=last_value(self.headers.get("host")),
            source_address=self._source(),
            request_id=last_value(self.headers.get("x-request-id")),
            body=b"".join(self.body) if self.body else None,
        )

    def _source(self) -> str:
        # Envoy at the edge (use_remote_address) sets x-envoy-external-address to the
        # client it trusts and strips client-sent x-envoy-* headers. Without it (an
        # internal request), the last x-forwarded-for hop is the one Envoy appended.
        external = last_value(self.headers.get("x-envoy-external-address"))
        if external:
            return external
        forwarded = self.headers.get("x-forwarded-for", "")
        if isinstance(forwarded, tuple):
            forwarded = ",".join(forwarded)
        return str(forwarded).rsplit(",", 1)[-1].strip()

    def _reply(self, payload: bytes, close: bool) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(payload)
        if close:
            self.transport.close()


class HttpAuthzServer:
    """The HTTP-service endpoint on an asyncio loop (uvloop when installed)."""

    def __init__(
        self,
        authorizer: Authorizer,
        metrics: Metrics | None = None,
        waits: str = INLINE,
        max_waiting: int = 1024,
        bridge: bool = False,
    ) -> None:
        self.metrics = metrics
        # INLINE: checks run on the loop (microseconds with local counters and SQLite).
        # GREENLETS: checks that wait on Redis or PostgreSQL yield the loop meanwhile
        # (measured through Envoy with Redis counters: ~25% more checks per second than
        # on worker threads). THREADS: for checks that block in ways a greenlet cannot
        # yield from (audit_blocking writes each event before answering).
        self.waits = waits
        self.executor = (
            ThreadPoolExecutor(8, thread_name_prefix="extauthz-http-check")
            if waits == THREADS
            else None
        )
        self.check: Callable[[CheckInput], Decision] = authorizer.check
        denials = authorizer.denials
        self.waiting = 0  # deferred checks not answered yet (on the loop only)
        self.max_waiting = max_waiting
        self.shed = 0
        self.overloaded = render(denials["overloaded"])
        self.bad_request = render(denials["invalid_request"], keep_alive=False)
        self.internal_error = render(denials["internal_error"], keep_alive=False)
        self.too_large = (
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-length: 0\r\nconnection: close\r\n\r\n"
        )
        # Keep-alive answers; `connection: close` ones are rare and rendered each time.
        self.encode = EncodedAnswers(render)
        # Only gRPC checks through Envoy's reverse bridge (bridge.py), answered as
        # CheckResponses; plain HTTP checks only otherwise.
        self.bridge = bridge_answers = BridgeAnswers(denials) if bridge else None
        self.invalid = self.bad_request
        if bridge_answers is not None:
            self.invalid = bridge_answers.invalid
            self.overloaded = bridge_answers.overloaded
            self.internal_error = bridge_answers.internal_error
        self.connections: set[_Protocol] = set()
        self.closing = False
        self._server: asyncio.base_events.Server | None = None
        # Set by start(): asyncio.get_running_loop() per request costs a getpid().
        self.loop: asyncio.AbstractEventLoop | None = None

    def with_headers(self, base: Decision, headers: tuple[tuple[str, str], ...]) -> bytes:
        """``base``'s cached answer (which has no body) with ``headers`` added before
        its blank line: a per-request allow without rendering it all again."""
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers)
        return self.encode(base)[:-2] + extra.encode() + b"\r\n"

    async def start(self, host: str, port: int) -> int:
        loop = self.loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(
                lambda: _Protocol(self), host, port, reuse_address=True, backlog=1024
            )
        except OSError as exc:
            raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self, grace: float) -> None:
        """Stop accepting; let open requests finish (each answers before the next read);
        close idle keep-alive connections."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        deadline = asyncio.get_running_loop().time() + grace
        for conn in list(self.connections):
            if conn.transport is not None and not conn.head_bytes and not conn.busy:
                conn.transport.close()
        while self.connections and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        suspend.end_loop(asyncio.get_running_loop())
        await asyncio.sleep(0)  # a turn of the loop, so the closed transports are let go
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)


class HttpAuthzThread:
    """Runs an HttpAuthzServer on its own event loop in a background thread, so the main
    thread stays free for signals and the gRPC server."""

    def __init__(
        self,
        authorizer: Authorizer,
        metrics: Metrics | None = None,
        waits: str = INLINE,
        max_waiting: int = 1024,
        bridge: bool = False,
    ) -> None:
        import threading

        self.server = HttpAuthzServer(authorizer, metrics, waits, max_waiting, bridge)
        self.loop = suspend.new_event_loop()
        self._thread = threading.Thread(
            target=named("extauthz-http", self.loop.run_forever), name="extauthz-http", daemon=True
        )

    def start(self, host: str, port: int) -> int:
        bound = self.loop.run_until_complete(self.server.start(host, port))
        self._thread.start()
        return bound

    def stop(
        self, grace: float, then: Callable[[], Coroutine[Any, Any, None]] | None = None
    ) -> None:
        """Stop the server (in-flight checks answered within ``grace``), run ``then`` on
        the loop if given (what else shares it), then end the loop."""
        if not self._thread.is_alive():
            self.loop.close()
            return
        done = asyncio.run_coroutine_threadsafe(self.server.stop(grace), self.loop)
        done.result(grace + 5)
        if then is not None:
            asyncio.run_coroutine_threadsafe(then(), self.loop).result(grace + 5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()
