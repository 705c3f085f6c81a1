"""Tenant webhooks: which events go, the signature a receiver checks, and retries."""

from __future__ import annotations

from extauthz.auditchain import AuditChain
from extauthz.model import AuditEvent
from extauthz.policy import parse_policy
from extauthz.store.memory import MemoryStore
from extauthz.webhooks import WebhookDispatcher
from tests.webhook_receiver import Receiver


def test_matching_events_are_signed_sent_and_retried_with_backoff() -> None:
    """Only the tenant's listed actions go; a 500 is retried after 1 s, then 2 s; the
    receiver verifies every signature; history before start is not resent."""
    receiver = Receiver(b"s3cret", fail_first=2)
    store = MemoryStore()
    store.audit_chain = AuditChain(b"k" * 32)
    store.append_audit([AuditEvent("KEY_REVOKED", "success", 1.0, tenant_id="t1")])  # history
    policy = parse_policy(f"webhooks:\n  t1: {{url: '{receiver.url}', secret_env: HOOK_SECRET}}\n")
    waits: list[float] = []
    hooks = WebhookDispatcher(
        store, lambda: policy, environ={"HOOK_SECRET": "s3cret"}, sleep=waits.append
    )
    store.append_audit(
        [
            AuditEvent("KEY_REVOKED", "success", 2.0, tenant_id="t1", key_id="key_1"),
            AuditEvent("RATE_LIMITED", "denied", 3.0, tenant_id="t1"),
            AuditEvent("QUOTA_EXCEEDED", "denied", 4.0, tenant_id="t2"),
        ]
    )
    assert hooks.poll() == 1
    assert hooks.poll() == 0
    delivery = hooks._queue.get_nowait()
    assert delivery is not None
    assert hooks.deliver(delivery)
    receiver.stop()
    assert (receiver.attempts, receiver.bad_signatures, waits) == (3, 0, [1.0, 2.0])
    (sent,) = receiver.received
    assert (sent["event"], sent["tenant_id"], sent["key_id"], sent["seq"]) == (
        "KEY_REVOKED",
        "t1",
        "key_1",
        2,
    )


def test_gives_up_after_the_last_attempt_and_never_raises() -> None:
    """An unreachable receiver: five attempts, then counted as failed."""
    store = MemoryStore()
    store.audit_chain = AuditChain(b"k" * 32)
    policy = parse_policy("webhooks:\n  t1: {url: 'http://127.0.0.1:9/x', secret_env: S}\n")
    waits: list[float] = []
    hooks = WebhookDispatcher(store, lambda: policy, environ={"S": "x"}, sleep=waits.append)
    store.append_audit([AuditEvent("SECURITY_ALERT", "alert", 1.0, tenant_id="t1")])
    hooks.poll()
    delivery = hooks._queue.get_nowait()
    assert delivery is not None
    assert not hooks.deliver(delivery)
    assert (hooks.failed, waits) == (1, [1.0, 2.0, 4.0, 8.0])
