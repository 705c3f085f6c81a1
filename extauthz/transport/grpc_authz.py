"""Envoy ext_authz v3 over gRPC: CheckRequest -> CheckInput -> Authorizer -> CheckResponse.

The handler takes raw bytes and parses them itself, so a request that is not a valid
CheckRequest gets INVALID_ARGUMENT from us instead of grpcio's generic INTERNAL, and any
unexpected error becomes an explicit deny (never UNKNOWN, which some Envoy settings let
through).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent import futures
from typing import TYPE_CHECKING, Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2 as authz_pb2
from envoy.type.v3 import http_status_pb2
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, status_pb2
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1.health import HealthServicer

from extauthz.authorizer import Authorizer
from extauthz.model import CheckInput, Decision
from extauthz.telemetry.metrics import Metrics
from extauthz.transport import EncodedAnswers, last_value

log = logging.getLogger("extauthz.grpc")

SERVICE = "envoy.service.auth.v3.Authorization"
_RPC_CODE = {
    401: code_pb2.UNAUTHENTICATED,
    403: code_pb2.PERMISSION_DENIED,
    503: code_pb2.UNAVAILABLE,
    400: code_pb2.INVALID_ARGUMENT,
}


def _header(name: str, value: str) -> Any:
    # `append` is left unset on purpose: ext_authz then overwrites a client-sent copy.
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=name, value=value))


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SHORT = [_varint(n) for n in range(16384)]  # lengths of header-sized payloads


def _field(tag: bytes, payload: bytes) -> bytes:
    size = len(payload)
    return tag + (_SHORT[size] if size < 16384 else _varint(size)) + payload


# Wire tags (field number << 3 | length-delimited) of the fields below.
_OK_RESPONSE, _HEADERS_TO_ADD, _HEADER, _KEY, _VALUE = b"\x1a", b"\x32", b"\x0a", b"\x0a", b"\x12"


def response_headers_suffix(headers: tuple[tuple[str, str], ...]) -> bytes:
    """``CheckResponse{ok_response{response_headers_to_add: headers}}`` on the wire.

    Appended to an encoded allow, protobuf merges the two (a repeated embedded message
    field concatenates), so the cached allow is reused and only these few bytes are
    built per request: about 2 us instead of 40 us for a fresh message (bench.core).
    """
    options = b"".join(
        _field(
            _HEADERS_TO_ADD,
            _field(_HEADER, _field(_KEY, k.encode()) + _field(_VALUE, v.encode())),
        )
        for k, v in headers
    )
    return _field(_OK_RESPONSE, options)


def encode(decision: Decision) -> bytes:
    if decision.allowed:
        response = authz_pb2.CheckResponse(
            status=status_pb2.Status(code=code_pb2.OK),
            ok_response=authz_pb2.OkHttpResponse(
                headers=[_header(k, v) for k, v in decision.upstream_headers],
                headers_to_remove=list(decision.remove_headers),
                # Added to the response the client gets (RateLimit headers).
                response_headers_to_add=[_header(k, v) for k, v in decision.client_headers],
            ),
        )
    else:
        response = authz_pb2.CheckResponse(
            status=status_pb2.Status(
                code=_RPC_CODE.get(decision.status, code_pb2.PERMISSION_DENIED),
                message=decision.reason,
            ),
            denied_response=authz_pb2.DeniedHttpResponse(
                status=http_status_pb2.HttpStatus(code=decision.status),
                headers=[_header(k, v) for k, v in decision.client_headers],
                body=decision.body.decode(),
            ),
        )
    data: bytes = response.SerializeToString()
    return data


class CheckResponses:
    """CheckResponses on the wire: each reusable decision encoded once, and a per-request
    allow as its base's cached encoding plus its own RateLimit headers."""

    def __init__(self) -> None:
        self._encoded = EncodedAnswers(encode)

    def __call__(self, decision: Decision) -> bytes:
        if decision.base is not None:
            return self._encoded(decision.base) + response_headers_suffix(decision.client_headers)
        return self._encoded(decision)


def to_input(request: Any) -> CheckInput | None:
    """The plain request, or None when Envoy's attributes are missing."""
    attrs = request.attributes
    if not attrs.HasField("request") or not attrs.request.HasField("http"):
        return None
    http = attrs.request.http
    if not http.method or not http.path:
        return None
    headers: Any = http.headers
    if http.header_map.headers:
        # encode_raw_headers: repeated headers arrive apart and values may be raw bytes.
        joined: dict[str, tuple[str, ...]] = {}
        for item in http.header_map.headers:
            value = item.raw_value.decode("utf-8", "replace") if item.raw_value else item.value
            joined[item.key.lower()] = (*joined.get(item.key.lower(), ()), value)
        headers = joined
    return CheckInput(
        method=http.method,
        path=http.path,
        headers=headers,
        host=http.host,
        source_address=attrs.source.address.socket_address.address,
        # http.id is Envoy's internal stream id; x-request-id is the one logs and
        # records share (Envoy forwards it: see allowed_headers in our configs).
        request_id=last_value(headers.get("x-request-id")) or http.id,
        # pack_as_bytes puts the body in raw_body; without it, in body (as text).
        body=http.raw_body or (http.body.encode() if http.body else None),
    )


class GrpcAuthz:
    """The Check handler, on raw bytes."""

    def __init__(self, authorizer: Authorizer, metrics: Metrics | None = None) -> None:
        self.authorizer = authorizer
        self.metrics = metrics
        self.responses = CheckResponses()
        self._invalid = self.responses(authorizer.denials["invalid_request"])
        self._internal = self.responses(authorizer.denials["internal_error"])
        self._overloaded = self.responses(authorizer.denials["overloaded"])
        self.shed = 0  # checks answered `overloaded` without being decided

    def overloaded(self, data: bytes, context: grpc.ServicerContext) -> bytes:
        """The answer to a check that arrives while the pool is full (see GrpcServer)."""
        self.shed += 1
        if self.metrics is not None:
            self.metrics.decisions.labels("deny", "overloaded").inc()
        return self._overloaded

    def check(self, data: bytes, context: grpc.ServicerContext) -> bytes:
        if self.metrics is None:
            return self._check(data, context)
        active, started = self.metrics.active, time.perf_counter()
        active.inc()
        try:
            return self._check(data, context)
        finally:
            active.dec()
            self.metrics.transport_duration["grpc"].observe(time.perf_counter() - started)

    def _check(self, data: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            request = authz_pb2.CheckRequest.FromString(data)
        except DecodeError:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "not a valid CheckRequest")
        try:
            checked = to_input(request)
            if checked is None:
                return self._invalid
            return self.responses(self.authorizer.check(checked))
        except Exception:
            # Fail closed with an explicit answer; the traceback stays in our log.
            log.exception("check failed")
            return self._internal

    def method(self) -> grpc.RpcMethodHandler[Any, Any]:
        identity: Callable[[bytes], bytes] = bytes
        return grpc.unary_unary_rpc_method_handler(
            self.check, request_deserializer=identity, response_serializer=identity
        )

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        """The Check service, without overload shedding (see GrpcServer.for_checks)."""
        return grpc.method_handlers_generic_handler(SERVICE, {"Check": self.method()})


CHECK_METHOD = f"/{SERVICE}/Check"


class _OnItsOwnPool:
    """A behaviour grpcio runs on ``experimental_thread_pool`` instead of the server's."""

    def __init__(self, answer: Callable[..., bytes], pool: futures.ThreadPoolExecutor) -> None:
        self.answer = answer
        self.experimental_thread_pool = pool

    def __call__(self, data: bytes, context: grpc.ServicerContext) -> bytes:
        return self.answer(data, context)


if TYPE_CHECKING:
    _Generic = grpc.GenericRpcHandler[Any, Any]
else:
    _Generic = grpc.GenericRpcHandler


class _Shedding(_Generic):
    """Finds the Check handler for each call, on grpcio's poller thread before the call
    is queued: with ``limit`` checks already queued for the pool, a new check gets the
    shed handler instead, which answers on a thread of its own (it never waits behind
    the queue it is shedding). Costs one queue-length read per call."""

    def __init__(
        self,
        check: grpc.RpcMethodHandler[Any, Any],
        answer: Callable[..., bytes],
        pool: futures.ThreadPoolExecutor,
        limit: int,
    ) -> None:
        self.check = check
        # ThreadPoolExecutor's own queue: what waits for a worker.
        self.queue = pool._work_queue
        self.limit = limit
        self.shed_pool = futures.ThreadPoolExecutor(1, thread_name_prefix="extauthz-grpc-shed")
        self.shed = grpc.unary_unary_rpc_method_handler(
            _OnItsOwnPool(answer, self.shed_pool),
            request_deserializer=bytes,
            response_serializer=bytes,
        )

    def service(self, details: Any) -> grpc.RpcMethodHandler[Any, Any] | None:
        if details.method != CHECK_METHOD:
            return None
        return self.shed if self.queue.qsize() >= self.limit else self.check


class GrpcServer:
    """A grpcio sync server with a small thread pool and no SO_REUSEPORT."""

    def __init__(
        self,
        handlers: list[grpc.GenericRpcHandler[Any, Any]],
        workers: int = 4,
        *,
        max_concurrent: int | None = None,
    ) -> None:
        self._pool = futures.ThreadPoolExecutor(workers, thread_name_prefix="extauthz-grpc")
        self._shedding: _Shedding | None = None
        self._server = grpc.server(
            self._pool,
            handlers=handlers,
            options=[
                # Without this a stale server on the same port silently shares the traffic.
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", 4 * 1024 * 1024),
                # With BDP probing on, Envoy's multiplexed checks at a moderate rate
                # stalled into a bimodal p50 of 3 ms / 16 ms; off, 1.7 ms (docs/design.md).
                ("grpc.http2.bdp_probe", 0),
            ],
            maximum_concurrent_rpcs=max_concurrent or workers * 64,
        )

    @classmethod
    def for_checks(cls, check: GrpcAuthz, workers: int = 4) -> GrpcServer:
        """The Check service, shedding: at most ``workers`` x 64 checks wait for a worker;
        more are answered at once with 429 `overloaded`, never refused with a gRPC error
        (grpcio's own limit answers RESOURCE_EXHAUSTED, which Envoy can only turn into
        its own 503). grpcio's limit stays, far above, as a bound on memory."""
        server = cls([], workers, max_concurrent=workers * 64 * 16)
        # workers x 64 in all: the ones running, and the rest queued for them.
        queued = workers * 63
        server._shedding = _Shedding(check.method(), check.overloaded, server._pool, queued)
        server._server.add_generic_rpc_handlers((server._shedding,))
        return server

    def bind(self, address: str) -> int:
        """Listen on ``host:port`` (port 0 picks a free one); returns the bound port."""
        try:
            port = self._server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {address}: {exc}") from None
        if port == 0:
            raise OSError(f"cannot listen on {address}: address in use or invalid")
        return port

    def add_health(self) -> HealthServicer:
        """grpc.health.v1 on this server: SERVING for "" and for the Check service once
        started, NOT_SERVING from the moment a stop begins (Envoy's health checks then
        take this endpoint out before it closes)."""
        health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, self._server)
        return health

    def start(self) -> None:
        self._server.start()

    def stop(self, grace: float) -> None:
        """Stop accepting, answer what is in flight (up to ``grace`` seconds), then close."""
        self._server.stop(grace).wait()
        self._pool.shutdown(wait=True)
        if self._shedding is not None:
            self._shedding.shed_pool.shutdown(wait=True)
