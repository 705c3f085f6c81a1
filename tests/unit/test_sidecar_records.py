"""The sidecar's access-log handling, without servers: a finished request is billed
once, whatever Envoy repeats."""

from __future__ import annotations

from pathlib import Path

import pytest

from extauthz.app import Runtime
from extauthz.errors import StoreError
from extauthz.model import CheckInput, Completion, TenantTier
from extauthz.settings import Settings
from extauthz.sidecar import Sidecar


def test_duplicate_access_log_entries_bill_once(tmp_path: Path) -> None:
    """The same entry three times: one usage record, one API_REQUEST event."""
    rt = Runtime.open(Settings(data_dir=tmp_path))
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
    rt.tenants.create_tenant("t", TenantTier.STARTER, "t")
    key = rt.keys.create_key("t")[1]
    authorizer = Sidecar(rt).authorizer
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    for header in (f"00-{trace}-00f067aa0ba902b7-01", "00-nonsense"):
        authorizer.check(CheckInput("GET", "/v1", {"x-api-key": key, "traceparent": header}))
    rt.flush()
    events = rt.store.query_audit(action="AUTH_SUCCESS")
    assert [e.trace_id for e in events] == [trace, ""]
    rt.close()


def test_blocking_audit_refuses_a_request_it_cannot_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """audit_blocking ("no audit, no allow"): the event is in the store before the answer
    (no flush needed); if it cannot be written the request gets 503 audit_unavailable."""
    rt = Runtime.open(Settings(data_dir=tmp_path, audit_blocking=True))
    rt.tenants.create_tenant("t", TenantTier.STARTER, "t")
    key = rt.keys.create_key("t")[1]
    authorizer = Sidecar(rt).authorizer
    assert authorizer.check(CheckInput("GET", "/v1", {"x-api-key": key})).allowed
    assert len(rt.store.query_audit(action="AUTH_SUCCESS")) == 1

    def broken(events: object) -> None:
        raise StoreError("disk full")

    monkeypatch.setattr(rt.store, "append_audit", broken)
    refused = authorizer.check(CheckInput("GET", "/v1", {"x-api-key": key}))
    assert (refused.status, refused.reason) == (503, "audit_unavailable")
    monkeypatch.undo()
    rt.close()
