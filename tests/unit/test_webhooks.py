"""Tenant webhooks: which events go, the signature a receiver checks, retries, and
destinations that never hold each other up."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator

import pytest

from extauthz.auditchain import AuditChain
from extauthz.model import AuditEvent
from extauthz.policy import Policy, parse_policy
from extauthz.store.memory import MemoryStore
from extauthz.testing import ManualClock
from extauthz.webhooks import GIVE_UP, RETRY, Delivery, WebhookDispatcher
from tests.webhook_receiver import Receiver


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> float:
    """Poll until true (bounded); returns the seconds it took."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, "condition not met in time"
        time.sleep(0.005)
    return time.monotonic() - started


def new_store() -> MemoryStore:
    store = MemoryStore()
    store.audit_chain = AuditChain(b"k" * 32)
    return store


def hooks_policy(**urls: str) -> Policy:
    lines = "".join(f"  {t}: {{url: '{u}', secret_env: S}}\n" for t, u in urls.items())
    return parse_policy("webhooks:\n" + lines)


@pytest.fixture
def silent() -> Iterator[str]:
    """A URL whose server accepts connections and never answers (a dead receiver)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/hook"


def test_matching_events_are_signed_sent_and_retried() -> None:
    """Only the tenant's listed actions go; two 500s are retried; the receiver verifies
    every signature; history before start is not resent."""
    receiver = Receiver(b"s3cret", fail_first=2)
    store = new_store()
    store.append_audit([AuditEvent("KEY_REVOKED", "success", 1.0, tenant_id="t1")])  # history
    policy = hooks_policy(t1=receiver.url)
    hooks = WebhookDispatcher(store, lambda: policy, environ={"S": "s3cret"}, backoff=0.01)
    hooks.start()
    store.append_audit(
        [
            AuditEvent("KEY_REVOKED", "success", 2.0, tenant_id="t1", key_id="key_1"),
            AuditEvent("RATE_LIMITED", "denied", 3.0, tenant_id="t1"),
            AuditEvent("QUOTA_EXCEEDED", "denied", 4.0, tenant_id="t2"),
        ]
    )
    assert hooks.poll() == 1
    assert hooks.poll() == 0
    wait_for(lambda: hooks.sent == 1)
    hooks.close()
    receiver.stop()
    assert (receiver.attempts, receiver.bad_signatures) == (3, 0)
    (sent,) = receiver.received
    assert (sent["event"], sent["tenant_id"], sent["key_id"], sent["seq"]) == (
        "KEY_REVOKED",
        "t1",
        "key_1",
        2,
    )


def test_a_dead_receiver_does_not_hold_up_another_tenants_deliveries(silent: str) -> None:
    """Tenant A's receiver never answers (each attempt waits the 1 s timeout); tenant B's
    five events, queued after A's, all arrive while A is still on its first attempt."""
    live = Receiver(b"x")
    store = new_store()
    policy = hooks_policy(a=silent, b=live.url)
    hooks = WebhookDispatcher(store, lambda: policy, environ={"S": "x"}, timeout=1.0)
    hooks.start()
    store.append_audit([AuditEvent("SECURITY_ALERT", "alert", 1.0, tenant_id="a")] * 5)
    store.append_audit([AuditEvent("SECURITY_ALERT", "alert", 2.0, tenant_id="b")] * 5)
    assert hooks.poll() == 10
    took = wait_for(lambda: len(live.received) == 5)
    assert took < 0.9  # before A's first attempt has even timed out
    assert hooks.pending(silent) == 5
    hooks.close()
    live.stop()


@pytest.mark.parametrize(
    ("status", "attempts", "outcome"),
    [(400, 1, GIVE_UP), (404, 1, GIVE_UP), (401, 1, GIVE_UP), (408, 3, RETRY),
     (429, 3, RETRY), (500, 3, RETRY), (503, 3, RETRY)],
)  # fmt: skip
def test_only_timeouts_throttling_and_server_errors_are_retried(
    status: int, attempts: int, outcome: str
) -> None:
    """A 4xx is the receiver refusing this event: one attempt, then given up; 408,
    429 and 5xx are tried again, up to `attempts`."""
    receiver = Receiver(b"x", status=status)
    store = new_store()
    policy = hooks_policy(t=receiver.url)
    hooks = WebhookDispatcher(store, lambda: policy, environ={"S": "x"}, attempts=3, backoff=0.01)
    delivery = Delivery(policy.webhooks["t"], AuditEvent("SECURITY_ALERT", "alert", 1.0))
    assert hooks.attempt(delivery)[0] == outcome
    hooks.start()
    hooks.enqueue(delivery)
    wait_for(lambda: hooks.failed == 1)
    hooks.close()
    receiver.stop()
    assert receiver.attempts == attempts + 1  # the direct attempt above, then the worker's


def test_backoff_doubles_and_a_retry_after_is_honoured(clock: ManualClock) -> None:
    """After failed attempts the destination is due 1, 2, 4 s later (never holding a
    worker meanwhile); a receiver's Retry-After, when longer, wins."""
    store = new_store()
    policy = hooks_policy(t="http://127.0.0.1:9/x")
    hooks = WebhookDispatcher(store, lambda: policy, environ={"S": "x"}, clock=clock.monotonic)
    hooks.enqueue(Delivery(policy.webhooks["t"], AuditEvent("SECURITY_ALERT", "alert", 1.0)))
    waits = []
    for retry_after in (None, None, None, 30.0):
        dest = hooks._next()
        assert dest is not None
        hooks._finish(dest, RETRY, retry_after)
        waits.append(dest.due - clock.monotonic())
        assert not dest.busy
        clock.advance(dest.due - clock.monotonic())
    assert waits == [1.0, 2.0, 4.0, 30.0]
    dest = hooks._next()
    assert dest is not None
    hooks._finish(dest, RETRY, None)  # the fifth attempt: given up
    assert (hooks.failed, hooks.pending("http://127.0.0.1:9/x")) == (1, 0)


def test_each_destination_queue_is_bounded() -> None:
    """At most `per_destination` deliveries wait per URL; more are counted dropped."""
    store = new_store()
    policy = hooks_policy(t="http://127.0.0.1:9/x")
    hooks = WebhookDispatcher(store, lambda: policy, environ={"S": "x"}, per_destination=3)
    event = AuditEvent("SECURITY_ALERT", "alert", 1.0, tenant_id="t")
    queued = [hooks.enqueue(Delivery(policy.webhooks["t"], event)) for _ in range(5)]
    assert (queued, hooks.dropped) == ([1, 1, 1, 0, 0], 2)


def test_a_missing_secret_gives_up_at_once_and_never_raises() -> None:
    """No secret in the environment: nothing is sent, counted as failed."""
    store = new_store()
    policy = hooks_policy(t="http://127.0.0.1:9/x")
    hooks = WebhookDispatcher(store, lambda: policy, environ={})
    delivery = Delivery(policy.webhooks["t"], AuditEvent("SECURITY_ALERT", "alert", 1.0))
    assert hooks.attempt(delivery) == (GIVE_UP, None)
