"""The server's background work, on one thread: polling the store's revision (so
revocations made by other processes land within ``revocation_poll``) and the policy
file, following the audit table for webhooks, expiring overdue concurrency leases and
billing their requests, and writing daily counts and last-used times in batches."""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Callable

from extauthz.app import Runtime
from extauthz.errors import ExtauthzError
from extauthz.limits.quota import quota_window
from extauthz.reload import PolicyWatcher
from extauthz.threadnames import name_this_thread
from extauthz.usage import incomplete
from extauthz.webhooks import WebhookDispatcher

log = logging.getLogger("extauthz")


class Upkeep(threading.Thread):
    """Polls the store's revision (so revocations from other processes land within
    ``revocation_poll``) and the policy file; writes last-used times, daily counts and
    audit events in batches; expires overdue concurrency leases."""

    def __init__(
        self,
        runtime: Runtime,
        watcher: PolicyWatcher | None = None,
        webhooks: WebhookDispatcher | None = None,
    ) -> None:
        super().__init__(name="extauthz-upkeep", daemon=True)
        self.runtime = runtime
        self.watcher = watcher
        self.webhooks = webhooks
        self.stopping = threading.Event()
        # Set by the server processes (serve, up): see gc.freeze() in run().
        self.freeze_heap = False

    def run(self) -> None:
        name_this_thread("extauthz-upkeep")
        settings = self.runtime.settings
        clock = self.runtime.clock
        next_touch = clock.monotonic() + settings.last_used_flush
        next_flush = clock.monotonic() + settings.flush_interval
        next_freeze = clock.monotonic()
        while not self.stopping.wait(min(settings.revocation_poll, settings.flush_interval)):
            self._step("store changes", self.runtime.resolver.refresh)
            if self.watcher is not None:
                self._step("policy reload", self.watcher.poll)
            if self.webhooks is not None:
                self._step("webhooks", self.webhooks.poll)
            if clock.monotonic() >= next_flush:
                next_flush = clock.monotonic() + settings.flush_interval
                self._step("counters", self._expire_leases)
                if self.runtime.journal is not None:
                    self._step("daily counts", self.runtime.journal.flush)
            if clock.monotonic() >= next_touch:
                next_touch = clock.monotonic() + settings.last_used_flush
                self._step("last-used times", self.runtime.resolver.flush_last_used)
            if self.freeze_heap and clock.monotonic() >= next_freeze:
                # Once a second, what has survived so far leaves the cyclic garbage
                # collector's sight. Measured while 100,000 keys filled the cache: full
                # collections over the cached objects paused every thread for up to
                # 261 ms; 2.9 ms at most with this. Frozen objects are still freed by
                # reference counting; only cyclic garbage alive at that instant would
                # stay (the check and access-log paths make none: tested).
                next_freeze = clock.monotonic() + 1.0
                gc.freeze()

    def _step(self, what: str, step: Callable[[], object]) -> None:
        try:
            step()
        except ExtauthzError as exc:
            log.warning("upkeep: %s failed: %s", what, exc)
        except Exception:
            # Keep polling: a dead upkeep thread would silently stop revocations.
            log.exception("upkeep: %s failed unexpectedly", what)

    def _expire_leases(self) -> None:
        """Free overdue slots, and bill their requests (never reported by the access
        log) as incomplete: straight to the store, whatever their number."""
        counters = self.runtime.counters
        counters.maintain(self._days())
        expired = counters.drain_expired()
        if expired:
            runtime = self.runtime
            runtime.usage.add_now([incomplete(settled) for settled in expired])
            policy = runtime.policy
            runtime.audit.log_incomplete(expired, policy.audit.allowed, policy.version)

    def _days(self) -> frozenset[str]:
        """Today and yesterday in the policy's zone: counts of older days are dropped."""
        now = self.runtime.clock.now()
        zone = self.runtime.policy.timezone
        return frozenset(quota_window(t, zone)[0] for t in (now, now - 86_400))

    def stop(self) -> None:
        self.stopping.set()
        self.join()
        try:
            self.runtime.resolver.flush_last_used()
        except ExtauthzError as exc:
            log.warning("could not write last-used times on stop: %s", exc)
