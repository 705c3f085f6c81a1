"""A bounded queue with a background writer that commits in batches.

Used for audit events and usage records: the hot path only appends; the writer thread
commits every ``interval`` seconds, or sooner once ``batch`` items wait. A full queue
refuses the item and counts it (``dropped``), logging at the first drop and every
thousandth after, so a slow store never blocks a decision and never fails silently.
``close()`` writes everything still queued (SIGTERM loses nothing acknowledged).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from extauthz.errors import ExtauthzError

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
    ) -> None:
        self.name = name
        self.write = write
        self.capacity = capacity
        self.interval = interval
        self.batch = batch
        self.dropped = 0
        self.written = 0
        self.failures = 0
        self._queue: deque[T] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._flush_lock = threading.Lock()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def put(self, item: T) -> bool:
        """Queue ``item``; False (counted and logged) if the queue is full."""
        with self._lock:
            if len(self._queue) >= self.capacity:
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 1000 == 0:
                    log.error(
                        "%s queue full (%d): %d dropped so far; the store is too slow or down",
                        self.name,
                        self.capacity,
                        self.dropped,
                    )
                return False
            self._queue.append(item)
            if len(self._queue) == self.batch:
                self._wake.notify()
            return True

    @property
    def pending(self) -> int:
        return len(self._queue)

    def flush(self) -> int:
        """Write everything queued now, in order, in batches; on a store error what is
        left stays queued and the error is raised."""
        total = 0
        with self._flush_lock:
            while True:
                with self._lock:
                    chunk = [self._queue[i] for i in range(min(self.batch, len(self._queue)))]
                if not chunk:
                    return total
                self.write(chunk)
                with self._lock:
                    for _ in chunk:
                        self._queue.popleft()
                total += len(chunk)
                self.written += len(chunk)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"extauthz-{self.name}", daemon=True)
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
        """Stop the thread and write what is left (raises if the store refuses it)."""
        with self._lock:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None
        self.flush()
