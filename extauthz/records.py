"""A bounded queue with a background writer that commits in batches.

Used for audit events and usage records: the hot path only appends; the writer thread
commits every ``interval`` seconds, or sooner once ``batch`` items wait. Nothing is
dropped while the local disk takes writes:

- a record that meets a full queue (the store is slow or down) goes to the spill file
  (spill.py) and is written once the store catches up; counted (``spilled``), and
  logged at the first and then at most every 10 seconds;
- records the product makes itself (leases that expired or end at a stop) skip the
  queue: ``write_now`` writes them straight to the store in batches, and spills what
  the store refuses;
- ``close()`` writes everything still queued, and spills what the store refuses, for
  the next start to write.

Only when the disk refuses too (full, read-only) is a record dropped: counted in
``dropped`` and logged as an error.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from extauthz.errors import ExtauthzError
from extauthz.spill import Spill
from extauthz.threadnames import named

log = logging.getLogger("extauthz.records")
T = TypeVar("T")


class BatchWriter(Generic[T]):
    def __init__(
        self,
        name: str,
        write: Callable[[Sequence[T]], object],
        *,
        capacity: int = 50_000,
        interval: float = 1.0,
        batch: int = 2_000,
        spill: Spill[T] | None = None,
    ) -> None:
        self.name = name
        self.write = write
        self.capacity = capacity
        self.interval = interval
        self.batch = batch
        self.spill = spill
        self.dropped = 0
        self.spilled = 0
        self.written = 0
        self.failures = 0
        self._queue: deque[T] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._flush_lock = threading.Lock()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._quiet_until = 0.0

    def put(self, item: T) -> bool:
        """Queue ``item``; a full queue spills it to disk. False only when it was
        dropped (no disk either: counted and logged)."""
        with self._lock:
            if len(self._queue) < self.capacity:
                self._queue.append(item)
                if len(self._queue) == self.batch:
                    self._wake.notify()
                return True
        return self._overflow([item], "queue full")

    def put_many(self, items: Sequence[T]) -> bool:
        """:meth:`put` for several items (an access-log message's), under one lock."""
        with self._lock:
            room = self.capacity - len(self._queue)
            before = len(self._queue)
            self._queue.extend(items[:room])
            if before < self.batch <= len(self._queue):
                self._wake.notify()
        return room >= len(items) or self._overflow(items[max(room, 0) :], "queue full")

    def _overflow(self, items: Sequence[T], why: str) -> bool:
        """Spill ``items``, or (no disk) count them dropped and say so."""
        if self._spill(items, why):
            return True
        self.dropped += len(items)
        if self._say():
            log.error(
                "%s: %s and nowhere to keep them: %d dropped so far", self.name, why, self.dropped
            )
        return False

    def _spill(self, items: Sequence[T], why: str) -> bool:
        """Keep ``items`` on disk; False when there is no spill or the disk refuses."""
        if self.spill is None:
            return False
        try:
            self.spill.add(items)
        except OSError as exc:
            log.error("%s: cannot keep records on disk: %s", self.name, exc)
            return False
        self.spilled += len(items)
        if self._say():
            log.warning(
                "%s: %s; %d records kept on disk so far (%s), written when the store catches up",
                self.name,
                why,
                self.spilled,
                self.spill.path,
            )
        return True

    def _say(self) -> bool:
        """Whether to log an overflow now: the first, then at most one every 10 s."""
        now = time.monotonic()
        if now < self._quiet_until:
            return False
        self._quiet_until = now + 10.0
        return True

    def write_now(self, items: Sequence[T]) -> None:
        """Records the product makes itself: straight to the store in batches, on the
        caller's thread; what the store refuses is spilled (else queued past capacity:
        memory before loss)."""
        for start in range(0, len(items), self.batch):
            chunk = items[start : start + self.batch]
            try:
                with self._flush_lock:
                    self.write(chunk)
            except ExtauthzError as exc:
                rest = items[start:]
                log.warning("%s: store refused %d records: %s", self.name, len(rest), exc)
                if not self._spill(rest, "store unavailable"):
                    with self._lock:
                        self._queue.extend(rest)
                return
            self.written += len(chunk)

    @property
    def pending(self) -> int:
        return len(self._queue) + (self.spill.pending if self.spill is not None else 0)

    def flush(self) -> int:
        """Write everything queued now, in order, in batches, then what was spilled; on
        a store error what is left stays where it was and the error is raised."""
        total = 0
        with self._flush_lock:
            while True:
                with self._lock:
                    chunk = [self._queue[i] for i in range(min(self.batch, len(self._queue)))]
                if not chunk:
                    break
                self.write(chunk)
                with self._lock:
                    for _ in chunk:
                        self._queue.popleft()
                total += len(chunk)
                self.written += len(chunk)
            if self.spill is not None and self.spill.waiting():
                replayed = self.spill.replay(self.write, self.batch)
                self.written += replayed
                total += replayed
        return total

    def start(self) -> None:
        self._thread = threading.Thread(
            target=named(f"extauthz-{self.name}", self._run),
            name=f"extauthz-{self.name}",
            daemon=True,
        )
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._stopping and len(self._queue) < self.batch:
                    self._wake.wait(self.interval)
                stopping = self._stopping
            try:
                self.flush()
            except ExtauthzError as exc:
                self.failures += 1
                log.warning("%s: writing to the store failed, will retry: %s", self.name, exc)
            except Exception:
                self.failures += 1
                log.exception("%s: writing to the store failed unexpectedly", self.name)
            if stopping:
                return

    def close(self) -> None:
        """Stop the thread and write what is left; what the store refuses now is kept on
        disk for the next start (the error is raised when there is no disk to keep it)."""
        with self._lock:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None
        try:
            self.flush()
        except ExtauthzError as exc:
            with self._lock:
                left, self._queue = list(self._queue), deque()
            if left and not self._spill(left, f"store unavailable at stop ({exc})"):
                with self._lock:
                    self._queue.extendleft(reversed(left))
                raise
        finally:
            if self.spill is not None:
                self.spill.close()
