"""Audit and usage writers never lose a record while the disk takes writes: a full
queue spills to a local file, a stop the store refuses leaves the rest there for the
next start, and records the product makes itself go straight to the store."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from extauthz.errors import StoreError
from extauthz.records import BatchWriter
from extauthz.spill import Spill


@dataclass(slots=True)
class Row:
    n: int


class FlakyStore:
    """Takes batches of rows; refuses them while ``down``; remembers each one written."""

    def __init__(self) -> None:
        self.down = False
        self.rows: list[int] = []
        self.batches = 0

    def write(self, items: Sequence[Row]) -> None:
        if self.down:
            raise StoreError("database is down")
        self.rows.extend(r.n for r in items)
        self.batches += 1


def rows(numbers: range | list[int]) -> list[Row]:
    return [Row(n) for n in numbers]


def spill(tmp_path: Path, owner: str = "") -> Spill[Row]:
    return Spill(tmp_path / "spill", "usage", ("n",), Row, owner)


def writer(
    store: FlakyStore, tmp_path: Path, capacity: int = 100, owner: str = ""
) -> BatchWriter[Row]:
    return BatchWriter(
        "usage", store.write, capacity=capacity, batch=50, spill=spill(tmp_path, owner)
    )


def test_a_full_queue_spills_to_disk_and_the_store_gets_every_record_once(tmp_path: Path) -> None:
    """The store down while 1,000 records arrive for a queue of 100: none dropped, 900
    kept on disk; when the store is back each of the 1,000 is written exactly once."""
    store = FlakyStore()
    w = writer(store, tmp_path)
    store.down = True
    assert all(w.put(r) for r in rows(range(1000)))
    with pytest.raises(StoreError):
        w.flush()
    assert (w.dropped, w.spilled, w.pending) == (0, 900, 1000)
    store.down = False
    assert w.flush() == 1000
    assert sorted(store.rows) == list(range(1000))
    assert w.pending == 0
    w.close()
    assert list((tmp_path / "spill").glob("*.jsonl")) == []


def test_what_a_stop_cannot_write_is_written_by_the_next_start(tmp_path: Path) -> None:
    """close() with the store down keeps the queue on disk; the next process on the
    same data directory writes it (once) when it starts, and removes the file."""
    store = FlakyStore()
    first = writer(store, tmp_path, owner="1")
    for r in rows(range(300)):
        first.put(r)
    store.down = True
    first.close()  # no error: the records are on disk
    assert store.rows == []
    store.down = False
    second = writer(store, tmp_path, owner="2")
    second.start()
    second.close()
    assert sorted(store.rows) == list(range(300))
    assert list((tmp_path / "spill").glob("usage-*")) == []


def test_write_now_goes_straight_to_the_store_in_batches(tmp_path: Path) -> None:
    """Self-made records (expired or ended leases): 10,000 at once with a queue of 100
    are all written, in batches, never dropped; what the store refuses is spilled."""
    store = FlakyStore()
    w = writer(store, tmp_path)
    w.write_now(rows(range(10_000)))
    assert len(store.rows) == 10_000
    assert store.batches == 200
    store.down = True
    w.write_now(rows(range(10_000, 10_500)))
    assert (w.dropped, w.spilled) == (0, 500)
    store.down = False
    w.flush()
    w.close()
    assert sorted(store.rows) == list(range(10_500))


def test_a_live_process_spill_is_left_alone_and_an_ended_ones_adopted_once(
    tmp_path: Path,
) -> None:
    """A spill file whose process still holds its lock is not touched by another
    writer; once released, exactly one writer adopts it."""
    store = FlakyStore()
    live = spill(tmp_path, owner="live")
    live.add(rows([1, 2, 3]))  # takes and holds its lock
    other = writer(store, tmp_path, owner="other")
    other.flush()
    other.close()
    assert store.rows == []
    live.close()  # the process "ends": the lock goes with the file handle
    adopted: list[int] = []

    def adopt() -> None:
        w = writer(store, tmp_path, owner=f"a{threading.get_ident()}")
        adopted.append(w.flush())
        w.close()

    threads = [threading.Thread(target=adopt) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(store.rows) == [1, 2, 3]
    assert sum(adopted) == 3


def test_a_replay_interrupted_by_the_store_resumes_where_it_stopped(tmp_path: Path) -> None:
    """The store failing mid-replay: batches already written are not written again."""
    store = FlakyStore()
    kept = spill(tmp_path, owner="old")
    kept.add(rows(range(200)))
    kept.close()
    calls = 0

    def fails_third_batch(items: Sequence[Row]) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise StoreError("gone")
        store.write(items)

    w = BatchWriter("usage", fails_third_batch, batch=50, spill=spill(tmp_path, owner="new"))
    with pytest.raises(StoreError):
        w.flush()
    w.flush()
    w.close()
    assert sorted(store.rows) == list(range(200))


def test_with_no_disk_either_a_record_is_dropped_counted_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The last resort: the spill directory cannot be written; the record is counted in
    `dropped` and an error is logged, never silently lost."""
    blocker = tmp_path / "spill"
    blocker.write_text("a file where the directory should be")
    store = FlakyStore()
    w = writer(store, tmp_path, capacity=1)
    assert w.put(Row(1))
    assert not w.put(Row(2))
    assert w.dropped == 1
    assert "nowhere to keep them: 1 dropped so far" in caplog.text
    w.close()
    assert store.rows == [1]


@dataclass(slots=True)
class Pair:
    a: int
    b: str


def test_a_spill_file_is_read_by_field_name_whatever_version_wrote_it(tmp_path: Path) -> None:
    """A file whose header names the fields in another order (another version wrote
    it) is read back by name; a line cut short by a crash is skipped, the rest read."""
    directory = tmp_path / "spill"
    directory.mkdir()
    (directory / "usage-old.jsonl").write_text(
        '{"fields": ["b", "a"]}\n["x", 1]\n["y", 2]\n["z", \n'
    )
    got: list[Pair] = []
    reader = Spill(directory, "usage", ("a", "b"), Pair, "new")
    assert reader.replay(got.extend, 10) == 2
    assert got == [Pair(1, "x"), Pair(2, "y")]
    assert not (directory / "usage-old.jsonl").exists()


def test_spilling_after_a_replay_keeps_every_record(tmp_path: Path) -> None:
    """Spill, replay (the file is emptied), spill again, with an append between the
    replay's last batch and its end: a second replay still reads every record."""
    store = FlakyStore()
    kept = spill(tmp_path, owner="own")
    kept.add(rows(range(5)))

    def write_and_append(items: Sequence[Row]) -> None:
        store.write(items)
        if len(store.rows) == 5:
            kept.add(rows([5]))  # arrives while the replay runs, still in the buffer

    assert kept.replay(write_and_append, 100) == 5
    kept.add(rows(range(6, 9)))
    assert kept.replay(store.write, 100) == 4
    kept.close()
    assert sorted(store.rows) == list(range(9))
