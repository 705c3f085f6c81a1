"""Real Envoy 1.40 -> extauthz serve -> echo backend, all on loopback."""

from __future__ import annotations

import pytest

from extauthz.keys import checksum
from extauthz.model import TenantTier
from tests.e2e.conftest import Stack, wait_until
from tests.e2e.http_util import get, raw_status

pytestmark = pytest.mark.e2e


def seen(reply_body: dict[str, object]) -> dict[str, str]:
    headers = reply_body["headers"]
    assert isinstance(headers, dict)
    return headers


def test_no_key_is_401_json_with_challenge_and_backend_untouched(stack: Stack) -> None:
    """Without a key Envoy answers 401 with our JSON reason and WWW-Authenticate."""
    hits = stack.backend.hits
    reply = get(stack.port)
    assert reply.status == 401
    assert reply.json()["error"] == "missing_key"
    assert reply.headers["www-authenticate"].startswith("Bearer")
    assert reply.headers["content-type"] == "application/json"
    assert stack.backend.hits == hits


def test_valid_key_reaches_backend_with_tenant_headers_and_without_key(stack: Stack) -> None:
    """A valid key gets 200; the backend sees tenant/tier/key-id and never the key."""
    tenant_id, key_id, key = stack.new_key(TenantTier.PROFESSIONAL)
    reply = get(stack.port, headers=[("x-api-key", key)])
    assert reply.status == 200
    headers = seen(reply.json())
    assert headers["x-tenant-id"] == tenant_id
    assert headers["x-tenant-tier"] == "professional"
    assert headers["x-api-key-id"] == key_id
    assert "x-api-key" not in headers
    assert key not in reply.body.decode()


def test_post_with_body_is_authorized_and_body_reaches_backend(stack: Stack) -> None:
    """A POST with a JSON body is checked on its head; the backend gets the request."""
    _, _, key = stack.new_key()
    reply = get(
        stack.port,
        "/v1/chat",
        [("x-api-key", key), ("content-type", "application/json")],
        method="POST",
        body=b'{"max_tokens": 10}',
    )
    assert reply.status == 200
    assert reply.json()["method"] == "POST"
    assert get(stack.port, "/v1/chat", method="POST", body=b"{}").status == 401


def test_bearer_key_works_and_authorization_is_stripped(stack: Stack) -> None:
    """Authorization: Bearer <key> is accepted and the header never reaches the backend."""
    _, _, key = stack.new_key()
    reply = get(stack.port, headers=[("authorization", f"Bearer {key}")])
    assert reply.status == 200
    assert "authorization" not in seen(reply.json())


def test_spoofed_identity_headers_are_overwritten(stack: Stack) -> None:
    """Client-sent x-tenant-id/x-tenant-tier/x-api-key-id are replaced, never appended."""
    tenant_id, key_id, key = stack.new_key()
    reply = get(
        stack.port,
        headers=[
            ("x-api-key", key),
            ("x-tenant-id", "evil"),
            ("x-tenant-tier", "enterprise"),
            ("x-api-key-id", "key_evil"),
        ],
    )
    headers = seen(reply.json())
    assert (headers["x-tenant-id"], headers["x-tenant-tier"], headers["x-api-key-id"]) == (
        tenant_id,
        "starter",
        key_id,
    )


FORGED_SIGNALS = [
    ("x-envoy-auth-failure-mode-allowed", "forged"),
    ("x-envoy-auth-partial-body", "forged"),
]


@pytest.mark.parametrize("path", ["/hello", "/healthz"])
def test_client_sent_envoy_signal_headers_never_reach_the_upstream(stack: Stack, path: str) -> None:
    """BAD_INPUTS #25: x-envoy-auth-failure-mode-allowed (Envoy's "the check failed
    open") and x-envoy-auth-partial-body sent by the client are removed before the
    upstream, on an allowed request and on a public route alike."""
    _, _, key = stack.new_key()
    reply = get(stack.port, path, [("x-api-key", key), *FORGED_SIGNALS])
    assert reply.status == 200
    headers = seen(reply.json())
    for name, _ in FORGED_SIGNALS:
        assert name not in headers, name


def test_spoofed_headers_without_a_key_never_pass(stack: Stack) -> None:
    """A forged x-tenant-id without a key is simply 401."""
    assert get(stack.port, headers=[("x-tenant-id", "acme")]).status == 401


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ([("x-api-key", "{k}"), ("x-api-key", "{k}")], "multiple_keys"),
        ([("x-api-key", "{k},{k}")], "multiple_keys"),
        ([("x-api-key", "{k}"), ("authorization", "Bearer {k}")], "multiple_keys"),
        ([("x-api-key", "nk_" + "a" * 43 + "_zzzzzz")], "bad_checksum"),
        ([("x-api-key", "nk_notakey")], "malformed_key"),
        ([("x-api-key", "nk_" + "b" * 43 + "_" + checksum("b" * 43))], "unknown_key"),
        ([("x-api-key", "nk_" + "x" * 50_000)], "malformed_key"),
    ],
)
def test_bad_keys_are_401_with_reason(
    stack: Stack, headers: list[tuple[str, str]], reason: str
) -> None:
    """Repeated, joined, bad-checksum, malformed, unknown and 50 KB keys: 401 + reason."""
    _, _, key = stack.new_key()
    hits = stack.backend.hits
    reply = get(stack.port, headers=[(n, v.format(k=key)) for n, v in headers])
    assert (reply.status, reply.json()["error"]) == (401, reason)
    assert stack.backend.hits == hits


def test_key_in_query_string_is_refused(stack: Stack) -> None:
    """?api_key=... is refused with 401 key_in_query, even beside a valid header key."""
    _, _, key = stack.new_key()
    reply = get(stack.port, f"/hello?api_key={key}", headers=[("x-api-key", key)])
    assert (reply.status, reply.json()["error"]) == (401, "key_in_query")


def test_megabyte_key_header_is_refused_by_envoy(stack: Stack) -> None:
    """A 1 MB header exceeds Envoy's header limit: refused (431) before it reaches us."""
    reply_status = raw_status(
        stack.port,
        b"GET / HTTP/1.1\r\nhost: x\r\nx-api-key: nk_" + b"a" * (1 << 20) + b"\r\n\r\n",
    )
    assert reply_status in {400, 431}


@pytest.mark.parametrize(
    "bad",
    [b"nk_abc\x00def", b"nk_abc\rdef", b"nk_\xff\xfe" + b"a" * 41 + b"_abcdef"],
)
def test_control_and_non_utf8_bytes_never_reach_the_backend(stack: Stack, bad: bytes) -> None:
    """NUL, bare CR and non-UTF-8 key bytes get 400 (Envoy) or 401 (us), never the backend."""
    hits = stack.backend.hits
    status = raw_status(stack.port, b"GET / HTTP/1.1\r\nhost: x\r\nx-api-key: " + bad + b"\r\n\r\n")
    assert status in {400, 401}
    assert stack.backend.hits == hits
    assert stack.sidecar.poll() is None


def test_revocation_from_cli_takes_effect_within_one_second(stack: Stack) -> None:
    """`extauthz keys revoke` in another process: the running server refuses within 1 s."""
    _, key_id, key = stack.new_key()
    assert get(stack.port, headers=[("x-api-key", key)]).status == 200
    result = stack.cli("keys", "revoke", key_id)
    assert result.returncode == 0, result.stderr
    delay = wait_until(lambda: get(stack.port, headers=[("x-api-key", key)]).status == 401, 3)
    print(f"\nrevocation delay after the CLI returned: {delay * 1000:.0f} ms")
    assert delay < 1.0
    assert get(stack.port, headers=[("x-api-key", key)]).json()["error"] == "key_revoked"


def test_revocation_propagation_delay_is_under_one_second(stack: Stack) -> None:
    """Measured from the revoking commit (in this process) to the first 401 through Envoy."""
    import time

    _, key_id, key = stack.new_key()
    assert get(stack.port, headers=[("x-api-key", key)]).status == 200
    start = time.monotonic()
    stack.runtime.keys.revoke_key(key_id)
    committed = time.monotonic() - start
    delay = wait_until(lambda: get(stack.port, headers=[("x-api-key", key)]).status == 401, 3)
    print(f"\nrevocation delay after commit: {(delay + committed) * 1000:.0f} ms")
    assert delay + committed < 1.0


def test_suspended_tenant_gets_403_and_resume_restores(stack: Stack) -> None:
    """Suspending via CLI turns 200 into 403 tenant_suspended; resuming brings 200 back."""
    tenant_id, _, key = stack.new_key()
    assert get(stack.port, headers=[("x-api-key", key)]).status == 200
    assert stack.cli("tenants", "suspend", tenant_id).returncode == 0
    wait_until(lambda: get(stack.port, headers=[("x-api-key", key)]).status == 403, 3)
    assert get(stack.port, headers=[("x-api-key", key)]).json()["error"] == "tenant_suspended"
    assert stack.cli("tenants", "resume", tenant_id).returncode == 0
    wait_until(lambda: get(stack.port, headers=[("x-api-key", key)]).status == 200, 3)


def test_rotated_key_both_work_during_grace(stack: Stack) -> None:
    """After `keys rotate --grace 1h` the old and the new key are both accepted."""
    _, key_id, old = stack.new_key()
    result = stack.cli("keys", "rotate", key_id, "--grace", "1h", "--json")
    assert result.returncode == 0, result.stderr
    import json

    new = json.loads(result.stdout)["key"]
    wait_until(lambda: get(stack.port, headers=[("x-api-key", new)]).status == 200, 3)
    assert get(stack.port, headers=[("x-api-key", old)]).status == 200


def test_last_used_time_is_written_back(stack: Stack) -> None:
    """A used key shows a last-used time after the batched write (5 s by default)."""
    _, key_id, key = stack.new_key()
    assert get(stack.port, headers=[("x-api-key", key)]).status == 200
    wait_until(lambda: stack.runtime.store.get_key(key_id).last_used_at is not None, 10, 0.2)  # type: ignore[union-attr]


def test_sidecar_sees_the_client_address_and_envoys_request_id(stack: Stack) -> None:
    """The core gets the client's address (127.0.0.1, not Envoy's own: for loopback
    clients Envoy appends its local address to x-forwarded-for) and the x-request-id the
    upstream sees, not Envoy's internal stream id."""
    import re

    _, _, key = stack.new_key()
    request_id = seen(get(stack.port, headers=[("x-api-key", key)]).json())["x-request-id"]
    assert get(stack.port, "/whoami").status == 401
    lines = [line for line in stack.log.read_text().splitlines() if "path=/whoami" in line]
    assert lines
    assert "source=127.0.0.1 " in lines[-1]
    assert re.search(r"request_id=[0-9a-f]{8}-[0-9a-f]{4}-", lines[-1]), lines[-1]
    assert request_id != lines[-1].rsplit("request_id=", 1)[1]  # each request its own id


def test_public_path_needs_no_key_and_upstream_never_sees_forged_identity(stack: Stack) -> None:
    """/healthz (public in the policy) passes without a key; a forged x-tenant-id and a
    key sent anyway are removed before the backend."""
    _, _, key = stack.new_key()
    reply = get(stack.port, "/healthz", [("x-tenant-id", "evil"), ("x-api-key", key)])
    assert reply.status == 200
    headers = seen(reply.json())
    assert "x-tenant-id" not in headers
    assert "x-api-key" not in headers
    assert key not in reply.body.decode()


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ("//healthz", True),
        ("/healthz/", False),
        ("/healthz/../admin", False),
        ("/x/../healthz", True),
    ],
)
def test_route_rules_see_the_path_envoy_normalised(stack: Stack, path: str, allowed: bool) -> None:
    """BAD_INPUTS #9: merged slashes and dot segments are resolved by Envoy before the
    rule matches, so /healthz/../admin is /admin (401) and //healthz is /healthz (200)."""
    reply = get(stack.port, path)
    assert reply.status == (200 if allowed else 401)


def test_escaped_slashes_never_bypass_a_rule(stack: Stack) -> None:
    """/healthz%2F..%2Fadmin is not served as public: Envoy redirects to the unescaped
    path (which then normalises to /admin) instead of passing it through."""
    hits = stack.backend.hits
    reply = get(stack.port, "/healthz%2F..%2Fadmin")
    assert reply.status != 200
    assert stack.backend.hits == hits


# Keep last: it scans the log of every request the tests above made.
def test_no_key_ever_appears_in_the_sidecar_log(stack: Stack) -> None:
    """After every test above (debug logging on), the sidecar's log holds none of the keys
    used, not even their random bodies, and no query-string key."""
    text = stack.log.read_text()
    assert "deny reason=" in text  # debug logging really ran
    assert stack.keys_made
    for key in stack.keys_made:
        assert key not in text
        assert key.split("_")[1] not in text
    assert "api_key=" not in text
