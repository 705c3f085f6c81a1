"""The blocking client gRPC's threads and the access log use (limits/blocking.py): a
silent server, a dead one, a connection closed under a waiting call, and one connection
per thread."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator
from importlib import resources

import pytest
import redis

from extauthz.errors import StoreError
from extauthz.limits.base import Ask
from extauthz.limits.blocking import BlockingConnection, ThreadConnections
from extauthz.limits.endpoint import Endpoint
from extauthz.limits.redis_args import AcquireArgs
from extauthz.policy import Limits, RateLimit
from tests.services import redis_address, redis_url

pytestmark = pytest.mark.redis
SCRIPT = resources.files("extauthz.limits").joinpath("lua", "acquire.lua").read_text()
LIMITS = Limits(1000, 1000, 10, RateLimit(60000, 1000), 0.0)


@pytest.fixture
def silent() -> Iterator[tuple[str, int]]:
    """A server that accepts connections (the kernel's backlog) and never answers."""
    server = socket.create_server(("127.0.0.1", 0))
    yield server.getsockname()
    server.close()


def sha_of(text: str) -> str:
    return str(redis.Redis.from_url(redis_url()).script_load(text))


def acquire_call(prefix: str, lease: str) -> tuple[str, str, list[str], list[object]]:
    keys, args = AcquireArgs(30.0)(Ask("t1", "k1", lease, LIMITS, "d"), prefix, 1000)
    return sha_of(SCRIPT), SCRIPT, keys, args


def test_a_silent_server_is_a_store_error_within_the_timeout(silent: tuple[str, int]) -> None:
    """Redis blackholed after connecting: the call fails with StoreError after about
    the 50 ms timeout, not Envoy's 500 ms, and the broken connection is closed."""
    connection = BlockingConnection(Endpoint(silent), 0.05)
    started = time.monotonic()
    with pytest.raises(StoreError, match="did not answer within 50 ms"):
        connection.run([acquire_call("p", "a")])
    assert time.monotonic() - started < 0.3
    assert connection.closed


def test_nothing_listening_is_a_store_error() -> None:
    """A refused connection is StoreError at once, naming no secret."""
    with pytest.raises(StoreError, match="Redis counters failed"):
        BlockingConnection(Endpoint(("127.0.0.1", 9)), 0.05)


def test_closing_wakes_a_call_blocked_on_the_connection(silent: tuple[str, int]) -> None:
    """Shutting down (close from another thread) ends a waiting call with StoreError
    at once, instead of leaving it until its timeout."""
    connection = BlockingConnection(Endpoint(silent), 5.0)
    errors: list[Exception] = []

    def wait() -> None:
        try:
            connection.run([acquire_call("p", "a")])
        except StoreError as exc:
            errors.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.05)  # let it block in its receive
    started = time.monotonic()
    connection.close()
    waiter.join(2.0)
    assert not waiter.is_alive()
    assert time.monotonic() - started < 1.0
    assert len(errors) == 1


def test_each_thread_has_its_own_connection_and_a_broken_one_is_replaced() -> None:
    """Two threads use two connections; after a connection breaks, the thread's next
    call opens a new one and succeeds; calls after close() are refused."""
    prefix = f"t{uuid.uuid4().hex}"
    clients = ThreadConnections(
        Endpoint(redis_address()), 0.5, sha=sha_of(SCRIPT), script=SCRIPT, wait=1.0
    )
    seen: list[BlockingConnection] = []

    def one(lease: str) -> None:
        clients.call(*acquire_call(prefix, lease)[2:])
        seen.append(clients._local.connection)

    try:
        for lease in ("a", "b"):
            worker = threading.Thread(target=one, args=(lease,))
            worker.start()
            worker.join(5)
        assert len(seen) == 2
        assert seen[0] is not seen[1]
        one("c")
        broken = seen[-1]
        broken.close()
        one("d")
        assert seen[-1] is not broken
        assert clients.calls == 4
    finally:
        clients.close()
        client = redis.Redis.from_url(redis_url())
        for key in client.scan_iter(f"{prefix}:*"):
            client.delete(key)
    with pytest.raises(StoreError, match="closed"):
        one("e")
