"""Both access-log transports through real Envoy (EXTAUTHZ_ACCESS_LOG=grpc, the gRPC
access-log service, or fluentd, Envoy's fluentd logger): finished requests free their
slots and are billed from the upstream's headers or trailers; a stream cut mid-load
loses no request's bill (lost entries expire into `incomplete` records)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from extauthz.model import TenantTier
from tests.e2e.backends import TestBackend
from tests.e2e.conftest import Stack, running_stack, wait_until
from tests.e2e.http_util import get
from tests.e2e.test_usage_audit import streamed
from tests.faultproxy import FaultProxy

pytestmark = pytest.mark.e2e
POLICY = """
tenants:
  t_one: {concurrent: 1, requests_per_day: 1000000,
    rate_limit: {requests_per_minute: 1000000, burst: 100000}}
  t_many: {concurrent: 100000, requests_per_day: 1000000,
    rate_limit: {requests_per_minute: 1000000, burst: 100000}}
"""


@pytest.fixture(params=["grpc", "fluentd"])
def proxied(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Stack, FaultProxy]]:
    """A stack whose access log reaches the sidecar through a fault proxy."""
    proxies: list[FaultProxy] = []

    def through_proxy(config: dict[str, Any]) -> None:
        als = next(c for c in config["static_resources"]["clusters"] if c["name"] == "extauthz_als")
        address = als["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        proxy = FaultProxy(("127.0.0.1", address["socket_address"]["port_value"]))
        proxies.append(proxy)
        address["socket_address"]["port_value"] = proxy.port

    with running_stack(
        tmp_path,
        "http",
        POLICY,
        TestBackend(),
        tweak=through_proxy,
        EXTAUTHZ_ACCESS_LOG=request.param,
        EXTAUTHZ_LEASE_TTL="1s",
    ) as stack:
        try:
            yield stack, proxies[0]
        finally:
            proxies[0].close()


def tenant_key(stack: Stack, tenant_id: str) -> str:
    stack.runtime.tenants.create_tenant(tenant_id, TenantTier.STARTER, tenant_id)
    return stack.runtime.keys.create_key(tenant_id)[1]


def test_finished_requests_free_their_slot_and_are_billed_from_headers_or_trailers(
    proxied: tuple[Stack, FaultProxy],
) -> None:
    """With one concurrency slot, 20 requests one after another all pass (each entry
    frees the slot before the next check); usage comes from response headers (120 +
    180) and, for a streamed answer, from its trailers (70 + 30)."""
    stack, _ = proxied
    key = tenant_key(stack, "t_one")
    statuses = []
    for i in range(20):
        time.sleep(0.03)  # the access log flushes every 5 ms
        statuses.append(
            get(stack.port, "/usage/120/180" if i % 2 else "/fast", [("x-api-key", key)]).status
        )
    assert statuses == [200] * 20
    time.sleep(0.05)
    assert streamed(stack.port, "/stream-usage/70/30", key).startswith(b"HTTP/1.1 200")

    def records() -> list[Any]:
        return stack.runtime.store.query_usage(tenant_id="t_one")

    wait_until(lambda: len(records()) == 21, 5)
    counts = sorted((r.tokens_in, r.tokens_out) for r in records())
    assert counts == [(0, 0)] * 10 + [(70, 30)] + [(120, 180)] * 10
    assert not any(r.incomplete for r in records())
    assert {r.status for r in records()} == {200}
    # fluentd, HTTP service, local counters: entries are read on the checks' own event
    # loop (no thread of their own); the gRPC stream has its server's threads.
    names = {t.read_text().strip() for t in Path(f"/proc/{stack.sidecar.pid}/task").glob("*/comm")}
    assert ("extauthz-als" in names) == (stack.env["EXTAUTHZ_ACCESS_LOG"] == "grpc")


def test_a_stream_cut_mid_load_still_bills_every_answered_request_once(
    proxied: tuple[Stack, FaultProxy],
) -> None:
    """Four clients send requests; after 0.5 s the access-log stream is cut for 0.5 s
    (connections closed, reconnects refused), then restored for 1 s more. Every request
    answered 200 has exactly one usage record, none billed twice: reported ones
    complete, and the entries Envoy could not deliver (those of the cut, measured: all
    of them, in both transports) `incomplete` once their 1 s lease expires. Requests
    checked from 0.25 s after the restore are all billed complete again."""
    stack, proxy = proxied
    key = tenant_key(stack, "t_many")
    answered: list[int] = []
    done = threading.Event()

    def client() -> None:
        while not done.is_set() and len(answered) < 20_000:
            answered.append(get(stack.port, "/fast", [("x-api-key", key)]).status)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    cut_at = time.time()
    proxy.set("cut")
    time.sleep(0.5)
    restored_at = time.time()
    proxy.set("pass")
    time.sleep(1.0)
    done.set()
    for t in threads:
        t.join(10)
    ok = answered.count(200)
    assert ok == len(answered) > 0

    def rows() -> list[Any]:
        return stack.runtime.store.query_usage(tenant_id="t_many")

    wait_until(lambda: len(rows()) >= ok, 10)
    time.sleep(0.5)  # anything billed twice would show up by now
    billed = rows()
    lost = [r for r in billed if r.incomplete]
    print(
        f"\n{ok} answered, {len(billed)} billed, {len(lost)} incomplete; "
        f"{sum(cut_at <= r.ts < restored_at for r in billed)} checked during the cut"
    )
    assert len(billed) == len({r.request_id for r in billed}) == ok
    assert not [r for r in lost if r.ts > restored_at + 0.25]
