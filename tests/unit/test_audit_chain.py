"""The audit chain on a real SQLite file: every kind of tampering is found and
pinpointed; retention keeps verification green; admin changes and their events commit
together."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from extauthz.app import Runtime
from extauthz.audit import AuditLogger
from extauthz.auditchain import AuditChain, audit_key
from extauthz.errors import ConflictError
from extauthz.model import TenantTier
from extauthz.settings import Settings
from extauthz.store import open_store
from extauthz.store.sqlite import SQLiteStore
from extauthz.testing import ManualClock


@pytest.fixture
def logged(tmp_path: Path) -> tuple[AuditLogger, Path]:
    """A log of 10 events in a SQLite file."""
    path = tmp_path / "a.db"
    store = open_store(f"sqlite:///{path}")
    store.audit_chain = AuditChain(audit_key(b"k" * 32))
    clock = ManualClock()
    audit = AuditLogger(store, clock)
    for i in range(10):
        audit.event("DATA_ACCESSED", "success", actor="admin", reason=f"read {i}")
        clock.advance(1)
    audit.flush()
    return audit, path


def sql(path: Path, statement: str) -> None:
    db = sqlite3.connect(path)
    db.executescript(statement)
    db.commit()
    db.close()


def test_an_intact_log_verifies_whole_and_by_range(logged: tuple[AuditLogger, Path]) -> None:
    audit, _ = logged
    assert audit.verify().ok
    assert audit.verify().checked == 10
    assert audit.verify(3, 7).checked == 5


@pytest.mark.parametrize(
    ("tamper", "bad_row", "says"),
    [
        ("UPDATE audit_events SET reason = 'nothing to see' WHERE seq = 4", 4, "edited"),
        ("UPDATE audit_events SET ts = ts + 1 WHERE seq = 6", 6, "edited"),
        ("DELETE FROM audit_events WHERE seq = 5", 5, "missing"),
        (
            "UPDATE audit_events SET seq = -1 WHERE seq = 3; "
            "UPDATE audit_events SET seq = 3 WHERE seq = 7; "
            "UPDATE audit_events SET seq = 7 WHERE seq = -1;",
            3,
            "edited or moved",
        ),
        ("DELETE FROM audit_events WHERE seq > 8", 9, "truncated"),
        ("DELETE FROM audit_events", 1, "truncated"),
    ],
    ids=["edit-text", "edit-time", "delete", "reorder", "truncate-tail", "wipe"],
)
def test_tampering_is_found_at_the_first_bad_row(
    logged: tuple[AuditLogger, Path], tamper: str, bad_row: int, says: str
) -> None:
    """Edit, delete, reorder, truncate: `verify` names the first row that is wrong."""
    audit, path = logged
    sql(path, tamper)
    result = audit.verify()
    assert not result.ok
    assert result.problem is not None
    assert result.problem.seq == bad_row
    assert says in result.problem.message


def test_a_truncation_stays_visible_after_new_appends(logged: tuple[AuditLogger, Path]) -> None:
    """New rows chain on the signed head, not on the surviving last row: the cut rows
    remain a gap."""
    audit, path = logged
    sql(path, "DELETE FROM audit_events WHERE seq > 8")
    audit.event("DATA_ACCESSED", "success")
    audit.flush()
    result = audit.verify()
    assert result.problem is not None
    assert result.problem.seq == 9
    assert "missing" in result.problem.message


def test_a_forged_head_is_refused(logged: tuple[AuditLogger, Path]) -> None:
    """Moving the head back to hide a truncation needs the key: a head edited in the
    database fails its signature."""
    audit, path = logged
    sql(path, "DELETE FROM audit_events WHERE seq > 8")
    sql(path, "UPDATE audit_anchors SET seq = 8 WHERE kind = 'head'")
    result = audit.verify()
    assert result.problem is not None
    assert "signature" in result.problem.message


def test_a_different_key_cannot_verify(logged: tuple[AuditLogger, Path]) -> None:
    """Rows re-hashed by someone without the key do not verify under it (and the key is
    derived from the pepper, which the database does not hold)."""
    audit, _ = logged
    audit.store.audit_chain = AuditChain(audit_key(b"x" * 32))
    assert not audit.verify().ok


def test_retention_prunes_a_prefix_and_verify_stays_green(logged: tuple[AuditLogger, Path]) -> None:
    """Pruning the 4 oldest rows leaves a signed checkpoint; the whole-log check starts
    there and passes; forging the checkpoint fails."""
    audit, path = logged
    first_ts = audit.store.query_audit(limit=1)[0].ts
    assert audit.store.prune_audit(first_ts + 4) == 4
    result = audit.verify()
    assert result.ok
    assert result.checked == 6
    audit.event("DATA_MODIFIED", "success", reason="retention.apply")
    audit.flush()
    assert audit.verify().ok
    sql(path, "UPDATE audit_anchors SET seq = 3 WHERE kind = 'checkpoint'")
    assert not audit.verify().ok


def test_admin_change_and_its_event_commit_together(tmp_path: Path) -> None:
    """A refused change (a duplicate tenant name) writes no audit row either; a
    successful one writes exactly one, chained."""
    rt = Runtime.open(Settings(data_dir=tmp_path))
    rt.tenants.create_tenant("acme", TenantTier.FREE)
    with pytest.raises(ConflictError):
        rt.tenants.create_tenant("acme", TenantTier.FREE)
    events = rt.store.query_audit(action="DATA_MODIFIED")
    assert [e.reason for e in events] == ["tenant.create"]
    assert events[0].actor.startswith("admin")
    assert rt.audit.verify().ok
    rt.close()


def test_the_seed_audit_api(tmp_path: Path) -> None:
    """log_auth, log_quota_exceeded, log_api_request, get_recent_events (newest first),
    get_events (by tenant, time range and action)."""
    store = SQLiteStore(tmp_path / "s.db")
    store.audit_chain = AuditChain(b"s" * 32)
    clock = ManualClock()
    audit = AuditLogger(store, clock)
    audit.log_auth(False, ip_address="203.0.113.9", reason="unknown_key")
    clock.advance(10)
    audit.log_auth(True, tenant_id="t1", key_id="key_1")
    audit.log_quota_exceeded(tenant_id="t1", quota_type="daily_requests")
    audit.log_api_request(tenant_id="t1", endpoint="/v1/chat", method="POST", status_code=200)
    recent = audit.get_recent_events(limit=2)
    assert [e.action for e in recent] == ["API_REQUEST", "QUOTA_EXCEEDED"]
    t1 = audit.get_events("t1", since=clock.now() - 1, until=clock.now() + 1)
    assert [e.action for e in t1] == ["AUTH_SUCCESS", "QUOTA_EXCEEDED", "API_REQUEST"]
    assert [e.source for e in audit.get_events(action="AUTH_FAILURE")] == ["203.0.113.9"]
    assert audit.verify().ok
    store.close()
