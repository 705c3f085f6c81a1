"""max_tokens in a JSON body, through real Envoy with with_request_body, in both modes."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from extauthz.demo import EchoBackend
from extauthz.model import TenantTier
from tests.e2e.conftest import Stack, running_stack
from tests.e2e.http_util import get

pytestmark = pytest.mark.e2e

POLICY = """
tokens:
  header: x-max-tokens
  body_field: max_tokens
tenants:
  t_b: {tokens_per_request: 1000}
"""


@pytest.fixture(scope="module", params=["grpc", "http", "bridge"])
def bodied(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    data = tmp_path_factory.mktemp(f"body-{request.param}")
    with running_stack(data, request.param, POLICY, EchoBackend(), body_bytes=4096) as stack:
        stack.runtime.tenants.create_tenant("b", TenantTier.ENTERPRISE, "t_b")
        yield stack


def post(stack: Stack, body: bytes, key: str) -> tuple[int, dict[str, object]]:
    reply = get(
        stack.port,
        "/v1/chat",
        [("x-api-key", key), ("content-type", "application/json")],
        method="POST",
        body=body,
    )
    return reply.status, json.loads(reply.body) if reply.body.startswith(b"{") else {}


def test_body_count_within_the_cap_passes_with_the_body_intact(bodied: Stack) -> None:
    """The upstream receives the same body Envoy showed extauthz."""
    key = bodied.runtime.keys.create_key("t_b")[1]
    body = b'{"model": "m", "max_tokens": 1000, "messages": ["hi"]}'
    status, echoed = post(bodied, body, key)
    assert status == 200
    assert echoed["method"] == "POST"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"max_tokens": 1001}', "token_limit_exceeded"),
        (b'{"max_tokens": 0}', "invalid_token_count"),
        (b'{"max_tokens": 1.5}', "invalid_token_count"),
        (b'{"max_tokens": 10, "max_tokens": 100000}', "invalid_token_count"),
    ],
)
def test_bad_or_excessive_body_counts_are_400(bodied: Stack, body: bytes, reason: str) -> None:
    """BAD_INPUTS #10 for the body field: refused before the backend, with the reason."""
    key = bodied.runtime.keys.create_key("t_b")[1]
    hits = bodied.backend.hits
    status, answer = post(bodied, body, key)
    assert (status, answer.get("error")) == (400, reason)
    assert bodied.backend.hits == hits


def test_a_body_over_max_body_bytes_is_refused_by_envoy(bodied: Stack) -> None:
    """A body larger than Envoy may buffer for the check is 413, never let through with
    an unread max_tokens."""
    key = bodied.runtime.keys.create_key("t_b")[1]
    hits = bodied.backend.hits
    body = json.dumps({"pad": "x" * 8000, "max_tokens": 999_999}).encode()
    status, _ = post(bodied, body, key)
    assert status == 413
    assert bodied.backend.hits == hits
