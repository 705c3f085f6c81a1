"""Records the store could not take yet, kept in a local file until it can.

A writer's queue is bounded; what does not fit (the store is slow or down), and what is
left at a stop the store cannot take, is appended here as JSON lines instead of being
dropped, and written to the store in batches once it answers again, by this process or
by the next one to start on the same data directory.

Each process appends to a file of its own (``<name>-<pid>.jsonl``) and holds an
exclusive ``flock`` on it while it lives; a file whose lock nobody holds belongs to a
process that ended, and the next writer adopts it. How far a file has been written to
the store is kept beside it (``.offset``) after every batch, so a crash while replaying
repeats at most one batch: usage records are stored once per request id anyway; an
audit event in that batch would be chained twice. A file starts with a line naming the
fields; each record is a JSON array of their values (half the cost of an object per
record, measured), read back by name, so a file written by another version still reads.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from operator import attrgetter
from pathlib import Path
from typing import Any, Generic, TypeVar

log = logging.getLogger("extauthz.records")
T = TypeVar("T")


class Spill(Generic[T]):
    def __init__(
        self,
        directory: Path,
        name: str,
        fields: tuple[str, ...],
        build: Callable[..., T],
        owner: str = "",
    ) -> None:
        self.directory = directory
        self.name = name
        self.fields = fields
        self.build = build  # the record's class: build(*values) or build(**by_name)
        self._values = attrgetter(*fields) if len(fields) > 1 else _one(fields[0])
        self._encode = json.JSONEncoder(separators=(",", ":")).encode
        self._header = json.dumps({"fields": list(fields)}) + "\n"
        # One file per process (``owner``: its pid unless a test names another).
        self.path = directory / f"{name}-{owner or os.getpid()}.jsonl"
        self._file: Any = None  # ours, opened (and locked) on the first add
        self._empty = True  # ours holds nothing yet: the next add writes the header first
        self._lock = threading.Lock()
        self.pending = 0  # records added and not yet written, in files we hold

    def add(self, items: Sequence[T]) -> None:
        """Append ``items``; raises OSError when the disk refuses (full, read-only)."""
        values, encode = self._values, self._encode
        lines = "".join(encode(values(i)) + "\n" for i in items)
        with self._lock:
            if self._file is None:
                self.directory.mkdir(parents=True, exist_ok=True)
                self._file = self.path.open("a", encoding="utf-8")
                fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if self._empty:
                # Tracked, not asked of the file: a text file's tell() flushes its buffer.
                self._file.write(self._header)
                self._empty = False
            # Left in the file object's buffer (written by the next replay, close, or
            # when it fills): a syscall per record cost more than the encoding.
            self._file.write(lines)
            self.pending += len(items)

    def replay(self, write: Callable[[Sequence[T]], object], batch: int) -> int:
        """Write what waits here to the store, in batches: this process's own file, then
        any left by a process that ended. Stops at the first store error (raised),
        keeping the rest. Returns how many were written."""
        written = self._replay_file(self.path, write, batch) if self.pending else 0
        for path in self._others():
            try:
                with path.open("r+", encoding="utf-8") as held:
                    # Held while we replay it, so two starting processes never both do.
                    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    if os.fstat(held.fileno()).st_ino != path.stat().st_ino:
                        continue  # written and removed by another process meanwhile
                    written += self._replay_file(path, write, batch)
            except (BlockingIOError, FileNotFoundError):
                continue  # its process lives, or another one adopted it
        return written

    def _others(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return [p for p in sorted(self.directory.glob(f"{self.name}-*.jsonl")) if p != self.path]

    def _replay_file(self, path: Path, write: Callable[[Sequence[T]], object], batch: int) -> int:
        if path == self.path:
            with self._lock:
                if self._file is not None:
                    self._file.flush()
        mark = path.with_suffix(".offset")
        offset = int(mark.read_text() or 0) if mark.exists() else 0
        written = 0
        with path.open("r", encoding="utf-8") as source:
            build = self._reader(source.readline())
            offset = max(offset, source.tell())
            source.seek(offset)
            while True:
                chunk, lines = self._read(source, batch, build)
                if not lines:
                    break
                if chunk:
                    write(chunk)
                written += len(chunk)
                offset = source.tell()
                mark.write_text(str(offset))
                if path == self.path:
                    with self._lock:
                        self.pending = max(0, self.pending - lines)
        with self._lock:
            if path == self.path and self._file is not None:
                self._file.flush()  # appends made meanwhile, so the size below counts them
            # Appends made meanwhile are past the offset: only a fully written file goes.
            if path.stat().st_size == offset:
                if path != self.path:
                    path.unlink(missing_ok=True)
                elif self._file is not None:
                    self._file.truncate(0)
                    self._empty = True
                mark.unlink(missing_ok=True)
        if written and path != self.path:
            log.info("%s: wrote %d records an ended process kept in %s", self.name, written, path)
        return written

    def _reader(self, header: str) -> Callable[[list[Any]], T]:
        """How to build a record from a line of values, per the file's header."""
        try:
            fields = tuple(json.loads(header)["fields"]) if header else self.fields
        except (ValueError, TypeError, KeyError):
            fields = self.fields
        if fields == self.fields:
            return lambda values: self.build(*values)
        return lambda values: self.build(**dict(zip(fields, values, strict=True)))

    def _read(
        self, source: Any, batch: int, build: Callable[[list[Any]], T]
    ) -> tuple[list[T], int]:
        """Up to ``batch`` records; a line cut short by a crash is skipped (logged)."""
        chunk: list[T] = []
        lines = 0
        for _ in range(batch):
            line = source.readline()
            if not line:
                break
            lines += 1
            try:
                chunk.append(build(json.loads(line)))
            except (ValueError, TypeError):
                log.error("%s: an unreadable line in %s was skipped", self.name, source.name)
        return chunk, lines

    def waiting(self) -> bool:
        """Whether anything (ours, or an ended process's) may wait to be written."""
        return self.pending > 0 or bool(self._others())

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.flush()
                os.fsync(self._file.fileno())
                empty = os.fstat(self._file.fileno()).st_size == 0
                self._file.close()
                self._file = None
                if empty:
                    self.path.unlink(missing_ok=True)


def _one(field: str) -> Callable[[Any], tuple[Any, ...]]:
    """attrgetter of one field gives the value itself; a record is always an array."""
    return lambda item: (getattr(item, field),)
