"""rediss:// and unix:// counters URLs, against Redis servers of their own (TLS-only, and
a Unix socket only): the same two clients as redis:// (a thread's blocking connection
and the event loop's), the same exactness, and TLS that checks what it is told to."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from extauthz.errors import StoreError
from extauthz.limits.base import Ask, Release
from extauthz.limits.blocking import ThreadConnections
from extauthz.limits.pipeline import ScriptPipeline
from extauthz.limits.redis import RedisCounters
from extauthz.policy import Limits, RateLimit
from tests.faultproxy import fault_proxy
from tests.loopchecks import LoopChecks
from tests.redis_servers import tls_redis, unix_redis

pytestmark = pytest.mark.redis
TEN_SLOTS = Limits(1000, 1000, 10, RateLimit(60000, 1000), 0.0)
# Tests not about timeouts: the 50 ms default failed a first connect plus 32 scripts
# queued on one loop connection on a loaded CI host.
ROOMY_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def tls() -> Iterator[tuple[int, str]]:
    with tls_redis() as (port, ca):
        yield port, str(ca)


@pytest.fixture(scope="module")
def unix() -> Iterator[str]:
    with unix_redis() as path:
        yield path


@pytest.fixture
def loop_checks() -> Iterator[LoopChecks]:
    checks = LoopChecks()
    yield checks
    checks.close()


def check_on(where: str, loops: LoopChecks, counters: RedisCounters, lease: str) -> Any:
    """One check of tenant "a" on this thread or as a greenlet on the event loop."""
    call = lambda: counters.acquire(Ask("a", "k", lease, TEN_SLOTS, "d"))  # noqa: E731
    return call() if where == "thread" else loops.run(call)[0]


def at_once(n: int, call: Callable[[int], Any]) -> list[Any]:
    """``call(i)`` for i in range(n), from n threads released together."""
    barrier = threading.Barrier(n)
    results: list[Any] = []

    def one(i: int) -> None:
        barrier.wait(10)
        results.append(call(i))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


@pytest.mark.parametrize("scheme", ["rediss", "unix"])
def test_tls_and_unix_socket_urls_use_both_clients_and_stay_exact(
    scheme: str, tls: tuple[int, str], unix: str, loop_checks: LoopChecks
) -> None:
    """32 threads at once and 32 greenlets on the loop, each group against 10 slots of
    its own tenant: exactly 10 win in each; the access log's batch release frees them
    all. No redis-py pipeline in between."""
    port, ca = tls
    url = (
        f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca}"
        if scheme == "rediss"
        else f"unix://{unix}?db=2"
    )
    counters = RedisCounters(url, prefix=f"t{uuid.uuid4().hex}", timeout=ROOMY_TIMEOUT)
    try:
        assert isinstance(counters._checks, ThreadConnections)
        wins = at_once(32, lambda i: counters.acquire(Ask("a", "k", f"a{i}", TEN_SLOTS, "d")))
        on_loop = loop_checks.run(
            *(
                lambda i=i: counters.acquire(Ask("b", "k", f"b{i}", TEN_SLOTS, "d"))
                for i in range(32)
            )
        )
        assert sum(v.allowed for v in wins) == 10
        assert sum(v.allowed for v in on_loop) == 10
        held = [Release(f"{t}{i}", None, t) for t in "ab" for i in range(32)]
        assert sum(s is not None for s in counters.release_many(held)) == 20
        assert counters.in_flight("a") == counters.in_flight("b") == 0
        assert counters.usage("a", "d") == (10, 0)
    finally:
        counters.close()


@pytest.mark.parametrize("where", ["thread", "loop"])
def test_tls_refuses_a_server_it_cannot_verify(
    where: str, tls: tuple[int, str], loop_checks: LoopChecks
) -> None:
    """rediss:// without the CA that signed the server's certificate: every check is a
    StoreError naming the verification failure, never a connection that trusts anyone."""
    counters = RedisCounters(f"rediss://127.0.0.1:{tls[0]}/0", timeout=0.5)
    try:
        with pytest.raises(StoreError, match="certificate verify failed"):
            check_on(where, loop_checks, counters, "x")
    finally:
        counters.close()


def test_a_tls_file_that_cannot_be_read_is_a_clear_error_at_start() -> None:
    """A CA file that does not exist fails when the counters are made, naming the URL
    without its password, not at the first check."""
    with pytest.raises(StoreError, match="bad Redis URL") as refused:
        RedisCounters("rediss://u:s3cret@127.0.0.1:6380/0?ssl_ca_certs=/nonexistent/ca.pem")
    assert "s3cret" not in str(refused.value)
    assert "***" in str(refused.value)


@pytest.mark.parametrize("where", ["thread", "loop"])
def test_a_blackholed_tls_connection_times_out_like_a_plain_one(
    where: str, tls: tuple[int, str], loop_checks: LoopChecks
) -> None:
    """Redis behind TLS stops answering after the handshake: the check fails with
    StoreError after about its timeout, from a thread's connection (where a blocking TLS
    socket would otherwise retry forever) and from the loop's; after the fault the next
    check works on a new connection. (200 ms rather than the default 50: the 50 ms
    version failed once in a full run on a loaded 2-core host.)"""
    port, ca = tls
    with fault_proxy("127.0.0.1", port) as proxy:
        counters = RedisCounters(
            f"rediss://localhost:{proxy.port}/0?ssl_ca_certs={ca}",
            prefix=f"t{uuid.uuid4().hex}",
            timeout=0.2,
        )

        def check(lease: str) -> Any:
            return check_on(where, loop_checks, counters, lease)

        try:
            assert check("1").allowed
            proxy.set("drop")
            started = time.monotonic()
            with pytest.raises(StoreError, match="did not answer within 200 ms"):
                check("2")
            assert time.monotonic() - started < 0.6
            proxy.set("pass")
            assert check("3").allowed
        finally:
            counters.close()


def test_tls_options_the_clients_do_not_handle_keep_redis_py(tls: tuple[int, str]) -> None:
    """A TLS option only redis-py implements (here OCSP stapling checks off but named)
    keeps the whole URL on redis-py rather than connect with less checking."""
    port, ca = tls
    counters = RedisCounters(
        f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca}"
        "&ssl_include_verify_flags=VERIFY_X509_PARTIAL_CHAIN",
        prefix=f"t{uuid.uuid4().hex}",
        timeout=ROOMY_TIMEOUT,
    )
    try:
        assert isinstance(counters._checks, ScriptPipeline)
        assert counters._on_loops is None
        assert counters.acquire(Ask("a", "k", "1", TEN_SLOTS, "d")).allowed
    finally:
        counters.close()
