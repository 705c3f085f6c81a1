"""The gRPC adapter over a real grpcio server on a free loopback port."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from envoy.service.auth.v3 import attribute_context_pb2 as ctx_pb2
from envoy.service.auth.v3 import external_auth_pb2 as authz_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extauthz.authorizer import Authorizer
from extauthz.model import CheckInput, Decision
from extauthz.testing import CountingStore
from extauthz.transport.grpc_authz import GrpcAuthz, GrpcServer

METHOD = "/envoy.service.auth.v3.Authorization/Check"


def make_request(headers: dict[str, str], path: str = "/v1", method: str = "GET") -> Any:
    return authz_pb2.CheckRequest(
        attributes=ctx_pb2.AttributeContext(
            request=ctx_pb2.AttributeContext.Request(
                http=ctx_pb2.AttributeContext.HttpRequest(
                    method=method, path=path, headers=headers, id="req-1"
                )
            )
        )
    )


@pytest.fixture
def served(authorizer: Authorizer) -> Iterator[tuple[grpc.Channel, GrpcServer]]:
    server = GrpcServer([GrpcAuthz(authorizer).handler()], workers=2)
    port = server.bind("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield channel, server
    channel.close()
    server.stop(1)


def call(channel: grpc.Channel, payload: bytes, timeout: float = 5) -> Any:
    raw = channel.unary_unary(METHOD)(payload, timeout=timeout)
    return authz_pb2.CheckResponse.FromString(raw)


def test_allow_sets_identity_headers_without_append_and_removes_key(
    served: tuple[grpc.Channel, GrpcServer], acme_key: tuple[str, str]
) -> None:
    """OK response: tenant headers with `append` unset (so Envoy overwrites) and key removal."""
    channel, _ = served
    resp = call(channel, make_request({"x-api-key": acme_key[1]}).SerializeToString())
    assert resp.status.code == 0
    assert resp.HasField("ok_response")
    headers = {h.header.key: h.header.value for h in resp.ok_response.headers}
    assert headers == {
        "x-tenant-id": "acme",
        "x-tenant-tier": "professional",
        "x-api-key-id": acme_key[0],
    }
    assert not any(h.HasField("append") for h in resp.ok_response.headers)
    assert list(resp.ok_response.headers_to_remove) == ["x-api-key"]


def test_deny_carries_status_json_body_and_challenge(
    served: tuple[grpc.Channel, GrpcServer],
) -> None:
    """A request without a key gets a DeniedHttpResponse: 401, JSON body, WWW-Authenticate."""
    channel, _ = served
    resp = call(channel, make_request({}).SerializeToString())
    assert resp.status.code == 16  # UNAUTHENTICATED
    assert resp.denied_response.status.code == 401
    assert '"error": "missing_key"' in resp.denied_response.body
    names = {h.header.key for h in resp.denied_response.headers}
    assert {"www-authenticate", "content-type"} <= names


def test_missing_attributes_get_explicit_400_deny(
    served: tuple[grpc.Channel, GrpcServer],
) -> None:
    """An empty CheckRequest is answered with a 400 invalid_request deny, not an error."""
    channel, _ = served
    resp = call(channel, b"")
    assert resp.denied_response.status.code == 400
    assert "invalid_request" in resp.denied_response.body


def test_garbage_bytes_get_invalid_argument_not_unknown(
    served: tuple[grpc.Channel, GrpcServer],
) -> None:
    """Bytes that are not a CheckRequest get INVALID_ARGUMENT."""
    channel, _ = served
    with pytest.raises(grpc.RpcError) as err:
        call(channel, b"\xff\xff\xff\xff\x0f")
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]


def test_oversized_request_is_refused_explicitly(
    served: tuple[grpc.Channel, GrpcServer],
) -> None:
    """A CheckRequest over the 4 MiB cap gets RESOURCE_EXHAUSTED, not UNKNOWN."""
    channel, _ = served
    big = make_request({"x-junk": "a" * (5 * 1024 * 1024)}).SerializeToString()
    with pytest.raises(grpc.RpcError) as err:
        call(channel, big)
    assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]


class _Boom(Authorizer):
    def check(self, request: CheckInput) -> Decision:
        raise RuntimeError("bug")


def test_unexpected_error_becomes_explicit_503_deny(authorizer: Authorizer) -> None:
    """A bug in the core yields a 503 internal_error deny, never an exception to grpcio."""
    handler = GrpcAuthz(_Boom(authorizer.resolver))
    resp = authz_pb2.CheckResponse.FromString(
        handler.check(make_request({}).SerializeToString(), None)  # type: ignore[arg-type]
    )
    assert resp.denied_response.status.code == 503
    assert "internal_error" in resp.denied_response.body


header_names = st.sampled_from(["x-api-key", "authorization", "x-other", "host", ":path"])
header_values = st.text(max_size=200) | st.sampled_from(["Bearer ", "Bearer nk_", "nk_,nk_"])


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    headers=st.dictionaries(header_names, header_values, max_size=4),
    path=st.text(max_size=100),
    method=st.text(max_size=10),
)
def test_fuzzed_check_requests_always_get_a_check_response(
    authorizer: Authorizer, headers: dict[str, str], path: str, method: str
) -> None:
    """Any CheckRequest yields a parsable CheckResponse with allow or an explicit deny."""
    handler = GrpcAuthz(authorizer)
    raw = handler.check(make_request(headers, path, method).SerializeToString(), None)  # type: ignore[arg-type]
    resp = authz_pb2.CheckResponse.FromString(raw)
    assert resp.HasField("denied_response")
    assert resp.denied_response.status.code in {400, 401}


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(payload=st.binary(max_size=512))
def test_fuzzed_bytes_never_escape_as_exceptions(authorizer: Authorizer, payload: bytes) -> None:
    """Random bytes either parse into a request that is answered, or abort INVALID_ARGUMENT."""

    class Aborted(Exception):
        pass

    class Context:
        def abort(self, code: grpc.StatusCode, details: str) -> None:
            assert code is grpc.StatusCode.INVALID_ARGUMENT
            raise Aborted

    handler = GrpcAuthz(authorizer)
    try:
        raw = handler.check(payload, Context())  # type: ignore[arg-type]
    except Aborted:
        return
    assert authz_pb2.CheckResponse.FromString(raw).HasField("denied_response")


def test_stop_answers_in_flight_checks(
    authorizer: Authorizer, store: CountingStore, acme_key: tuple[str, str]
) -> None:
    """A check in progress when the server is told to stop still gets its answer."""
    server = GrpcServer([GrpcAuthz(authorizer).handler()], workers=2)
    port = server.bind("127.0.0.1:0")
    server.start()
    authorizer.resolver.invalidate()
    store.gate = threading.Event()
    results: list[Any] = []
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        caller = threading.Thread(
            target=lambda: results.append(
                call(channel, make_request({"x-api-key": acme_key[1]}).SerializeToString())
            )
        )
        caller.start()
        assert store.entered.wait(5)
        stopper = threading.Thread(target=server.stop, args=(5,))
        stopper.start()
        store.gate.set()
        caller.join(10)
        stopper.join(10)
    assert len(results) == 1
    assert results[0].status.code == 0


def test_port_in_use_is_a_clear_error() -> None:
    """Binding a port already held by another server fails with OSError, not silently."""
    first = GrpcServer([], workers=1)
    port = first.bind("127.0.0.1:0")
    first.start()
    try:
        with pytest.raises(OSError, match="cannot listen"):
            GrpcServer([], workers=1).bind(f"127.0.0.1:{port}")
    finally:
        first.stop(0)


def test_per_request_ratelimit_headers_merge_into_the_cached_allow(
    authorizer: Authorizer, acme_key: tuple[str, str]
) -> None:
    """An allow with limits is the cached allow's bytes plus a hand-encoded suffix; it
    parses as one CheckResponse holding the identity headers, the key removal and the
    client's RateLimit headers (long values too: multi-byte lengths)."""
    from extauthz.limits.gate import LimitGate
    from extauthz.limits.memory import MemoryCounters
    from extauthz.transport.grpc_authz import encode, response_headers_suffix

    authorizer.gate = LimitGate(MemoryCounters())
    grpc_authz = GrpcAuthz(authorizer)
    raw = grpc_authz.check(make_request({"x-api-key": acme_key[1]}).SerializeToString(), None)  # type: ignore[arg-type]
    resp = authz_pb2.CheckResponse.FromString(raw)
    assert resp.status.code == 0
    assert {h.header.key for h in resp.ok_response.headers} == {
        "x-tenant-id",
        "x-tenant-tier",
        "x-api-key-id",
    }
    assert list(resp.ok_response.headers_to_remove) == ["x-api-key"]
    added = {h.header.key: h.header.value for h in resp.ok_response.response_headers_to_add}
    assert added["ratelimit-policy"].startswith('"burst";q=200;')
    assert added["ratelimit"].startswith('"burst";r=199;')
    long_value = "v" * 20_000
    decision = Decision(True, 200, "ok").with_client_headers((("x-long", long_value), ("a", "")))
    merged = authz_pb2.CheckResponse.FromString(
        encode(Decision(True, 200, "ok")) + response_headers_suffix(decision.client_headers)
    )
    assert [(h.header.key, h.header.value) for h in merged.ok_response.response_headers_to_add] == [
        ("x-long", long_value),
        ("a", ""),
    ]


def test_checks_past_the_pool_are_answered_overloaded_never_refused(
    authorizer: Authorizer, acme_key: tuple[str, str]
) -> None:
    """BAD_INPUTS #26: with one worker held busy and its 64 queue places taken, 200 more
    checks at once each get an explicit CheckResponse, 429 `overloaded` with
    Retry-After (answered on a thread of its own), never a gRPC error; once the
    worker is free, checks are decided again."""
    release = threading.Event()
    slow_started = threading.Event()
    check = authorizer.check

    def slow(request: CheckInput) -> Decision:
        slow_started.set()
        release.wait(10)
        return check(request)

    authorizer.check = slow  # type: ignore[method-assign]
    grpc_authz = GrpcAuthz(authorizer)
    server = GrpcServer.for_checks(grpc_authz, workers=1)
    port = server.bind("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    payload = make_request({"x-api-key": acme_key[1]}).SerializeToString()
    stub = channel.unary_unary(METHOD)
    try:
        held = [stub.future(payload, timeout=20) for _ in range(64)]
        assert slow_started.wait(5)
        deadline = time.monotonic() + 5
        while server._pool._work_queue.qsize() < 63 and time.monotonic() < deadline:
            time.sleep(0.005)  # until the 63 not running have reached the pool's queue
        answers = [
            authz_pb2.CheckResponse.FromString(stub(payload, timeout=10)) for _ in range(200)
        ]
        release.set()
        decided = [authz_pb2.CheckResponse.FromString(f.result()) for f in held]
        authorizer.check = check  # type: ignore[method-assign]
        after = call(channel, payload)
    finally:
        release.set()
        channel.close()
        server.stop(1)
    assert {a.denied_response.status.code for a in answers} == {429}
    assert all('"error": "overloaded"' in a.denied_response.body for a in answers)
    assert all(
        ("retry-after", "1") in {(h.header.key, h.header.value) for h in a.denied_response.headers}
        for a in answers
    )
    assert grpc_authz.shed == 200
    assert {d.status.code for d in decided} == {0}
    assert after.status.code == 0
