"""HTTP-service checks that wait on Redis yield the event loop (suspend.py): a slow
round trip holds up only its own request, never another connection's answer."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import pytest

from extauthz.app import Runtime
from extauthz.model import TenantTier
from extauthz.settings import Settings
from extauthz.transport.http_authz import GREENLETS, HttpAuthzThread
from tests.faultproxy import fault_proxy
from tests.services import redis_address
from tests.unit.test_http_transport import exchange, request

pytestmark = pytest.mark.redis


def redis_behind(port: int, data_dir: Path) -> tuple[Runtime, str]:
    """A runtime whose counters are the Redis behind the fault proxy on ``port``, with a
    key prefix of its own, and a key of a STARTER tenant."""
    runtime = Runtime.open(
        Settings(
            data_dir=data_dir,
            counters_url=f"redis://127.0.0.1:{port}/0",
            counters_timeout=1.0,
            metrics_addr="off",
        )
    )
    runtime.counters.shared.prefix = f"t{uuid.uuid4().hex}"  # type: ignore[attr-defined]
    tenant = runtime.tenants.create_tenant("acme", TenantTier.STARTER)
    return runtime, runtime.keys.create_key(tenant.id)[1]


def test_a_slow_redis_round_trip_does_not_stall_other_connections(tmp_path: Path) -> None:
    with fault_proxy(*redis_address()) as proxy:
        runtime, key = redis_behind(proxy.port, tmp_path)
        server = HttpAuthzThread(runtime.authorizer(), waits=GREENLETS)
        port = server.start("127.0.0.1", 0)
        try:
            assert (
                exchange(port, request("/v1", f"x-api-key: {key}", "connection: close"))[:15]
                == b"HTTP/1.1 200 OK"
            )
            proxy.set("delay", delay=0.3)
            finished: dict[str, float] = {}

            def slow() -> None:
                reply = exchange(port, request("/v1", f"x-api-key: {key}", "connection: close"))
                assert reply.startswith(b"HTTP/1.1 200 OK")
                finished["slow"] = time.monotonic()

            started = time.monotonic()
            waiting = threading.Thread(target=slow)
            waiting.start()
            time.sleep(0.05)  # the slow check is now waiting on Redis
            fast = exchange(port, request("/v1", "connection: close"))
            finished["fast"] = time.monotonic()
            waiting.join(10)
            assert fast.startswith(b"HTTP/1.1 401 ")
            assert finished["fast"] < finished["slow"]
            assert finished["fast"] - started < 0.25  # not behind the 600 ms round trip
        finally:
            proxy.set("pass")
            server.stop(1)
            runtime.close()


def test_checks_past_the_waiting_limit_are_answered_overloaded_at_once(tmp_path: Path) -> None:
    """BAD_INPUTS #26, HTTP service: with Redis slowed to 300 ms and at most 4 checks
    allowed to wait on it, 10 checks at once: 4 are decided when Redis answers, the
    other 6 get 429 `overloaded` with Retry-After immediately, never a 5xx."""
    with fault_proxy(*redis_address()) as proxy:
        runtime, key = redis_behind(proxy.port, tmp_path)
        server = HttpAuthzThread(runtime.authorizer(), waits=GREENLETS, max_waiting=4)
        port = server.start("127.0.0.1", 0)
        replies: list[tuple[bytes, float]] = []
        lock = threading.Lock()
        barrier = threading.Barrier(10)

        def one() -> None:
            barrier.wait(5)
            started = time.monotonic()
            reply = exchange(port, request("/v1", f"x-api-key: {key}", "connection: close"))
            with lock:
                replies.append((reply, time.monotonic() - started))

        try:
            assert exchange(port, request("/v1", f"x-api-key: {key}"))[:15] == b"HTTP/1.1 200 OK"
            proxy.set("delay", delay=0.3)
            threads = [threading.Thread(target=one) for _ in range(10)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(10)
        finally:
            proxy.set("pass")
            server.stop(1)
            runtime.close()
    shed = [(r, took) for r, took in replies if r.startswith(b"HTTP/1.1 429 ")]
    decided = [(r, took) for r, took in replies if r.startswith(b"HTTP/1.1 200 ")]
    assert (len(shed), len(decided)) == (6, 4)
    assert all(b'"error": "overloaded"' in r and b"retry-after: 1\r\n" in r for r, _ in shed)
    assert max(took for _, took in shed) < 0.25 <= min(took for _, took in decided)
    assert server.server.shed == 6
