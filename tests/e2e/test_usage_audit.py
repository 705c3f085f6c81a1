"""Usage records and the audit trail through a real Envoy: records match Envoy's own
access log, every audit action happens the way a user makes it happen, and the chain
verifies from the command line."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from extauthz.model import TenantTier
from tests.e2e.backends import TestBackend
from tests.e2e.conftest import Stack, running_stack, wait_until
from tests.e2e.http_util import get
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.e2e

POLICY = """
audit: {allowed: all}
security: {max_auth_failures: 5, window_seconds: 60, block_seconds: 0}
tenants:
  t_quota: {requests_per_day: 1}
  t_burst: {rate_limit: {requests_per_minute: 1, burst: 1}}
"""
FILE_LOG = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"


def file_access_log(path: Path) -> Any:
    """Adds Envoy's own JSON access log, the reference the usage records must match."""

    def tweak(config: dict[str, Any]) -> None:
        listener = config["static_resources"]["listeners"][0]
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        hcm.setdefault("access_log", []).append(
            {
                "name": "envoy.access_loggers.file",
                "typed_config": {
                    "@type": FILE_LOG,
                    "path": str(path),
                    "log_format": {
                        "json_format": {
                            "request_id": "%REQ(X-REQUEST-ID)%",
                            "status": "%RESPONSE_CODE%",
                            "duration_ms": "%DURATION%",
                            "tokens_in": "%RESP(X-USAGE-INPUT-TOKENS)%",
                            "tokens_out": "%RESP(X-USAGE-OUTPUT-TOKENS)%",
                        }
                    },
                },
            }
        )

    return tweak


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Path]]:
    data = tmp_path_factory.mktemp("usage-audit")
    log = data / "envoy-access.log"
    with running_stack(
        data,
        "grpc",
        POLICY,
        TestBackend(),
        tweak=file_access_log(log),
        envoy_args=("--file-flush-interval-msec", "100"),
    ) as s:
        yield s, log


def rows(stack: Stack, **filters: Any) -> list[Any]:
    return stack.runtime.store.query_audit(**filters)


def test_usage_records_match_envoys_own_access_log(audited: tuple[Stack, Path]) -> None:
    """20 requests to an upstream reporting 120 + 180 tokens: 20 usage rows, with the
    request ids, statuses, tokens and durations Envoy logged itself, and the cost at the
    starter price (0.002 per 1K tokens); and (audit.allowed: all) one API_REQUEST event
    per request, none at the check."""
    stack, log = audited
    tenant = stack.runtime.tenants.create_tenant("metered", TenantTier.STARTER)
    key = stack.runtime.keys.create_key(tenant.id)[1]
    for _ in range(20):
        assert get(stack.port, "/usage/120/180", [("x-api-key", key)]).status == 200

    def recorded() -> list[Any]:
        return stack.runtime.store.query_usage(tenant_id=tenant.id)

    def logged() -> dict[str, Any]:
        entries = [json.loads(line) for line in log.read_text().splitlines()]
        return {e["request_id"]: e for e in entries if e["tokens_in"] == "120"}

    wait_until(lambda: len(recorded()) == 20, 5)
    wait_until(lambda: len(logged()) == 20, 5)
    envoy = logged()
    ours = {r.request_id: r for r in recorded()}
    assert set(ours) == set(envoy)
    for rid, record in ours.items():
        assert (record.status, record.tokens_in, record.tokens_out) == (200, 120, 180)
        assert abs(record.latency_ms - int(envoy[rid]["duration_ms"])) < 1.5
        assert record.cost == pytest.approx(300 * 0.002 / 1000)
        assert not record.incomplete
    assert sum(r.cost for r in ours.values()) == pytest.approx(20 * 300 * 0.002 / 1000)
    # audit.allowed: all: one chained event per allowed request, at its end, never two.
    wait_until(lambda: len(events_of(stack, set(ours))) == 20, 5)
    events = events_of(stack, set(ours))
    assert sorted(e.request_id for e in events) == sorted(ours)
    assert {e.action for e in events} == {"API_REQUEST"}
    assert all(json.loads(e.detail)["tokens"] == 300 for e in events)


def streamed(port: int, path: str, key: str) -> bytes:
    """A raw HTTP/1.1 GET, read to the end of its chunked body (trailers included)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(
            f"GET {path} HTTP/1.1\r\nhost: x\r\nx-api-key: {key}\r\nte: trailers\r\n"
            "connection: close\r\n\r\n".encode()
        )
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer


def test_a_streamed_answer_is_billed_from_its_trailers(audited: tuple[Stack, Path]) -> None:
    """An upstream that streams its answer (chunked, like server-sent events) and sends
    its token counts as trailers: the client still gets the stream and the trailers,
    and each usage record carries the counts from the trailers (70 in, 30 out)."""
    stack, _ = audited
    tenant = stack.runtime.tenants.create_tenant("streamer", TenantTier.STARTER)
    key = stack.runtime.keys.create_key(tenant.id)[1]
    for _ in range(5):
        answer = streamed(stack.port, "/stream-usage/70/30", key)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        assert b'data: {"delta": "lo"}' in answer
        assert b"x-usage-output-tokens: 30" in answer.split(b"\r\n0\r\n", 1)[1]

    def recorded() -> list[Any]:
        return stack.runtime.store.query_usage(tenant_id=tenant.id)

    wait_until(lambda: len(recorded()) == 5, 5)
    assert {(r.tokens_in, r.tokens_out, r.incomplete) for r in recorded()} == {(70, 30, False)}


def events_of(stack: Stack, request_ids: set[str]) -> list[Any]:
    return [e for e in rows(stack) if e.request_id in request_ids]


def test_each_audit_action_happens_the_way_a_user_makes_it(audited: tuple[Stack, Path]) -> None:
    """Every action in the trail, caused by the CLI or by requests through Envoy."""
    stack, _ = audited
    cli = stack.cli
    created = json.loads(cli("tenants", "create", "auditee", "--tier", "free", "--json").stdout)
    tid = created["id"]
    key = json.loads(cli("keys", "create", tid, "--json").stdout)
    rotated = json.loads(cli("keys", "rotate", key["key_id"], "--grace", "0", "--json").stdout)
    assert cli("keys", "revoke", rotated["key_id"]).returncode == 0
    assert cli("usage", "show", tid).returncode == 0
    good = stack.runtime.keys.create_key(tid)[1]
    assert get(stack.port, "/fast", [("x-api-key", good)]).status == 200
    assert get(stack.port, "/fast", [("x-api-key", rotated["key"])]).status == 401
    for tenant_id in ("t_quota", "t_burst"):
        stack.runtime.tenants.create_tenant(tenant_id, TenantTier.FREE, tenant_id)
        k = stack.runtime.keys.create_key(tenant_id)[1]
        get(stack.port, "/fast", [("x-api-key", k)])
        assert get(stack.port, "/fast", [("x-api-key", k)]).status == 429
    policy = Path(stack.env["EXTAUTHZ_POLICY_FILE"])
    policy.write_text(policy.read_text() + "\n# touched\n")
    for _ in range(5):  # a brute-force burst from this client's address
        get(stack.port, "/fast", [("x-api-key", "nk_" + "A" * 43 + "_AAAAAA")])

    expected = {
        "DATA_MODIFIED": {"tenant_id": tid, "reason": "tenant.create"},
        "KEY_CREATED": {"key_id": key["key_id"]},
        "KEY_ROTATED": {"key_id": key["key_id"]},
        "KEY_REVOKED": {"key_id": rotated["key_id"]},
        "DATA_ACCESSED": {"reason": "usage.show"},
        "API_REQUEST": {"tenant_id": tid},
        "AUTH_FAILURE": {"key_id": rotated["key_id"], "reason": "key_revoked"},
        "QUOTA_EXCEEDED": {"tenant_id": "t_quota"},
        "RATE_LIMITED": {"tenant_id": "t_burst"},
        "CONFIG_CHANGED": {"outcome": "success"},
        "SECURITY_ALERT": {"reason": "brute_force"},
    }

    def found(action: str, want: dict[str, str]) -> bool:
        return any(
            all(getattr(e, k) == v for k, v in want.items()) for e in rows(stack, action=action)
        )

    wait_until(lambda: all(found(a, w) for a, w in expected.items()), 5)
    admin = rows(stack, action="KEY_REVOKED")[-1]
    assert admin.actor.startswith("admin")
    everything = json.dumps([e.to_dict() for e in rows(stack)])
    for secret in (key["key"], rotated["key"], good):
        assert secret not in everything


def test_audit_verify_and_query_answer_the_auditors_question(audited: tuple[Stack, Path]) -> None:
    """`audit query --key-id K --action KEY_REVOKED --verify`: who revoked K and when,
    and proof the log is intact, in one command (exit 0)."""
    stack, _ = audited
    tenant = stack.runtime.tenants.create_tenant("asked", TenantTier.FREE)
    key_id = stack.runtime.keys.create_key(tenant.id)[0]
    assert stack.cli("keys", "revoke", key_id).returncode == 0
    time.sleep(0.3)  # the server's own queued events reach the store
    out = stack.cli("audit", "query", "--key-id", key_id, "--action", "KEY_REVOKED", "--verify")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "KEY_REVOKED" in out.stdout
    assert "admin:" in out.stdout
    assert "audit chain OK" in out.stdout


def test_a_revocation_from_the_cli_reaches_the_tenants_webhook(tmp_path: Path) -> None:
    """With a webhook in the policy, `extauthz keys revoke` in another process makes the
    running sidecar POST a signed KEY_REVOKED to the tenant's URL within a second or so."""
    receiver = Receiver(b"hook-secret")
    policy = f"webhooks:\n  t_hook: {{url: '{receiver.url}', secret_env: HOOK_SECRET}}\n"
    try:
        with running_stack(tmp_path, "grpc", policy, HOOK_SECRET="hook-secret") as stack:
            stack.runtime.tenants.create_tenant("hooked", TenantTier.FREE, "t_hook")
            key_id = stack.runtime.keys.create_key("t_hook")[0]
            assert stack.cli("keys", "revoke", key_id).returncode == 0
            took = wait_until(lambda: bool(receiver.received), 5)
    finally:
        receiver.stop()
    (sent,) = receiver.received
    assert (sent["event"], sent["key_id"], receiver.bad_signatures) == ("KEY_REVOKED", key_id, 0)
    assert took < 2.0
