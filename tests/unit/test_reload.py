"""Policy hot reload: validate, then swap whole; a bad file keeps the old policy; both
outcomes are audited as CONFIG_CHANGED."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from extauthz.apikeys import APIKeyManager, KeyResolver
from extauthz.audit import AuditLogger
from extauthz.authorizer import Authorizer
from extauthz.limits.gate import LimitGate
from extauthz.limits.memory import MemoryCounters
from extauthz.model import CheckInput, TenantTier
from extauthz.policy import load_policy
from extauthz.reload import PolicyWatcher
from extauthz.tenants import TenantManager
from extauthz.testing import CountingStore, ManualClock

GOOD = (
    "tiers:\n  free: {{requests_per_day: {n}, concurrent: 1000,\n"
    "    rate_limit: {{requests_per_minute: 100000000, burst: 100000000}}}}\n"
)


def setup(
    tmp_path: Path, store: CountingStore, resolver: KeyResolver
) -> tuple[Path, Authorizer, PolicyWatcher, AuditLogger]:
    path = tmp_path / "policy.yaml"
    path.write_text(GOOD.format(n=10**6))
    audit = AuditLogger(store)
    authorizer = Authorizer(resolver, policy=load_policy(path))
    return path, authorizer, PolicyWatcher(path, (authorizer,), audit), audit


def test_changed_file_is_picked_up_and_audited(
    tmp_path: Path, store: CountingStore, resolver: KeyResolver
) -> None:
    """Editing the file swaps the policy on the next poll; CONFIG_CHANGED success names
    the old and new versions. An unchanged file does nothing."""
    path, authorizer, watcher, audit = setup(tmp_path, store, resolver)
    old = authorizer.policy.version
    assert watcher.poll() is None
    path.write_text(GOOD.format(n=250))
    assert watcher.poll() is True
    assert authorizer.policy.tiers[TenantTier.FREE].requests_per_day == 250
    audit.flush()
    (event,) = store.list_audit(action="CONFIG_CHANGED")
    assert (event.outcome, event.policy_version) == ("success", authorizer.policy.version)
    assert json.loads(event.detail)["previous_version"] == old


def test_bad_file_keeps_the_old_policy_and_names_file_and_line(
    tmp_path: Path, store: CountingStore, resolver: KeyResolver
) -> None:
    """BAD_INPUTS #23: an invalid reload keeps the old policy; CONFIG_CHANGED failure
    carries the file:line error; the bad file is reported once, not on every poll."""
    path, authorizer, watcher, audit = setup(tmp_path, store, resolver)
    before = authorizer.policy
    path.write_text("tiers:\n  free:\n    requests_per_day: -3\n")
    assert watcher.poll() is False
    assert watcher.poll() is None
    assert authorizer.policy is before
    audit.flush()
    (event,) = store.list_audit(action="CONFIG_CHANGED")
    assert event.outcome == "failure"
    assert json.loads(event.detail)["error"] == (
        f"{path}:3: tiers.free.requests_per_day must be at least 0, not -3"
    )
    path.unlink()
    watcher.requested.set()  # SIGHUP with the file gone
    assert watcher.poll() is False
    assert authorizer.policy is before


def test_sighup_request_reloads_even_without_a_change(
    tmp_path: Path, store: CountingStore, resolver: KeyResolver
) -> None:
    """A SIGHUP (the `requested` event) reloads at once, file changed or not."""
    _, _, watcher, _ = setup(tmp_path, store, resolver)
    watcher.requested.set()
    assert watcher.poll() is True
    assert watcher.reloads == 1


def test_reload_under_load_drops_no_request(
    tmp_path: Path, store: CountingStore, resolver: KeyResolver, clock: ManualClock
) -> None:
    """Four threads check continuously while the policy is swapped 50 times (good and
    bad files alternating): every check is answered, and every one is allowed."""
    path, authorizer, watcher, _ = setup(tmp_path, store, resolver)
    authorizer.gate = LimitGate(MemoryCounters(clock, lease_ttl=1), clock)
    TenantManager(store, clock).create_tenant("f", TenantTier.FREE, tenant_id="f")
    _, key = APIKeyManager(store, resolver.pepper, clock).create_key("f")
    stop = threading.Event()
    results: list[int] = []

    def load(worker: int) -> None:
        n = 0
        while not stop.is_set() and n < 20_000:
            n += 1
            rid = f"{worker}-{n}"
            request = CheckInput("GET", "/x", {"x-api-key": key}, request_id=rid)
            results.append(authorizer.check(request).status)
            counters.release(rid)

    counters = authorizer.gate.counters
    threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for i in range(50):
        path.write_text(GOOD.format(n=10**6 + i) if i % 2 else "tiers: [broken\n")
        watcher.requested.set()
        watcher.poll()
    stop.set()
    for t in threads:
        t.join(30)
    assert watcher.reloads == 25
    assert watcher.failures == 25
    assert results
    assert set(results) == {200}
