"""The HTTP-service adapter on a real uvloop server on a free loopback port."""

from __future__ import annotations

import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extauthz.authorizer import Authorizer
from extauthz.model import CheckInput, Decision
from extauthz.testing import CountingStore
from extauthz.transport.http_authz import MAX_HEAD_BYTES, HttpAuthzThread


def exchange(port: int, request: bytes) -> bytes:
    """Send raw bytes, read until the server closes or a full response has arrived."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        data = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep and b"content-length:" in head:
                length = int(head.split(b"content-length: ")[1].split(b"\r\n")[0])
                if len(body) >= length:
                    break
    return data


def request(path: str = "/v1", *headers: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "host: api", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_allow_is_200_with_identity_headers_and_key_removal(
    port: int, acme_key: tuple[str, str]
) -> None:
    """A valid key: 200 with x-tenant-* headers and x-envoy-auth-headers-to-remove."""
    reply = exchange(port, request("/v1", f"x-api-key: {acme_key[1]}"))
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"x-tenant-id: acme\r\n" in reply
    assert b"x-tenant-tier: professional\r\n" in reply
    assert f"x-api-key-id: {acme_key[0]}\r\n".encode() in reply
    assert b"x-envoy-auth-headers-to-remove: x-api-key\r\n" in reply


def test_deny_is_the_client_answer(port: int) -> None:
    """No key: 401 with JSON body and WWW-Authenticate, as the client will see it."""
    reply = exchange(port, request())
    assert reply.startswith(b"HTTP/1.1 401 Unauthorized\r\n")
    assert b'www-authenticate: Bearer realm="extauthz"' in reply
    assert reply.endswith(b"}")
    assert b'"error": "missing_key"' in reply


def test_repeated_key_headers_stay_separate_and_are_refused(
    port: int, acme_key: tuple[str, str]
) -> None:
    """Two x-api-key lines are seen as two keys (never the first or last): 401."""
    key = acme_key[1]
    reply = exchange(port, request("/v1", f"x-api-key: {key}", f"x-api-key: {key}"))
    assert b'"error": "multiple_keys"' in reply


def test_keep_alive_answers_requests_in_order(port: int, acme_key: tuple[str, str]) -> None:
    """Pipelined requests on one connection are answered in order."""
    both = request("/v1") + request("/v1", f"x-api-key: {acme_key[1]}")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(both)
        data = b""
        while data.count(b"HTTP/1.1 ") < 2 or not data.endswith(b"\r\n\r\n"):
            data += sock.recv(65536)
    first, second = data.index(b"HTTP/1.1 401"), data.index(b"HTTP/1.1 200")
    assert first < second


def test_garbage_gets_400_and_close(port: int) -> None:
    """Bytes that are not HTTP get an explicit 400 and the connection is closed."""
    reply = exchange(port, b"\x16\x03\x01 not http at all\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400 ")
    assert b"connection: close" in reply


def test_oversized_head_gets_431(port: int) -> None:
    """Headers beyond the cap get 431 before they are parsed further or checked."""
    reply = exchange(port, request("/v1", "x-junk: " + "a" * (MAX_HEAD_BYTES + 10)))
    assert reply.startswith(b"HTTP/1.1 431 ")


class _Boom(Authorizer):
    def check(self, request: CheckInput) -> Decision:
        raise RuntimeError("bug")


def test_unexpected_error_becomes_explicit_503(authorizer: Authorizer) -> None:
    """A bug in the core yields 503 internal_error, never a dropped connection."""
    server = HttpAuthzThread(_Boom(authorizer.resolver))
    bound = server.start("127.0.0.1", 0)
    try:
        reply = exchange(bound, request())
    finally:
        server.stop(1)
    assert reply.startswith(b"HTTP/1.1 503 ")
    assert b"internal_error" in reply


def test_port_in_use_is_a_clear_error(port: int, authorizer: Authorizer) -> None:
    """A second server on a port already taken raises OSError naming the address."""
    second = HttpAuthzThread(authorizer)
    with pytest.raises(OSError, match="cannot listen"):
        second.start("127.0.0.1", port)
    second.stop(0)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(payload=st.binary(min_size=1, max_size=300))
def test_fuzzed_bytes_get_an_http_answer_or_close(port: int, payload: bytes) -> None:
    """Random bytes never crash the server: it answers 4xx, or waits for more and we
    time out, and the next real request still works."""
    with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
        sock.sendall(payload + b"\r\n\r\n")
        try:
            data = sock.recv(65536)
        except TimeoutError:
            data = b""
    assert data == b"" or data.startswith(b"HTTP/1.1 4")
    assert exchange(port, request()).startswith(b"HTTP/1.1 401")


def test_allow_with_limits_adds_ratelimit_headers_and_reads_the_body(
    authorizer: Authorizer, acme_key: tuple[str, str]
) -> None:
    """With limits on, a keep-alive allow carries the RateLimit headers in a well-formed
    head (two in a row on one connection), and a POSTed JSON body's max_tokens is
    checked (here above the professional cap: 400)."""
    from extauthz.limits.gate import LimitGate
    from extauthz.limits.memory import MemoryCounters
    from extauthz.policy import parse_policy

    authorizer.gate = LimitGate(MemoryCounters())
    authorizer.policy = parse_policy("tokens: {body_field: max_tokens}\n")
    server = HttpAuthzThread(authorizer)
    port = server.start("127.0.0.1", 0)
    try:
        one = request("/v1", f"x-api-key: {acme_key[1]}")
        replies = exchange(port, one + one + request("/v1", "connection: close"))
        first, second = replies.split(b"HTTP/1.1 200 OK\r\n")[1:3]
        for head in (first, second):
            assert b"x-tenant-id: acme\r\n" in head
            assert b'ratelimit-policy: "burst";q=200;w=4, "daily";q=100000;w=86400\r\n' in head
            assert b"content-length: 0\r\n" in head
        assert b'ratelimit: "burst";r=198;' in second
        body = b'{"max_tokens": 40000}'
        post = (
            f"POST /v1 HTTP/1.1\r\nhost: api\r\nx-api-key: {acme_key[1]}\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        ).encode() + body
        reply = exchange(port, post)
        assert reply.startswith(b"HTTP/1.1 400 Bad Request\r\n")
        assert b'"error": "token_limit_exceeded"' in reply
    finally:
        server.stop(1)


def test_offloaded_checks_do_not_stall_other_connections(
    authorizer: Authorizer, acme_key: tuple[str, str], store: CountingStore
) -> None:
    """With remote counters the HTTP service decides on worker threads: a check stuck in
    a slow lookup does not hold up another connection's answer, and answers on one
    connection stay in order."""
    import threading

    server = HttpAuthzThread(authorizer, waits="threads")
    port = server.start("127.0.0.1", 0)
    store.gate = threading.Event()
    try:
        slow: list[bytes] = []
        waiting = threading.Thread(
            target=lambda: slow.append(exchange(port, request("/v1", f"x-api-key: {acme_key[1]}")))
        )
        waiting.start()
        assert store.entered.wait(5)
        fast = exchange(port, request("/v1", "connection: close"))
        assert fast.startswith(b"HTTP/1.1 401 ")
        assert not slow  # still waiting on its lookup
        store.gate.set()
        waiting.join(10)
        assert slow[0].startswith(b"HTTP/1.1 200 OK\r\n")
        one = request("/v1", f"x-api-key: {acme_key[1]}")
        both = exchange(port, one + request("/v1", "connection: close"))
        assert both.index(b"HTTP/1.1 200 OK") < both.index(b"HTTP/1.1 401 ")
    finally:
        store.gate.set()
        server.stop(1)


def test_encoded_answers_keep_the_hot_keys_only_and_stay_correct_past_the_bound() -> None:
    """The transports' cache of encoded answers is bounded (memory per cached key): past
    the bound it starts afresh, and every answer is still the decision's own encoding."""
    from extauthz.transport import EncodedAnswers

    encoded: list[str] = []

    def encode(decision: Decision) -> bytes:
        encoded.append(decision.reason)
        return decision.reason.encode()

    answers = EncodedAnswers(encode, limit=3)
    decisions = [Decision(True, 200, f"r{i}") for i in range(5)]
    for decision in decisions:
        assert answers(decision) == decision.reason.encode()
    assert answers(decisions[4]) == b"r4"
    assert encoded == ["r0", "r1", "r2", "r3", "r4"], "the newest stays cached"
    assert answers(decisions[0]) == b"r0"
    assert encoded[-1] == "r0", "an evicted one is encoded again"
    assert len(answers._cache) <= 3
