"""What only the Redis counters must also get right: scripts Redis forgot, TTLs on every
key, expired leases handed over for incomplete usage records."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from importlib import resources
from typing import Any

import pytest
import redis

from extauthz.errors import StoreError
from extauthz.limits.base import Ask, Release
from extauthz.limits.blocking import ThreadConnections
from extauthz.limits.pipeline import ScriptPipeline
from extauthz.limits.redis import RedisCounters
from extauthz.limits.redis_args import AcquireArgs
from extauthz.policy import Limits, RateLimit
from extauthz.testing import ManualClock
from tests.loopchecks import LoopChecks
from tests.services import redis_url

pytestmark = pytest.mark.redis
LIMITS = Limits(1000, 1000, 2, RateLimit(600, 100), 0.001)
TEN_SLOTS = Limits(1000, 1000, 10, RateLimit(60000, 1000), 0.0)


@pytest.fixture
def counters(clock: ManualClock) -> Iterator[RedisCounters]:
    c = RedisCounters(
        redis_url(), lease_ttl=30.0, prefix=f"t{uuid.uuid4().hex}", clock=clock, timeout=2.0
    )
    yield c
    for key in c.redis.scan_iter(f"{c.prefix}:*"):
        c.redis.delete(key)
    c.close()


def ask(lease: str, **kw: object) -> Ask:
    return Ask("t1", "k1", lease, LIMITS, "2027-01-15", tokens=10, **kw)  # type: ignore[arg-type]


def test_scripts_flushed_by_a_restart_are_loaded_again(counters: RedisCounters) -> None:
    """BAD_INPUTS #17: after SCRIPT FLUSH the next check reloads the script and counts
    the request exactly once."""
    assert counters.acquire(ask("a")).allowed
    counters.redis.script_flush()
    verdict = counters.acquire(ask("b"))
    assert verdict.allowed
    assert verdict.requests_today == 2
    assert counters.usage("t1", "2027-01-15") == (2, 20)


@pytest.mark.parametrize("client", ["thread's connection", "redis-py (unhandled TLS options)"])
def test_batched_releases_reload_scripts_redis_forgot(counters: RedisCounters, client: str) -> None:
    """BAD_INPUTS #17 on the access-log path: after SCRIPT FLUSH a batch release loads
    the script again and frees each lease exactly once, through the calling thread's
    own connection and through redis-py (what URLs with TLS options the clients do not
    handle use)."""
    if client.startswith("redis-py"):
        counters._checks.close()
        counters._checks = ScriptPipeline(counters.redis, counters._acquire, wait=1.0)
    assert counters.acquire(ask("a")).allowed
    assert counters.acquire(ask("b")).allowed
    counters.redis.script_flush()
    results = counters.release_many([Release("a", 4, "t1"), Release("b", None, "t1")])
    assert [r.request_id if r else None for r in results] == ["a", "b"]
    assert counters.in_flight("t1") == 0
    assert counters.usage("t1", "2027-01-15") == (2, 14)
    assert counters.release_many([Release("a", 4, "t1")]) == [None]


def test_a_wrong_tenant_hint_frees_nothing(counters: RedisCounters) -> None:
    """A forged x-tenant-id (a denied request's) cannot release another tenant's lease:
    the lease is looked for under the named tenant only."""
    assert counters.acquire(ask("a")).allowed
    assert counters.release_many([Release("a", None, "t-other")]) == [None]
    assert counters.in_flight("t1") == 1
    assert counters.release("a") is not None  # the real release still finds it


def test_concurrent_checks_from_threads_stay_exact(counters: RedisCounters) -> None:
    """64 threads at once against 10 slots (gRPC's way): exactly 10 win, each thread's
    script sent on its own connection, none through an event loop's."""
    barrier = threading.Barrier(64)
    wins: list[bool] = []

    def one(i: int) -> None:
        barrier.wait(10)
        wins.append(counters.acquire(Ask("t1", "k1", f"r{i}", TEN_SLOTS, "d")).allowed)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sum(wins) == 10
    assert isinstance(counters._checks, ThreadConnections)
    assert counters._checks.calls == 64
    assert counters._on_loops is not None
    assert list(counters._on_loops) == []


def test_every_key_has_a_ttl(counters: RedisCounters) -> None:
    """BAD_INPUTS #15: nothing we write lives forever."""
    counters.acquire(
        Ask(
            "t1",
            "k1",
            "a",
            Limits(1000, 1000, 5, RateLimit(60, 5), 0.0, key_rate_limit=RateLimit(60, 5)),
            "d",
        )
    )
    keys = list(counters.redis.scan_iter(f"{counters.prefix}:*"))
    assert len(keys) >= 5
    for key in keys:
        assert counters.redis.pttl(key) > 0, key


def test_expired_leases_are_handed_over_once(counters: RedisCounters, clock: ManualClock) -> None:
    """A lease nobody released expires at the next check of its tenant; drain_expired
    returns it once (for its incomplete usage record), with its request's facts."""
    counters.acquire(ask("gone", route="/v1/chat", method="POST", price=0.002, started=5.0))
    clock.advance(31)
    counters.acquire(ask("next"))
    (expired,) = counters.drain_expired()
    assert (expired.request_id, expired.tenant_id, expired.reserved, expired.route) == (
        "gone",
        "t1",
        10,
        "/v1/chat",
    )
    assert counters.drain_expired() == []
    assert counters.release("gone") is None


def test_redis_down_is_a_store_error_not_a_hang(clock: ManualClock) -> None:
    """A Redis that does not answer gives StoreError within the timeout."""
    dead = RedisCounters("redis://127.0.0.1:9/0", timeout=0.05, clock=clock)
    with pytest.raises(StoreError):
        dead.acquire(ask("x"))
    with pytest.raises(redis.RedisError):
        dead.redis.ping()


@pytest.fixture
def loop_checks() -> Iterator[LoopChecks]:
    checks = LoopChecks()
    yield checks
    checks.close()


def test_checks_on_an_event_loop_share_writes_and_stay_exact(
    counters: RedisCounters, loop_checks: LoopChecks
) -> None:
    """64 checks at once on the HTTP service's loop against 10 slots: exactly 10 win,
    no thread's own connection is used, and the 64 scripts left in fewer writes than
    calls."""
    verdicts = loop_checks.run(
        *(lambda i=i: counters.acquire(Ask("t1", "k1", f"r{i}", TEN_SLOTS, "d")) for i in range(64))
    )
    assert sum(v.allowed for v in verdicts) == 10
    assert counters._checks.calls == 0
    assert counters._on_loops is not None
    (connection,) = counters._on_loops
    assert connection.commands == 64
    assert connection.writes < 64


def test_a_script_redis_forgot_is_run_again_from_the_loop(
    counters: RedisCounters, loop_checks: LoopChecks
) -> None:
    """BAD_INPUTS #17 on the loop's connection: after SCRIPT FLUSH the check is sent
    again with the script's text and counted exactly once."""
    assert loop_checks.run(lambda: counters.acquire(ask("a")))[0].allowed
    counters.redis.script_flush()
    (verdict,) = loop_checks.run(lambda: counters.acquire(ask("b")))
    assert verdict.allowed
    assert verdict.requests_today == 2
    assert counters.usage("t1", "2027-01-15") == (2, 20)


def on(where: str, loop_checks: LoopChecks, call: Callable[[], Any]) -> Any:
    """``call``'s result, made on this thread or as a greenlet on the event loop."""
    return call() if where == "thread" else loop_checks.run(call, timeout=2.0)[0]


@pytest.mark.parametrize("where", ["thread", "loop"])
def test_both_clients_select_the_url_database(
    clock: ManualClock, loop_checks: LoopChecks, where: str
) -> None:
    """redis://host/3 writes to database 3, like redis-py, from a thread's own
    connection and from the loop's."""
    prefix = f"t{uuid.uuid4().hex}"
    counters = RedisCounters(redis_url(3), prefix=prefix, clock=clock, timeout=2.0)
    try:
        assert on(where, loop_checks, lambda: counters.acquire(ask("a"))).allowed
        assert counters.redis.exists(f"{prefix}:{{t1}}:leases")
        assert not redis.Redis.from_url(redis_url(0)).exists(f"{prefix}:{{t1}}:leases")
    finally:
        for key in counters.redis.scan_iter(f"{prefix}:*"):
            counters.redis.delete(key)
        counters.close()


@pytest.mark.parametrize("where", ["thread", "loop"])
def test_both_clients_authenticate_and_a_wrong_password_is_a_store_error(
    clock: ManualClock, loop_checks: LoopChecks, where: str
) -> None:
    """A Redis user from the URL: the right password works; a wrong one is refused
    with StoreError (its text never holds the password), not a hang; from a thread's
    own connection and from the loop's."""
    admin = redis.Redis.from_url(redis_url())
    user, secret = f"u{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    admin.acl_setuser(user, enabled=True, passwords=[f"+{secret}"], keys=["~*"], commands=["+@all"])
    try:
        good = RedisCounters(
            redis_url().replace("redis://", f"redis://{user}:{secret}@"),
            prefix=f"t{user}",
            clock=clock,
            timeout=2.0,
        )
        bad = RedisCounters(
            redis_url().replace("redis://", f"redis://{user}:wrong-{secret}@"),
            timeout=0.5,
            clock=clock,
        )
        try:
            assert on(where, loop_checks, lambda: good.acquire(ask("a"))).allowed
            with pytest.raises(StoreError) as refused:
                on(where, loop_checks, lambda: bad.acquire(ask("b")))
            assert secret not in str(refused.value)
        finally:
            for key in good.redis.scan_iter(f"t{user}:*"):
                good.redis.delete(key)
            good.close()
            bad.close()
    finally:
        admin.acl_deluser(user)


@pytest.mark.parametrize("where", ["thread", "loop"])
def test_redis_down_is_a_store_error_from_both_clients(
    clock: ManualClock, loop_checks: LoopChecks, where: str
) -> None:
    """Nothing listening: the check gets StoreError, not a hang, from a thread's own
    connection and from the loop's."""
    dead = RedisCounters("redis://127.0.0.1:9/0", timeout=0.05, clock=clock)
    try:
        with pytest.raises(StoreError):
            on(where, loop_checks, lambda: dead.acquire(ask("x")))
    finally:
        dead.close()


def test_the_redis_py_pipeline_stays_exact(clock: ManualClock) -> None:
    """URLs with TLS options our clients do not handle go through redis-py, pipelined
    from an I/O thread (limits/pipeline.py): 64 threads at once against 10 slots,
    exactly 10 win, in fewer round trips than calls."""
    client = redis.Redis.from_url(redis_url())
    script = client.register_script(
        resources.files("extauthz.limits").joinpath("lua", "acquire.lua").read_text()
    )
    pipeline = ScriptPipeline(client, script, wait=1.0)
    prefix, build = f"t{uuid.uuid4().hex}", AcquireArgs(30.0)
    barrier = threading.Barrier(64)
    replies: list[Any] = []

    def one(i: int) -> None:
        keys, args = build(Ask("t1", "k1", f"r{i}", TEN_SLOTS, "d"), prefix, 1000)
        barrier.wait(10)
        replies.append(pipeline.call(keys, args))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(64)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sum(int(reply[0]) for reply in replies) == 10
        assert pipeline.calls == 64
        assert pipeline.batches < 64
    finally:
        pipeline.close()
        for key in client.scan_iter(f"{prefix}:*"):
            client.delete(key)
