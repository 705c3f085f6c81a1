"""Envoy's gRPC access-log stream (``envoy.service.accesslog.v3``): one entry per
finished request, matched to its Check by ``x-request-id``. It frees the request's
concurrency slot and settles its reserved tokens against the usage the upstream
reported in its response headers.

Envoy keeps one stream open per worker thread, so this runs on its own small gRPC
server: a long-lived stream must never hold a thread that Check calls need.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import grpc
from envoy.service.accesslog.v3 import als_pb2
from google.protobuf.message import DecodeError

from extauthz.model import Completion
from extauthz.threadnames import name_this_thread

log = logging.getLogger("extauthz.als")

SERVICE = "envoy.service.accesslog.v3.AccessLogService"
MAX_TOKENS = 10**15
_WARNED: set[str] = set()


# Called once per access-log message with its finished requests (Envoy batches entries:
# shared counters release a whole batch in one round trip).
Finished = Callable[[list[Completion]], None]


TENANT_HEADER = "x-tenant-id"


def reported_tokens(headers: Any, names: tuple[str, ...]) -> int | None:
    """The sum of the usage headers the upstream sent, or None if it sent none we can
    read (the reservation then stands as charged)."""
    total, seen = 0, False
    for name in names:
        value = headers.get(name)
        if value is None:
            continue
        count = usage_count(value, name)
        if count is not None:
            total += count
            seen = True
    return min(total, MAX_TOKENS) if seen else None


def usage_count(value: str, name: str) -> int | None:
    """One usage header's (or trailer's) count, or None if it is not a whole number."""
    text = value.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 16:
        # Once per header name: a misbehaving upstream must not flood the log.
        (log.debug if name in _WARNED else log.warning)(
            "ignoring usage header %s: not a whole number", name
        )
        _WARNED.add(name)
        return None
    return min(int(text), MAX_TOKENS)


def finish_each(
    entries: Iterable[Any], parse: Callable[[Any], Completion | None], finished: Finished
) -> None:
    """One access-log message, whatever its transport: each entry parsed (one bad entry
    is logged and skipped: it must not end the stream and strand every later slot),
    then the finished requests handed on together."""
    batch = []
    for entry in entries:
        try:
            done = parse(entry)
        except Exception:
            log.exception("access-log entry failed")
            continue
        if done is not None:
            batch.append(done)
    if batch:
        try:
            finished(batch)
        except Exception:
            log.exception("access-log batch failed")


class AccessLogReceiver:
    def __init__(self, finished: Finished, usage_headers: tuple[str, ...]) -> None:
        self.finished = finished
        self.usage_headers = usage_headers
        self.entries = 0  # entries handled since start (tests and the upcoming metrics)
        self._empty: bytes = als_pb2.StreamAccessLogsResponse().SerializeToString()

    def stream(self, messages: Any, context: grpc.ServicerContext) -> bytes:
        name_this_thread("extauthz-als")
        for data in messages:
            try:
                message = als_pb2.StreamAccessLogsMessage.FromString(data)
            except DecodeError:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "not a StreamAccessLogsMessage")
            finish_each(message.http_logs.log_entry, self._entry, self.finished)
        return self._empty

    def _entry(self, entry: Any) -> Completion | None:
        # Once per finished request: each protobuf field is read once, into a local.
        common = entry.common_properties
        if common.intermediate_log_entry:
            return None  # a periodic entry for a request still running
        request = entry.request
        request_id = request.request_id
        self.entries += 1
        if not request_id or common.response_flags.HasField("unauthorized_details"):
            return None  # denied by ext_authz (flag UAEX): no slot was taken, nothing to bill
        response = entry.response
        # A streaming upstream reports its counts in trailers (known only at the end);
        # when it sends a count both ways, the trailer's is the final one.
        headers = response.response_headers
        trailers = response.response_trailers
        if trailers:
            headers = {**headers, **trailers}
        took = (
            common.time_to_last_downstream_tx_byte
            if common.HasField("time_to_last_downstream_tx_byte")
            else common.duration
        )
        names = self.usage_headers
        return Completion(
            request_id,
            response.response_code.value,
            took.seconds * 1000.0 + took.nanos / 1e6,
            request.request_headers_bytes + request.request_body_bytes,
            response.response_headers_bytes + response.response_body_bytes,
            reported_tokens(headers, names[:1]) if headers else None,
            reported_tokens(headers, names[1:]) if headers else None,
            # Set by our allow answer (a client's own is overwritten): which tenant's
            # counters hold the lease. Only a hint: a wrong one finds no lease.
            request.request_headers.get(TENANT_HEADER, "")[:128],
        )

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        identity: Callable[[bytes], bytes] = bytes
        method = grpc.stream_unary_rpc_method_handler(
            self.stream, request_deserializer=identity, response_serializer=identity
        )
        return grpc.method_handlers_generic_handler(SERVICE, {"StreamAccessLogs": method})
