"""Three extauthz replicas behind one Envoy (round robin, for checks and for the access
log), sharing Redis counters and a PostgreSQL store: limits are exact across replicas,
a revocation reaches all of them within 2 s, and a killed replica's slots come back."""

from __future__ import annotations

import secrets
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from extauthz.app import Runtime
from extauthz.envoyconf import render
from extauthz.launcher import EnvoyProcess
from extauthz.limits.degraded import GuardedCounters
from extauthz.model import TenantTier
from extauthz.settings import load_settings
from tests.e2e.backends import TestBackend
from tests.e2e.conftest import extauthz_cmd, sidecar_env, start_sidecar_ports, stop, wait_until
from tests.e2e.http_util import Reply, at_once, get
from tests.services import pg_schema, redis_url

pytestmark = [pytest.mark.e2e, pytest.mark.redis, pytest.mark.postgres]

BIG = "rate_limit: {requests_per_minute: 1000000, burst: 100000}"
RUN = secrets.token_hex(4)  # tenant ids unique to this run: Redis is shared
T_CONC, T_QUOTA, T_KILL, T_REV = (f"{name}_{RUN}" for name in ("conc", "quota", "kill", "rev"))
POLICY = f"""
tenants:
  {T_CONC}: {{concurrent: 50, {BIG}}}
  {T_QUOTA}: {{requests_per_day: 50, {BIG}}}
  {T_KILL}: {{concurrent: 3, {BIG}}}
  {T_REV}: {{{BIG}}}
"""
LEASE_TTL = 8.0


@dataclass
class Cluster:
    port: int
    env: dict[str, str]
    runtime: Runtime
    backend: TestBackend
    replicas: list[subprocess.Popen[str]]

    def key(self, tenant_id: str) -> tuple[str, str]:
        return self.runtime.keys.create_key(tenant_id, "e2e")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    data = tmp_path_factory.mktemp("replicas")
    with pg_schema() as db_url:
        env = sidecar_env(
            data,
            POLICY,
            EXTAUTHZ_COUNTERS_URL=redis_url(),
            EXTAUTHZ_REPLICAS="3",
            EXTAUTHZ_LEASE_TTL=f"{LEASE_TTL}s",
            # Exactness, not degraded mode, is tested here: 300 checks at once on a
            # loaded 2-core CI host once took Redis over 50 ms and the enterprise tier
            # failed open (its documented behaviour, tested in test_degraded.py).
            EXTAUTHZ_COUNTERS_TIMEOUT="1s",
            EXTAUTHZ_LOG_LEVEL="info",
        )
        env["EXTAUTHZ_DATABASE_URL"] = db_url  # sidecar_env drops any inherited one
        runtime = Runtime.open(load_settings(environ=env))  # creates the shared pepper
        for tenant_id in (T_CONC, T_QUOTA, T_KILL, T_REV):
            runtime.tenants.create_tenant(tenant_id, TenantTier.ENTERPRISE, tenant_id)
        backend = TestBackend().start()
        started = [start_sidecar_ports(env, data / f"replica{i}.log") for i in range(3)]
        replicas = [proc for proc, _ in started]
        envoy = EnvoyProcess(
            render(
                listen=("127.0.0.1", 0),
                upstream=("127.0.0.1", backend.port),
                authz=[("127.0.0.1", ports["grpc_port"]) for _, ports in started],
                als=[("127.0.0.1", ports["als_port"]) for _, ports in started],
                admin=("127.0.0.1", 0),
                # 300 checks at once queue on 3 Python replicas sharing 2 cores: some
                # took over Envoy's default 0.5 s in CI (Envoy then answers 503).
                timeout=2.0,
            ),
            data / "envoy",
            concurrency=2,
        )
        try:
            envoy.start()
            yield Cluster(envoy.listener_port(), env, runtime, backend, replicas)
        finally:
            envoy.stop()
            codes = [stop(proc) for proc in replicas]
            backend.stop()
            runtime.close()
        # Every replica still alive at the end stops cleanly (the killed one: -9).
        assert all(code in (0, -9) for code in codes), codes


def test_300_concurrent_against_50_slots_exactly_50_across_3_replicas(cluster: Cluster) -> None:
    """BAD_INPUTS #12 across replicas: 300 requests at once, spread over 3 replicas by
    Envoy; exactly 50 hold a slot at the slow backend, 250 get 429 concurrency_limit."""
    _, key = cluster.key(T_CONC)
    cluster.backend.hold()
    replies: list[Reply] = []
    runner = threading.Thread(target=at_once, args=(cluster.port, 300, "/slow", key, replies))
    runner.start()
    try:
        # Every other request is decided (and answered) while the 50 are still held, so
        # none can take a slot freed by the release below.
        wait_until(lambda: cluster.backend.holding == 50 and len(replies) == 250, 30)
        assert cluster.backend.holding == 50
    finally:
        cluster.backend.release()
        runner.join(60)
    assert Counter(r.status for r in replies) == {200: 50, 429: 250}
    assert {r.json()["error"] for r in replies if r.status == 429} == {"concurrency_limit"}


def test_daily_quota_is_exact_across_replicas(cluster: Cluster) -> None:
    """300 at once against a daily quota of 50: exactly 50 pass, and the shared count
    says 50 (not 50 per replica)."""
    _, key = cluster.key(T_QUOTA)
    replies = at_once(cluster.port, 300, "/fast", key)
    assert Counter(r.status for r in replies) == {200: 50, 429: 250}
    assert {r.json()["error"] for r in replies if r.status == 429} == {"daily_quota_exceeded"}
    day = time.strftime("%Y-%m-%d", time.gmtime())
    assert cluster.runtime.counters.usage(T_QUOTA, day)[0] == 50


def test_a_revocation_reaches_every_replica_within_2_seconds(cluster: Cluster) -> None:
    """Revoked in the test process (PostgreSQL NOTIFY, with the revision poll as the
    bound); 9 checks in a row (3 rounds of the 3 replicas) are then all 401."""
    key_id, key = cluster.key(T_REV)
    assert all(get(cluster.port, headers=[("x-api-key", key)]).status == 200 for _ in range(9))
    cluster.runtime.keys.revoke_key(key_id)

    def all_refuse() -> bool:
        return all(get(cluster.port, headers=[("x-api-key", key)]).status == 401 for _ in range(9))

    took = wait_until(all_refuse, 5, step=0.005)
    print(f"revocation seen by all 3 replicas after {took * 1000:.0f} ms")
    assert took < 2.0


def test_slots_held_through_a_killed_replica_come_back_by_lease_expiry(cluster: Cluster) -> None:
    """BAD_INPUTS #14: 3 slots are held, one replica is SIGKILLed; once the backend
    answers, the tenant gets all 3 slots back, at the latest when the leases expire."""
    _, key = cluster.key(T_KILL)
    cluster.backend.hold()
    done: list[list[Reply]] = []
    runner = threading.Thread(target=lambda: done.append(at_once(cluster.port, 3, "/slow", key)))
    runner.start()
    try:
        wait_until(lambda: cluster.backend.holding == 3, 10)
        cluster.replicas[0].kill()
        cluster.replicas[0].wait(10)
    finally:
        cluster.backend.release()
        runner.join(30)
    counters = cluster.runtime.counters
    assert isinstance(counters, GuardedCounters)
    took = wait_until(lambda: counters.in_flight(T_KILL) == 0, LEASE_TTL + 5, step=0.1)
    print(f"slots back {took:.2f} s after the release (lease ttl {LEASE_TTL:g} s)")

    # Until Envoy's health checks drop the dead endpoint (2 failed checks, 1 s apart),
    # its share of checks fails with 503; then the survivors admit 3 at once.
    def survivors_answer() -> bool:
        return all(get(cluster.port, headers=[("x-api-key", key)]).status == 200 for _ in range(6))

    print(f"dead replica out of rotation after {wait_until(survivors_answer, 15):.2f} s more")
    wait_until(lambda: counters.in_flight(T_KILL) == 0, 5)  # those 6 are released too
    replies = at_once(cluster.port, 3, "/fast", key)
    assert [r.status for r in replies] == [200, 200, 200]


def test_the_audit_chain_written_by_3_replicas_verifies(cluster: Cluster) -> None:
    """Every replica appended to one chain in PostgreSQL; `extauthz audit verify`
    checks all of it (runs last in this module)."""
    cluster.runtime.flush()
    result = subprocess.run(
        extauthz_cmd("audit", "verify"),
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "audit chain OK" in result.stdout
