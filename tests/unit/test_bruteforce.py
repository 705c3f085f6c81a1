"""Brute-force detection in the decision core, on a hand-moved clock."""

from __future__ import annotations

import json

from extauthz.apikeys import APIKeyManager, KeyResolver
from extauthz.audit import AuditLogger
from extauthz.auditchain import AuditChain
from extauthz.authorizer import Authorizer
from extauthz.bruteforce import BruteForceGuard
from extauthz.keys import generate_key
from extauthz.model import CheckInput, TenantTier
from extauthz.policy import parse_policy
from extauthz.tenants import TenantManager
from extauthz.testing import CountingStore, ManualClock

POLICY = "security: {max_auth_failures: 5, window_seconds: 60, block_seconds: 300}\n"


def setup(
    store: CountingStore, clock: ManualClock, resolver: KeyResolver
) -> tuple[Authorizer, AuditLogger, str, str]:
    store.audit_chain = AuditChain(b"b" * 32)
    audit = AuditLogger(store, clock)
    authorizer = Authorizer(
        resolver, policy=parse_policy(POLICY), audit=audit, guard=BruteForceGuard(clock)
    )
    TenantManager(store, clock).create_tenant("t", TenantTier.FREE, tenant_id="t")
    key_id, key = APIKeyManager(store, resolver.pepper, clock).create_key("t")
    return authorizer, audit, key_id, key


def ask(authorizer: Authorizer, key: str, source: str) -> tuple[int, str, dict[str, str]]:
    d = authorizer.check(CheckInput("GET", "/x", {"x-api-key": key}, source_address=source))
    return d.status, d.reason, dict(d.client_headers)


def test_failures_from_one_source_alert_then_block_then_expire(
    store: CountingStore, clock: ManualClock, resolver: KeyResolver
) -> None:
    """5 bad keys within the window from one address: SECURITY_ALERT, and that address
    gets 429 source_blocked (Retry-After: the rest of the block) even with a good key;
    other addresses are unaffected; after 300 s it is let in again."""
    authorizer, audit, _, key = setup(store, clock, resolver)
    for _ in range(5):
        assert ask(authorizer, generate_key(), "203.0.113.5")[0] == 401
        clock.advance(1)
    status, reason, headers = ask(authorizer, key, "203.0.113.5")
    # Blocked from the 5th failure (t=4) for 300 s; it is now t=5.
    assert (status, reason, headers["retry-after"]) == (429, "source_blocked", "299")
    assert ask(authorizer, key, "198.51.100.1")[0] == 200
    clock.advance(298.5)
    assert ask(authorizer, key, "203.0.113.5")[1] == "source_blocked"
    clock.advance(1)
    assert ask(authorizer, key, "203.0.113.5")[0] == 200
    alerts = audit.get_events(action="SECURITY_ALERT")
    assert [(e.outcome, e.source, e.reason) for e in alerts] == [
        ("blocked", "203.0.113.5", "brute_force")
    ]
    assert json.loads(alerts[0].detail)["blocked_seconds"] == 300
    failures = audit.get_events(action="AUTH_FAILURE")
    assert [e.reason for e in failures].count("unknown_key") == 5
    assert [e.reason for e in failures].count("source_blocked") == 2  # blocked, audited


def test_failures_spread_beyond_the_window_do_not_alert(
    store: CountingStore, clock: ManualClock, resolver: KeyResolver
) -> None:
    """5 failures over more than 60 s are not a burst."""
    authorizer, audit, _, key = setup(store, clock, resolver)
    for _ in range(5):
        ask(authorizer, generate_key(), "203.0.113.6")
        clock.advance(20)
    assert ask(authorizer, key, "203.0.113.6")[0] == 200
    assert audit.get_events(action="SECURITY_ALERT") == []


def test_a_revoked_key_tried_from_many_addresses_alerts_on_its_key_id(
    store: CountingStore, clock: ManualClock, resolver: KeyResolver
) -> None:
    """Failures are also counted per key id: a leaked, revoked key hammered from five
    addresses raises an alert naming it (no address is blocked: each failed once)."""
    authorizer, audit, key_id, key = setup(store, clock, resolver)
    APIKeyManager(store, resolver.pepper, clock, resolver=resolver).revoke_key(key_id)
    for i in range(5):
        assert ask(authorizer, key, f"192.0.2.{i}")[1] == "key_revoked"
    (alert,) = audit.get_events(action="SECURITY_ALERT")
    assert (alert.key_id, alert.outcome) == (key_id, "alert")
    failures = audit.get_events(action="AUTH_FAILURE")
    assert {(e.key_id, e.tenant_id, e.reason) for e in failures} == {(key_id, "t", "key_revoked")}
