"""gRPC checks bridged to the HTTP service (mode bridge), on a real uvloop server: what
Envoy's grpc_http1_reverse_bridge filter sends, and what it needs back."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from envoy.service.auth.v3 import external_auth_pb2 as authz_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extauthz.authorizer import Authorizer
from extauthz.model import CheckInput, Decision
from tests.unit.test_grpc_transport import make_request
from tests.unit.test_http_transport import exchange, request

PATH = "/envoy.service.auth.v3.Authorization/Check"


@pytest.fixture
def bridge_port(authorizer: Authorizer) -> Iterator[int]:
    from extauthz.transport.http_authz import HttpAuthzThread

    server = HttpAuthzThread(authorizer, bridge=True)
    bound = server.start("127.0.0.1", 0)
    yield bound
    server.stop(1)


def post(body: bytes, path: str = PATH, content_type: str = "application/grpc+proto") -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nhost: extauthz\r\ncontent-type: {content_type}\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def answer(reply: bytes) -> Any:
    """The CheckResponse in a bridged 200 (the filter frames it for Envoy's gRPC client)."""
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n"), head
    assert b"content-type: application/grpc+proto\r\n" in head + b"\r\n"
    return authz_pb2.CheckResponse.FromString(body)


def test_a_bridged_allow_is_a_check_response_with_identity_headers(
    bridge_port: int, acme_key: tuple[str, str]
) -> None:
    """A CheckRequest with a valid key, posted as the bridge posts it: a 200 whose body
    is the OK CheckResponse, tenant headers set and the key header removed."""
    check = make_request({"x-api-key": acme_key[1]}).SerializeToString()
    resp = answer(exchange(bridge_port, post(check)))
    assert resp.status.code == 0
    headers = {h.header.key: h.header.value for h in resp.ok_response.headers}
    assert headers["x-tenant-id"] == "acme"
    assert headers["x-api-key-id"] == acme_key[0]
    assert list(resp.ok_response.headers_to_remove) == ["x-api-key"]


def test_a_bridged_deny_is_a_denied_response_not_an_http_error(bridge_port: int) -> None:
    """No key: still HTTP 200 (so the filter reports gRPC OK), carrying the 401 deny
    with its JSON body for the client."""
    resp = answer(exchange(bridge_port, post(make_request({}).SerializeToString())))
    assert resp.status.code == 16  # UNAUTHENTICATED
    assert resp.denied_response.status.code == 401
    assert '"error": "missing_key"' in resp.denied_response.body


@pytest.mark.parametrize(
    ("what", "raw"),
    [
        ("a plain HTTP check", request("/v1", "x-api-key: nk_whatever")),
        ("another path", post(make_request({}).SerializeToString(), path="/other")),
        ("another content type", post(b"", content_type="application/json")),
        ("bytes that are not a CheckRequest", post(b"\xff\xff\xff")),
        ("a CheckRequest without Envoy's attributes", post(b"")),
    ],
)
def test_anything_but_a_bridged_check_gets_an_explicit_400_deny(
    bridge_port: int, what: str, raw: bytes
) -> None:
    """A bridge-mode server answers only bridged checks; anything else is denied 400
    invalid_request, as a CheckResponse (never allowed, never a crash)."""
    resp = answer(exchange(bridge_port, raw))
    assert resp.denied_response.status.code == 400, what
    assert "invalid_request" in resp.denied_response.body


def test_a_plain_http_service_never_allows_a_posted_check_request(
    port: int, acme_key: tuple[str, str]
) -> None:
    """In plain HTTP mode any 200 allows: a client that posts a CheckRequest carrying a
    valid key (in the body, not its headers) is checked as a plain request, and denied."""
    check = make_request({"x-api-key": acme_key[1]}).SerializeToString()
    reply = exchange(port, post(check))
    assert reply.startswith(b"HTTP/1.1 401 Unauthorized\r\n")


def test_per_request_ratelimit_headers_reach_the_bridged_allow(
    authorizer: Authorizer, acme_key: tuple[str, str]
) -> None:
    """With limits on, each bridged allow carries its own RateLimit counts (appended to
    the cached allow, merged by protobuf) on two checks over one connection."""
    from extauthz.limits.gate import LimitGate
    from extauthz.limits.memory import MemoryCounters
    from extauthz.transport.http_authz import HttpAuthzThread

    authorizer.gate = LimitGate(MemoryCounters())
    server = HttpAuthzThread(authorizer, bridge=True)
    port = server.start("127.0.0.1", 0)
    try:
        check = post(make_request({"x-api-key": acme_key[1]}).SerializeToString())
        replies = exchange(port, check + check)
    finally:
        server.stop(1)
    first, second = (b"HTTP/1.1 200 OK\r\n" + r for r in replies.split(b"HTTP/1.1 200 OK\r\n")[1:])
    seen = []
    for reply in (first, second):
        resp = answer(reply)
        added = {h.header.key: h.header.value for h in resp.ok_response.response_headers_to_add}
        assert resp.ok_response.headers, "the cached allow's identity headers are kept"
        seen.append(added["ratelimit"])
    assert seen[0] != seen[1]
    assert seen[1].startswith('"burst";r=198;')


class _Boom(Authorizer):
    def check(self, request: CheckInput) -> Decision:
        raise RuntimeError("bug")


def test_an_unexpected_error_becomes_an_explicit_503_deny(authorizer: Authorizer) -> None:
    """A bug in the core: a CheckResponse denying 503 internal_error, then the
    connection closes."""
    from extauthz.transport.http_authz import HttpAuthzThread

    server = HttpAuthzThread(_Boom(authorizer.resolver), bridge=True)
    port = server.start("127.0.0.1", 0)
    try:
        reply = exchange(port, post(make_request({}).SerializeToString()))
    finally:
        server.stop(1)
    resp = answer(reply)
    assert resp.denied_response.status.code == 503
    assert b"connection: close\r\n" in reply


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.binary(max_size=512))
def test_fuzzed_bodies_always_get_a_check_response(bridge_port: int, body: bytes) -> None:
    """Whatever bytes the bridge posts, the answer is a CheckResponse, never a crash."""
    resp = answer(exchange(bridge_port, post(body)))
    assert resp.HasField("ok_response") or resp.HasField("denied_response")
