"""Tenant webhooks: QUOTA_EXCEEDED, KEY_REVOKED and SECURITY_ALERT events POSTed as
signed JSON to the URL a tenant's policy names.

The dispatcher follows the audit table (so events written by any process, such as a
revocation from the CLI, are sent), from the log's head at start onwards. Deliveries
never block a decision, and destinations never block each other:

- each destination (URL) has its own bounded queue and at most one delivery in flight;
  a small pool of worker threads (started as deliveries come, at most one per
  destination with work) serves whichever destination is due;
- a failed attempt (connection error, timeout, 5xx, 408, 429) is retried with
  exponential backoff; the destination waits out its backoff without holding a worker,
  so a dead receiver costs the others nothing but one worker for one timeout at a time;
- a 4xx other than 408 and 429 is the receiver refusing this event: not retried.

The signature is ``x-extauthz-signature: sha256=<hex>``, an HMAC-SHA256 with the
tenant's secret over ``<x-extauthz-timestamp>.<body>``, so a receiver can refuse
replays.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from extauthz.model import AuditEvent
from extauthz.policy import Policy, Webhook
from extauthz.store.base import Store
from extauthz.threadnames import named

log = logging.getLogger("extauthz.webhooks")
SENT, RETRY, GIVE_UP = "sent", "retry", "give_up"


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


@dataclass
class Destination:
    """One receiver URL: its waiting deliveries, oldest first."""

    url: str
    waiting: deque[Delivery] = field(default_factory=deque)
    busy: bool = False  # a worker is sending to it now
    due: float = 0.0  # monotonic time its next attempt may start
    attempt: int = 0  # attempts made for the delivery at the head


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
        workers: int = 8,
        per_destination: int = 1_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.policy = policy
        self.environ = os.environ if environ is None else environ
        self.attempts = attempts
        self.backoff = backoff
        self.timeout = timeout
        self.workers = workers
        self.per_destination = per_destination
        self.clock = clock
        head = store.audit_head()
        self.cursor = head.seq if head is not None else 0
        self.sent = 0
        self.failed = 0  # given up: attempts exhausted, refused by the receiver, no secret
        self.dropped = 0  # the destination's queue was full
        self._destinations: dict[str, Destination] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self._started = False
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------ following the log

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
            if hook is not None and event.action in hook.events:
                queued += self.enqueue(Delivery(hook, event))
        return queued

    def enqueue(self, delivery: Delivery) -> int:
        """Add to its destination's queue (1), or count it dropped when full (0)."""
        with self._cond:
            dest = self._destinations.get(delivery.hook.url)
            if dest is None:
                dest = self._destinations[delivery.hook.url] = Destination(delivery.hook.url)
            if len(dest.waiting) >= self.per_destination:
                self.dropped += 1
                log.error(
                    "webhook queue for %s full (%d): event %d for %s dropped",
                    dest.url,
                    self.per_destination,
                    delivery.event.seq,
                    delivery.event.tenant_id,
                )
                return 0
            dest.waiting.append(delivery)
            self._cond.notify()
            busy = sum(1 for d in self._destinations.values() if d.waiting)
            if self._started and len(self._threads) < min(self.workers, busy):
                self._spawn()  # workers come with work: none while no tenant has a hook
        return 1

    def pending(self, url: str) -> int:
        with self._cond:
            dest = self._destinations.get(url)
            return len(dest.waiting) if dest is not None else 0

    # ------------------------------------------------------------ one attempt

    def attempt(self, delivery: Delivery) -> tuple[str, float | None]:
        """POST once. Returns (SENT, RETRY or GIVE_UP, the receiver's Retry-After)."""
        hook = delivery.hook
        secret = self.environ.get(hook.secret_env)
        if not secret:
            log.error(
                "webhook for %s: %s is not set; not sent", delivery.event.tenant_id, hook.secret_env
            )
            return GIVE_UP, None
        body = payload(delivery.event)
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
                return (SENT if 200 <= resp.status < 300 else RETRY), None
        except urllib.error.HTTPError as exc:
            retry_after = _seconds(exc.headers.get("retry-after"))
            exc.close()
            if 400 <= exc.code < 500 and exc.code not in (408, 429):
                log.error("webhook to %s refused with %d: not retried", hook.url, exc.code)
                return GIVE_UP, None
            log.warning("webhook to %s answered %d", hook.url, exc.code)
            return RETRY, retry_after
        except (urllib.error.URLError, OSError) as exc:
            log.warning("webhook to %s failed: %s", hook.url, exc)
            return RETRY, None

    # ------------------------------------------------------------ workers

    def _next(self) -> Destination | None:
        """The destination due first (waits until one is); None when stopping."""
        with self._cond:
            while not self._stopping:
                now = self.clock()
                soonest = None
                for dest in self._destinations.values():
                    if dest.busy or not dest.waiting:
                        continue
                    if dest.due <= now:
                        dest.busy = True
                        return dest
                    soonest = dest.due if soonest is None else min(soonest, dest.due)
                self._cond.wait(None if soonest is None else max(0.0, soonest - now))
            return None

    def _finish(self, dest: Destination, outcome: str, retry_after: float | None) -> None:
        with self._cond:
            dest.attempt += 1
            done = outcome != RETRY or dest.attempt >= self.attempts
            if done:
                dest.waiting.popleft()
                if outcome == SENT:
                    self.sent += 1
                else:
                    self.failed += 1
                    if outcome == RETRY:
                        log.error("webhook to %s gave up after %d attempts", dest.url, dest.attempt)
                dest.attempt, dest.due = 0, self.clock()
                if not dest.waiting:  # forget idle destinations (URLs change on reload)
                    del self._destinations[dest.url]
            else:
                wait = self.backoff * 2 ** (dest.attempt - 1)
                dest.due = self.clock() + min(max(wait, retry_after or 0.0), 300.0)
            dest.busy = False
            self._cond.notify_all()

    def _work(self) -> None:
        while True:
            dest = self._next()
            if dest is None:
                return
            try:
                outcome, retry_after = self.attempt(dest.waiting[0])
            except Exception:
                log.exception("webhook delivery failed unexpectedly")
                outcome, retry_after = RETRY, None
            self._finish(dest, outcome, retry_after)

    def start(self) -> None:
        with self._cond:
            self._started = True
            busy = sum(1 for d in self._destinations.values() if d.waiting)
            while len(self._threads) < min(self.workers, busy):
                self._spawn()

    def _spawn(self) -> None:
        """One more worker (the caller holds ``_cond``)."""
        name = f"extauthz-webhooks-{len(self._threads)}"
        thread = threading.Thread(target=named(name[:15], self._work), name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def close(self, timeout: float = 5.0) -> None:
        """Stop; deliveries still waiting are not sent (the next start follows the log
        from its head)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        with self._cond:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))


def _seconds(value: str | None) -> float | None:
    """A Retry-After in seconds (the HTTP-date form is not used by webhook receivers)."""
    try:
        return float(value) if value else None
    except ValueError:
        return None
