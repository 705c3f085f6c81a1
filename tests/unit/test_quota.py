"""Daily quotas: the day boundary in the policy's zone, persistence across a restart,
and the seed's quota API."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from extauthz.app import Runtime
from extauthz.errors import StoreError
from extauthz.limits.memory import MemoryCounters
from extauthz.limits.quota import QuotaCalendar, QuotaJournal, quota_window
from extauthz.model import TenantTier
from extauthz.settings import Settings
from extauthz.store import open_store
from extauthz.testing import ManualClock


def at(text: str, zone: str = "UTC") -> float:
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(zone)).timestamp()


def test_day_turns_at_midnight_utc_by_default() -> None:
    """23:59:59 counts on the 15th, 00:00:00 on the 16th; the window is exactly a day."""
    assert quota_window(at("2027-01-15T23:59:59"), "UTC")[0] == "2027-01-15"
    day, start, end = quota_window(at("2027-01-16T00:00:00"), "UTC")
    assert (day, end - start) == ("2027-01-16", 86_400)


def test_day_follows_the_policy_time_zone_and_dst() -> None:
    """In Europe/Berlin the day turns at local midnight (23:00 UTC in winter); the day
    of the spring DST change is 23 hours long."""
    assert quota_window(at("2027-01-15T23:30:00"), "Europe/Berlin")[0] == "2027-01-16"
    _, start, end = quota_window(at("2027-03-28T12:00:00", "Europe/Berlin"), "Europe/Berlin")
    assert end - start == 23 * 3600


def test_calendar_cache_moves_to_the_next_day_at_the_boundary() -> None:
    """The cached day is dropped the instant the day ends: no request counts on the
    wrong day, and Retry-After (time to reset) counts down to the boundary."""
    calendar = QuotaCalendar()
    midnight = at("2027-01-16T00:00:00")
    assert calendar.day(midnight - 1, "UTC") == ("2027-01-15", 1.0)
    assert calendar.day(midnight, "UTC") == ("2027-01-16", 86_400.0)
    assert calendar.day(midnight - 0.5, "UTC")[0] == "2027-01-15"  # a clock stepped back


def test_journal_keeps_the_days_count_across_a_restart(tmp_path: Path) -> None:
    """Counts flushed to SQLite are loaded by the next process: a restart does not give
    a tenant a fresh quota."""
    url = f"sqlite:///{tmp_path}/q.db"
    store = open_store(url)
    first = MemoryCounters(ManualClock())
    first.add_usage("t1", "2027-01-15", requests=7, tokens=70)
    QuotaJournal(store, first).flush()
    first.add_usage("t1", "2027-01-15", requests=1)  # flushed on the next interval...
    QuotaJournal(store, first).flush()
    store.close()

    store = open_store(url)
    second = MemoryCounters(ManualClock())
    assert QuotaJournal(store, second).load("2027-01-15") == 1
    assert second.usage("t1", "2027-01-15") == (8, 70)
    assert second.usage("t1", "2027-01-16") == (0, 0)
    store.close()


def test_journal_keeps_changes_it_could_not_write(tmp_path: Path) -> None:
    """A failed write loses nothing: the changes are written by the next flush."""

    class Failing:
        def __init__(self) -> None:
            self.fail = True
            self.written: list[object] = []

        def add_quota_counts(self, changes: object) -> None:
            if self.fail:
                raise StoreError("disk full")
            self.written.append(changes)

    counters = MemoryCounters(ManualClock())
    sink = Failing()
    journal = QuotaJournal(sink, counters)  # type: ignore[arg-type]
    counters.add_usage("t1", "d", requests=2)
    with pytest.raises(StoreError):
        journal.flush()
    counters.add_usage("t1", "d", requests=1)
    sink.fail = False
    assert journal.flush() == 1
    assert sink.written == [{("t1", "d"): (3, 0)}]


def test_seed_quota_api_on_the_runtime(tmp_path: Path) -> None:
    """quota.is_within_quota / record_usage(tokens=) / get_remaining_quota(), as the
    seed report shows them, on the real counters; the counts survive reopening."""
    settings = Settings(data_dir=tmp_path)
    rt = Runtime.open(settings)
    tenant = rt.tenants.create_tenant("Acme Corp", TenantTier.FREE)
    quota = rt.quota(tenant.id)
    assert quota.is_within_quota
    quota.record_usage(tokens=100)
    assert quota.get_remaining_quota() == 999
    for _ in range(999):
        quota.record_usage()
    assert not quota.is_within_quota
    assert quota.status()["tokens_today"] == 100
    rt.close()
    rt = Runtime.open(settings)
    assert rt.quota(tenant.id).get_remaining_quota() == 0
    rt.close()
