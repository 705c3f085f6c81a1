"""Usage records and the audit chain, on every store backend."""

from __future__ import annotations

import dataclasses

from extauthz.audit import AuditLogger
from extauthz.model import AuditEvent, Tenant, TenantTier, UsageRecord
from extauthz.store import Store
from extauthz.testing import ManualClock


def usage(rid: str, **fields: object) -> UsageRecord:
    base = UsageRecord(rid, 100.0, "2027-01-15", "t1", "k1", "/v1", "GET", 200, 5.0)
    return dataclasses.replace(base, **fields)  # type: ignore[arg-type]


def test_a_request_id_is_billed_once(store: Store) -> None:
    """A duplicated record (a repeated access-log entry) is dropped: one row, first
    values kept."""
    assert store.add_usage([usage("r1", tokens_in=10)]) == 1
    assert store.add_usage([usage("r1", tokens_in=99), usage("r1", tokens_in=77)]) == 0
    assert [(r.request_id, r.tokens_in) for r in store.query_usage()] == [("r1", 10)]


def test_a_complete_record_replaces_an_incomplete_one_once(store: Store) -> None:
    """The late access-log entry completes an `incomplete` record; nothing else can
    overwrite a complete one."""
    store.add_usage([usage("r2", incomplete=True, status=0, tokens_in=500)])
    assert store.add_usage([usage("r2", tokens_in=120, tokens_out=30)]) == 1
    assert store.add_usage([usage("r2", tokens_in=1)]) == 0
    (record,) = store.query_usage()
    assert (record.incomplete, record.tokens_in, record.tokens_out) == (False, 120, 30)


def test_usage_queries_filter_by_tenant_and_time(store: Store) -> None:
    store.add_usage([usage("a", ts=10.0), usage("b", ts=20.0, tenant_id="t2"), usage("c", ts=30.0)])
    assert [r.request_id for r in store.query_usage(tenant_id="t1")] == ["a", "c"]
    assert [r.request_id for r in store.query_usage(since=15.0, until=30.0)] == ["b"]
    assert store.prune_usage(25.0) == 2
    assert [r.request_id for r in store.query_usage()] == ["c"]


def test_audit_rows_are_numbered_without_gaps_and_chain(store: Store) -> None:
    """Batches and single appends share one gap-free sequence; the chain verifies."""
    rows = store.append_audit([AuditEvent("A", "success", 1.0), AuditEvent("B", "denied", 2.0)])
    assert [r.seq for r in rows] == [1, 2]
    assert all(len(r.hash) == 64 for r in rows)
    store.append_audit([AuditEvent("C", "success", 3.0)])
    assert [e.seq for e in store.audit_rows()] == [1, 2, 3]
    assert AuditLogger(store, ManualClock()).verify().ok


def test_admin_events_ride_along_with_the_change(store: Store) -> None:
    """The event handed to a mutating call is in the log when the call returns."""
    event = AuditEvent("DATA_MODIFIED", "success", 1.0, tenant_id="t9", reason="tenant.create")
    store.create_tenant(Tenant("n", TenantTier.FREE, id="t9"), [event])
    (row,) = store.query_audit(tenant_id="t9")
    assert (row.action, row.seq) == ("DATA_MODIFIED", 1)


def test_audit_queries_filter_and_order(store: Store) -> None:
    store.append_audit(
        [
            AuditEvent("KEY_REVOKED", "success", 1.0, tenant_id="t1", key_id="k1"),
            AuditEvent("AUTH_FAILURE", "denied", 2.0, source="198.51.100.7"),
            AuditEvent("KEY_CREATED", "success", 3.0, tenant_id="t1", key_id="k2"),
        ]
    )
    assert [e.seq for e in store.query_audit(tenant_id="t1")] == [1, 3]
    assert [e.seq for e in store.query_audit(key_id="k1", action="KEY_REVOKED")] == [1]
    assert [e.seq for e in store.query_audit(since=2.0, until=3.0)] == [2]
    assert [e.seq for e in store.query_audit(limit=2, newest_first=True)] == [3, 2]
    assert [e.seq for e in store.query_audit(after_seq=2)] == [3]
