"""A store shared by several processes (replicas, or the CLI next to a server): two
store objects on one database behave as one store. Runs on SQLite (one file, two
connections) and PostgreSQL (one schema, two pools)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from extauthz.audit import AuditLogger
from extauthz.auditchain import AuditChain
from extauthz.model import APIKey, AuditEvent, Tenant, TenantTier, UsageRecord
from extauthz.store import Store, open_store
from extauthz.testing import ManualClock
from tests.services import pg_schema


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def pair(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Store, Store]]:
    with ExitStack() as stack:
        if request.param == "postgres":
            url = stack.enter_context(pg_schema())
        else:
            url = f"sqlite:///{tmp_path}/shared.db"
        stores = []
        for _ in range(2):
            s = open_store(url)
            stack.callback(s.close)
            s.audit_chain = AuditChain(b"c" * 32)
            stores.append(s)
        yield stores[0], stores[1]


def test_replicas_appending_at_once_make_one_gap_free_chain(pair: tuple[Store, Store]) -> None:
    """4 writers on each of two store objects, 25 batches of 4 events each: 800 rows
    numbered 1..800 without a gap or a repeat, and the whole chain verifies."""
    errors: list[BaseException] = []

    def write(store: Store, name: str) -> None:
        try:
            for i in range(25):
                store.append_audit([AuditEvent(name, "success", float(i)) for _ in range(4)])
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [
        threading.Thread(target=write, args=(store, f"W{n}")) for n in range(4) for store in pair
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [e.seq for e in pair[1].audit_rows()] == list(range(1, 801))
    result = AuditLogger(pair[0], ManualClock()).verify()
    assert result.ok, result.problem
    assert result.checked == 800


def test_a_request_id_reported_to_two_replicas_is_billed_once(pair: tuple[Store, Store]) -> None:
    """The same usage record written through both stores is one row."""
    record = UsageRecord("req-1", 1.0, "2026-11-27", "t1", "k1", tokens_in=5)
    assert pair[0].add_usage([record]) == 1
    assert pair[1].add_usage([record]) == 0
    assert [r.request_id for r in pair[0].query_usage()] == ["req-1"]


def test_a_change_through_one_store_is_seen_by_the_other(pair: tuple[Store, Store]) -> None:
    """Revision (what every server polls) moves for the other store object too."""
    before = pair[1].revision()
    pair[0].create_tenant(Tenant(name="acme", tier=TenantTier.FREE, id="t1"))
    assert pair[1].revision() > before
    assert pair[1].get_tenant("t1") is not None


@pytest.mark.postgres
def test_postgres_pushes_changes_to_subscribers_within_milliseconds() -> None:
    """LISTEN/NOTIFY: a revocation committed through one store calls the other's
    subscriber well inside the 2 s bound, without waiting for a poll."""
    with pg_schema() as url:
        writer, reader = open_store(url), open_store(url)
        try:
            writer.create_tenant(Tenant(name="acme", tier=TenantTier.FREE, id="t1"))
            writer.insert_key(APIKey(key_id="k1", tenant_id="t1", name="n", key_hash=b"h"))
            heard = threading.Event()
            stop = reader.subscribe(heard.set)
            assert stop is not None
            try:
                assert heard.wait(5.0)  # the first call: catching up after LISTEN
                heard.clear()
                started = time.monotonic()
                writer.revoke_key("k1", 10.0)
                assert heard.wait(2.0)
                assert time.monotonic() - started < 2.0
            finally:
                stop()
        finally:
            writer.close()
            reader.close()


def test_sqlite_has_no_push_and_callers_poll(tmp_path: Path) -> None:
    """subscribe() returns None where the backend cannot push."""
    store = open_store(f"sqlite:///{tmp_path}/x.db")
    try:
        assert store.subscribe(lambda: None) is None
    finally:
        store.close()


@pytest.mark.postgres
def test_one_replica_leads_a_role_and_another_takes_over_when_it_goes() -> None:
    """try_lead: one of two stores on the database leads (webhooks are sent once, not
    once per replica); when the leader closes, the other takes over."""
    with pg_schema() as url:
        first, second = open_store(url), open_store(url)
        try:
            assert first.try_lead("webhooks")
            assert first.try_lead("webhooks")  # still ours
            assert not second.try_lead("webhooks")
            assert second.try_lead("retention")  # roles are independent
            first.close()
            assert second.try_lead("webhooks")
        finally:
            second.close()


def test_an_unreachable_database_is_a_clear_error_without_the_password() -> None:
    """Nothing listens on port 1: StoreError says why, and the password is masked."""
    from extauthz.errors import StoreError
    from extauthz.store.postgres import PostgresStore

    with pytest.raises(StoreError) as err:
        PostgresStore("postgresql://u:hunter2@127.0.0.1:1/db", open_timeout=0.5)
    assert "Connection refused" in str(err.value)
    assert "hunter2" not in str(err.value)
    assert "u:***@127.0.0.1:1" in str(err.value)
