"""Tenant webhooks: QUOTA_EXCEEDED, KEY_REVOKED and SECURITY_ALERT events POSTed as
signed JSON to the URL a tenant's policy names.

The dispatcher follows the audit table (so events written by any process, such as a
revocation from the CLI, are sent), from the log's head at start onwards. Deliveries
run on their own thread with retries and exponential backoff, and never block a
decision. The signature is ``x-extauthz-signature: sha256=<hex>``, an HMAC-SHA256 with
the tenant's secret over ``<x-extauthz-timestamp>.<body>``, so a receiver can refuse
replays.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import queue
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from extauthz.model import AuditEvent
from extauthz.policy import Policy, Webhook
from extauthz.store.base import Store

log = logging.getLogger("extauthz.webhooks")


def signature(secret: bytes, timestamp: str, body: bytes) -> str:
    return (
        "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    )


def payload(event: AuditEvent) -> bytes:
    data = {
        "event": event.action,
        "seq": event.seq,
        "ts": event.ts,
        "tenant_id": event.tenant_id,
        "key_id": event.key_id,
        "outcome": event.outcome,
        "reason": event.reason,
        "detail": json.loads(event.detail) if event.detail else {},
    }
    return json.dumps(data, sort_keys=True).encode()


@dataclass(frozen=True)
class Delivery:
    hook: Webhook
    event: AuditEvent


class WebhookDispatcher:
    def __init__(
        self,
        store: Store,
        policy: Callable[[], Policy],
        *,
        environ: Mapping[str, str] | None = None,
        attempts: int = 5,
        backoff: float = 1.0,
        timeout: float = 5.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.store = store
        self.policy = policy
        self.environ = os.environ if environ is None else environ
        self.attempts = attempts
        self.backoff = backoff
        self.timeout = timeout
        self.sleep = sleep
        head = store.audit_head()
        self.cursor = head.seq if head is not None else 0
        self.sent = 0
        self.failed = 0
        self._queue: queue.Queue[Delivery | None] = queue.Queue(maxsize=10_000)
        self._thread: threading.Thread | None = None

    def poll(self) -> int:
        """Queue a delivery for each new matching event; returns how many."""
        hooks = self.policy().webhooks
        # With replicas on one database, one of them sends (the others keep their
        # cursor at the head, ready to take over).
        if not hooks or not self.store.try_lead("webhooks"):
            # Nothing to send: skip ahead without reading the rows (at thousands of
            # events a second, reading them back cost more than writing them).
            head = self.store.audit_head()
            self.cursor = head.seq if head is not None else self.cursor
            return 0
        head = self.store.audit_head()  # first: rows appended meanwhile wait for next time
        if head is None or head.seq <= self.cursor:
            return 0
        actions = {a for hook in hooks.values() for a in hook.events}
        events = [
            e
            for action in sorted(actions)
            for e in self.store.query_audit(action=action, after_seq=self.cursor, limit=10_000)
            if e.seq <= head.seq
        ]
        self.cursor = head.seq
        events.sort(key=lambda e: e.seq)
        queued = 0
        for event in events:
            hook = hooks.get(event.tenant_id)
            if hook is None or event.action not in hook.events:
                continue
            try:
                self._queue.put_nowait(Delivery(hook, event))
                queued += 1
            except queue.Full:
                self.failed += 1
                log.error("webhook queue full: event %d for %s dropped", event.seq, event.tenant_id)
        return queued

    def deliver(self, delivery: Delivery) -> bool:
        """POST with retries: ``attempts`` tries, waiting backoff, 2x backoff, ... between."""
        hook = delivery.hook
        secret = self.environ.get(hook.secret_env)
        if not secret:
            log.error(
                "webhook for %s: %s is not set; not sent", delivery.event.tenant_id, hook.secret_env
            )
            self.failed += 1
            return False
        body = payload(delivery.event)
        for attempt in range(self.attempts):
            stamp = str(int(time.time()))
            request = urllib.request.Request(  # noqa: S310 - the scheme is checked by the policy
                hook.url,
                data=body,
                method="POST",
                headers={
                    "content-type": "application/json",
                    "x-extauthz-event": delivery.event.action,
                    "x-extauthz-timestamp": stamp,
                    "x-extauthz-signature": signature(secret.encode(), stamp, body),
                },
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as resp:  # noqa: S310
                    if 200 <= resp.status < 300:
                        self.sent += 1
                        return True
            except (urllib.error.URLError, OSError) as exc:
                log.warning("webhook to %s failed (attempt %d): %s", hook.url, attempt + 1, exc)
            if attempt + 1 < self.attempts:
                self.sleep(self.backoff * 2**attempt)
        self.failed += 1
        log.error("webhook to %s gave up after %d attempts", hook.url, self.attempts)
        return False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="extauthz-webhooks", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            delivery = self._queue.get()
            if delivery is None:
                return
            try:
                self.deliver(delivery)
            except Exception:
                log.exception("webhook delivery failed unexpectedly")

    def close(self, timeout: float = 5.0) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
