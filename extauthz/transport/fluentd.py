"""Envoy's fluentd access logger (``envoy.access_loggers.fluentd``) as the access-log
transport: batched msgpack records over a plain TCP stream, in Fluentd's forward mode
(``[tag, [[time, record], ...]]``), decoded by the msgpack C extension on an event loop
of its own. It does the gRPC access-log stream's job (free the slot, settle the tokens,
bill the request) with less work per entry: Envoy sends only the fields below, as plain
values, and no gRPC machinery sits in between (docs/benchmarks.md has the numbers).

Like the gRPC stream it has no acknowledgements: entries Envoy wrote to a receiver that
then died are lost, and their leases expire into `incomplete` usage records.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import msgpack

from extauthz import suspend
from extauthz.model import Completion
from extauthz.threadnames import named
from extauthz.transport.als import (
    MAX_TOKENS,
    TENANT_HEADER,
    Finished,
    finish_each,
    usage_count,
)

log = logging.getLogger("extauthz.als")

# A forward message bigger than this is refused (Envoy's own buffer is 16 KB by default).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
_ABSENT = (None, "-", "")


def record_format(usage_headers: tuple[str, ...]) -> dict[str, str]:
    """The record Envoy is told to send: the request id, what the response was, how long
    it took and how big it was, the tenant our allow answer set, and the upstream's usage
    report from its response headers (``h0``...) and trailers (``r0``...)."""
    fields = {
        "id": "%REQ(X-REQUEST-ID)%",
        "s": "%RESPONSE_CODE%",
        # Time to the last byte sent downstream, in microseconds; DURATION (ms) when
        # that byte was never sent (the client went away).
        "us": "%COMMON_DURATION(DS_RX_BEG:DS_TX_END:us)%",
        "ms": "%DURATION%",
        "qh": "%REQUEST_HEADERS_BYTES%",
        "qb": "%BYTES_RECEIVED%",
        "sh": "%RESPONSE_HEADERS_BYTES%",
        "sb": "%BYTES_SENT%",
        "t": f"%REQ({TENANT_HEADER.upper()})%",
    }
    for i, name in enumerate(usage_headers):
        fields[f"h{i}"] = f"%RESP({name.upper()})%"
        fields[f"r{i}"] = f"%TRAILER({name.upper()})%"
    return fields


def _number(value: Any) -> int:
    if type(value) is int:  # what Envoy sends for every numeric field
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return 0


def usage_keys(usage_headers: tuple[str, ...]) -> tuple[tuple[str, str, str], ...]:
    """(trailer field, header field, header name) of each usage header, in order."""
    return tuple((f"r{i}", f"h{i}", name) for i, name in enumerate(usage_headers))


def completion(record: dict[str, Any], keys: tuple[tuple[str, str, str], ...]) -> Completion | None:
    """One record as a finished request, or None without a request id. (A request
    ext_authz denied has no lease to free: its release finds nothing and bills nothing.)
    Runs once per request: plain lookups, no per-field helpers on the common path."""
    get = record.get
    request_id = get("id")
    if type(request_id) is not str or request_id in _ABSENT:
        return None
    micros = get("us")
    latency_ms = micros / 1000.0 if type(micros) is int else float(_number(get("ms")))
    tokens_in = tokens_out = None
    first = True
    for trailer, header, name in keys:
        # A streaming upstream's count comes in a trailer, which wins over a header.
        value = get(trailer)
        if value in _ABSENT:
            value = get(header)
        if value not in _ABSENT:
            count = usage_count(str(value), name)
            if count is not None and first:
                tokens_in = count
            elif count is not None:
                tokens_out = min((tokens_out or 0) + count, MAX_TOKENS)
        first = False
    tenant = get("t")
    return Completion(
        request_id,
        _number(get("s")),
        latency_ms,
        _number(get("qh")) + _number(get("qb")),
        _number(get("sh")) + _number(get("sb")),
        tokens_in,
        tokens_out,
        tenant[:128] if type(tenant) is str and tenant != "-" else "",
    )


class _Stream(asyncio.Protocol):
    """One connection from an Envoy worker: a stream of forward-mode messages."""

    def __init__(self, receiver: FluentdReceiver) -> None:
        self.receiver = receiver
        self.unpacker = msgpack.Unpacker(max_buffer_size=MAX_MESSAGE_BYTES)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.receiver.streams.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.receiver.streams.discard(self)

    def data_received(self, data: bytes) -> None:
        if data.startswith(b"PRI * HTTP/2.0") and self.transport is not None:
            log.error(
                "access log: Envoy sends the gRPC access-log service here, but this "
                "server expects its fluentd logger (EXTAUTHZ_ACCESS_LOG=fluentd): set "
                "EXTAUTHZ_ACCESS_LOG=grpc, or regenerate the Envoy config (extauthz "
                "envoy-config) with the same setting"
            )
            self.transport.abort()
            return
        try:
            self.unpacker.feed(data)
            for message in self.unpacker:
                self.receiver.message(message)
        except Exception as exc:
            # Not fluentd forward messages (or too big): say so once per connection and
            # hang up; Envoy reconnects, and nothing it sends can crash the receiver.
            log.warning("access log: closing a stream that is not Fluentd forward mode: %s", exc)
            if self.transport is not None:
                self.transport.abort()


class FluentdReceiver:
    """Fluentd forward-mode access-log entries, on an event loop in a thread of its own."""

    def __init__(
        self,
        finished: Finished,
        usage_headers: tuple[str, ...],
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.finished = finished
        self.usage_keys = usage_keys(usage_headers)
        self.entries = 0  # entries handled since start (tests)
        # A running loop to share (the HTTP service's, when its checks never wait on the
        # network): entries are then handled on the checks' own thread, with no GIL
        # hand-off between two threads per message.
        self.shared = loop is not None
        self.loop = loop if loop is not None else suspend.new_event_loop()
        self.streams: set[_Stream] = set()
        self._server: asyncio.base_events.Server | None = None
        self._thread: Any = None

    def message(self, message: Any) -> None:
        """One forward-mode message: ``[tag, [[time, record], ...]]`` (an optional
        third element, options, is ignored)."""
        if not isinstance(message, list | tuple) or len(message) < 2:
            raise ValueError("a message must be [tag, entries]")
        entries = message[1]
        if not isinstance(entries, list | tuple):
            raise ValueError("only forward mode (a list of entries) is understood")
        self.entries += len(entries)
        finish_each(entries, self._entry, self.finished)

    def _entry(self, entry: Any) -> Completion | None:
        return completion(entry[1], self.usage_keys)

    def start(self, host: str, port: int) -> int:
        import threading

        async def listen() -> asyncio.base_events.Server:
            return await self.loop.create_server(
                lambda: _Stream(self), host, port, reuse_address=True, backlog=256
            )

        try:
            if self.shared:
                self._server = asyncio.run_coroutine_threadsafe(listen(), self.loop).result(5)
                return int(self._server.sockets[0].getsockname()[1])
            self._server = self.loop.run_until_complete(listen())
        except OSError as exc:
            raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        self._thread = threading.Thread(
            target=named("extauthz-als", self.loop.run_forever), name="extauthz-als", daemon=True
        )
        self._thread.start()
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self, linger: float) -> None:
        """On the loop: stop accepting; keep reading for ``linger`` seconds (entries for
        the checks just answered may still be on their way from Envoy), then hang up."""
        if self._server is not None:
            self._server.close()
        await asyncio.sleep(linger)
        for stream in list(self.streams):
            if stream.transport is not None:
                stream.transport.abort()
        await asyncio.sleep(0)  # a turn of the loop, so the closed transports go

    def stop(self, linger: float) -> None:
        """:meth:`close`, then the loop's thread ends (a shared loop's owner stops it:
        it runs ``close`` itself, before its loop ends)."""
        if self.shared:
            return
        if self._thread is None:
            self.loop.close()
            return
        try:
            asyncio.run_coroutine_threadsafe(self.close(linger), self.loop).result(linger + 5)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
