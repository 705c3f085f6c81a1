"""The sidecar's access-log handling, without servers: a finished request is billed
once, whatever Envoy repeats."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from extauthz.app import Runtime
from extauthz.errors import StoreError
from extauthz.model import CheckInput, Completion, TenantTier
from extauthz.settings import Settings
from extauthz.sidecar import Sidecar

AUDIT_ALL = "audit:\n  allowed: all\n"


def open_runtime(tmp_path: Path, policy: str = "", **settings: object) -> Runtime:
    """A runtime on ``tmp_path`` with ``policy`` as its policy file."""
    path = tmp_path / "policy.yaml"
    path.write_text(policy)
    return Runtime.open(Settings(data_dir=tmp_path, policy_file=path, **settings))  # type: ignore[arg-type]


def test_duplicate_access_log_entries_bill_once(tmp_path: Path) -> None:
    """The same entry three times: one usage record, one API_REQUEST event."""
    rt = open_runtime(tmp_path, AUDIT_ALL)
    rt.tenants.create_tenant("t", TenantTier.STARTER, "t")
    key = rt.keys.create_key("t")[1]
    sidecar = Sidecar(rt)
    allowed = sidecar.authorizer.check(
        CheckInput("POST", "/v1/chat?x=1", {"x-api-key": key}, request_id="rid-1")
    )
    assert allowed.allowed
    done = Completion("rid-1", 200, 12.5, 300, 900, 100, 50)
    for _ in range(3):
        sidecar._finished([done])
    rt.flush()
    (record,) = rt.store.query_usage()
    assert (record.request_id, record.route, record.method) == ("rid-1", "/v1/chat", "POST")
    assert (record.tokens_in, record.tokens_out, record.latency_ms) == (100, 50, 12.5)
    assert record.cost == 150 * 0.002 / 1000
    assert len(rt.store.query_audit(action="API_REQUEST")) == 1
    rt.close()


@pytest.mark.parametrize("allowed", ["none", "all"])
def test_an_allowed_request_leaves_its_usage_record_and_at_most_one_audit_event(
    tmp_path: Path, allowed: str
) -> None:
    """By default (audit.allowed: none) an allowed request leaves only its usage record;
    with `all`, one API_REQUEST event too, written when it finishes and carrying the
    check's outcome, its status, latency and tokens: never an AUTH_SUCCESS as well."""
    rt = open_runtime(tmp_path, f"audit:\n  allowed: {allowed}\n")
    rt.tenants.create_tenant("t", TenantTier.STARTER, "t")
    key, key_id = rt.keys.create_key("t")[1], rt.keys.list_keys("t")[0].key_id
    sidecar = Sidecar(rt)
    check = CheckInput("POST", "/v1/chat", {"x-api-key": key}, request_id="rid-9")
    assert sidecar.authorizer.check(check).allowed
    sidecar._finished([Completion("rid-9", 201, 7.5, 10, 20, 30, 40)])
    rt.flush()
    assert len(rt.store.query_usage()) == 1
    admin = ("DATA_MODIFIED", "KEY_CREATED")
    events = [e for e in rt.store.query_audit() if e.action not in admin]
    if allowed == "none":
        assert events == []
    else:
        (event,) = events
        assert (event.action, event.outcome, event.key_id, event.request_id) == (
            "API_REQUEST",
            "success",
            key_id,
            "rid-9",
        )
        assert json.loads(event.detail) == {
            "route": "/v1/chat",
            "method": "POST",
            "status": 201,
            "check": "allowed",
            "latency_ms": 7.5,
            "tokens": 70,
        }
    rt.close()


def test_a_lease_that_expires_is_billed_incomplete(tmp_path: Path) -> None:
    """No access-log entry: when the server stops, the request is recorded from its
    check, flagged incomplete, with its declared tokens."""
    rt = Runtime.open(Settings(data_dir=tmp_path))
    rt.tenants.create_tenant("t", TenantTier.STARTER, "t")
    key = rt.keys.create_key("t")[1]
    sidecar = Sidecar(rt)
    sidecar.authorizer.check(
        CheckInput("GET", "/v1", {"x-api-key": key, "x-max-tokens": "800"}, request_id="r2")
    )
    sidecar.stop()
    (record,) = rt.store.query_usage()
    assert (record.request_id, record.incomplete, record.tokens_in, record.status) == (
        "r2",
        True,
        800,
        0,
    )
    rt.close()


def test_audit_events_carry_the_w3c_trace_id(tmp_path: Path) -> None:
    """A request with a traceparent header is audited with its trace id; a malformed
    header gives none."""
    rt = Runtime.open(Settings(data_dir=tmp_path))
    authorizer = Sidecar(rt).authorizer
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    key = "nk_" + "x" * 40  # refused: its AUTH_FAILURE event carries the trace id
    for header in (f"00-{trace}-00f067aa0ba902b7-01", "00-nonsense"):
        authorizer.check(CheckInput("GET", "/v1", {"x-api-key": key, "traceparent": header}))
    rt.flush()
    events = rt.store.query_audit(action="AUTH_FAILURE")
    assert [e.trace_id for e in events] == [trace, ""]
    rt.close()


def test_blocking_audit_refuses_a_request_it_cannot_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """audit_blocking ("no audit, no allow") with audit.allowed: all: the request's one
    event is in the store before the answer (no flush needed), and none is added when it
    finishes; if it cannot be written the request gets 503 audit_unavailable."""
    rt = open_runtime(tmp_path, AUDIT_ALL, audit_blocking=True)
    rt.tenants.create_tenant("t", TenantTier.STARTER, "t")
    key = rt.keys.create_key("t")[1]
    sidecar = Sidecar(rt)
    authorizer = sidecar.authorizer
    check = CheckInput("GET", "/v1", {"x-api-key": key}, request_id="b1")
    assert authorizer.check(check).allowed
    assert len(rt.store.query_audit(action="AUTH_SUCCESS")) == 1
    sidecar._finished([Completion("b1", 200, 1.0, 0, 0, None, None)])
    rt.flush()
    assert rt.store.query_audit(action="API_REQUEST") == []

    def broken(events: object) -> None:
        raise StoreError("disk full")

    monkeypatch.setattr(rt.store, "append_audit", broken)
    refused = authorizer.check(CheckInput("GET", "/v1", {"x-api-key": key}))
    assert (refused.status, refused.reason) == (503, "audit_unavailable")
    monkeypatch.undo()
    rt.close()


def test_200000_open_leases_at_stop_are_each_billed_once_and_nothing_is_dropped(
    tmp_path: Path,
) -> None:
    """BAD_INPUTS #28: 200,000 allowed checks that no access log ever reports, then the
    stop: each request gets exactly one incomplete usage record and (audit.allowed: all)
    one API_REQUEST event, outcome incomplete, although the queues hold 50,000 each."""
    rt = open_runtime(
        tmp_path,
        "tenants:\n  t:\n    requests_per_day: 10000000\n    concurrent: 10000000\n"
        "    rate_limit: {requests_per_minute: 100000000, burst: 10000000}\n" + AUDIT_ALL,
        metrics_addr="off",
    )
    rt.tenants.create_tenant("t", TenantTier.STARTER, "t")
    key = rt.keys.create_key("t")[1]
    sidecar = Sidecar(rt)
    check = sidecar.authorizer.check
    headers = {"x-api-key": key}
    for i in range(200_000):
        assert check(CheckInput("GET", "/v1", headers, request_id=f"r{i}")).allowed
    assert rt.counters.leases_held() == 200_000
    sidecar.stop()
    assert (rt.usage.writer.dropped, rt.audit.writer.dropped) == (0, 0)
    with sqlite3.connect(tmp_path / "extauthz.db") as db:
        billed = db.execute(
            "SELECT COUNT(*), COUNT(DISTINCT request_id), SUM(incomplete) FROM usage_records"
        ).fetchone()
        audited = db.execute(
            "SELECT COUNT(*) FROM audit_events WHERE action = 'API_REQUEST'"
            " AND outcome = 'incomplete'"
        ).fetchone()
    assert billed == (200_000, 200_000, 200_000)
    assert audited == (200_000,)
    assert rt.audit.verify().ok
    rt.close()


def test_records_the_store_refuses_at_stop_are_written_by_the_next_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database refuses writes while the server stops: the usage records of the
    open requests stay on disk (data_dir/spill) and the next server on the same data
    directory writes them, once."""
    rt = Runtime.open(Settings(data_dir=tmp_path, metrics_addr="off"))
    rt.tenants.create_tenant("t", TenantTier.STARTER, "t")
    key = rt.keys.create_key("t")[1]
    sidecar = Sidecar(rt)
    for i in range(5):
        sidecar.authorizer.check(CheckInput("GET", "/v1", {"x-api-key": key}, request_id=f"r{i}"))

    def down(records: object) -> None:
        raise StoreError("database is down")

    monkeypatch.setattr(rt.usage.writer, "write", down)
    sidecar.stop()
    monkeypatch.undo()
    assert rt.store.query_usage() == []
    assert list((tmp_path / "spill").glob("usage-*.jsonl"))
    rt.close()
    again = Runtime.open(Settings(data_dir=tmp_path, metrics_addr="off"))
    again.usage.start()
    again.usage.close()
    assert sorted(r.request_id for r in again.store.query_usage()) == [f"r{i}" for i in range(5)]
    again.close()
