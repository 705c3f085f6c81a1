"""Degraded mode through real Envoy: `extauthz serve` reaches Redis through a fault
proxy; with Redis cut, each tier gets its on_counters_down answer at the client, the
metric and /readyz say so, and start and end land in the audit trail."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from extauthz.audit import LIMITS_DEGRADED
from extauthz.model import TenantTier
from tests.e2e.conftest import Stack, running_stack, wait_until
from tests.e2e.http_util import get
from tests.e2e.test_observability import scrape
from tests.faultproxy import FaultProxy, fault_proxy
from tests.services import redis_address

pytestmark = [pytest.mark.e2e, pytest.mark.redis]


@pytest.fixture(scope="module", params=["grpc", "http"])
def degraded(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Stack, FaultProxy]]:
    data: Path = tmp_path_factory.mktemp(f"degraded-{request.param}")
    with (
        fault_proxy(*redis_address()) as proxy,
        running_stack(
            data,
            request.param,
            "tiers: {}\n",  # the built-in modes: free fail_closed, starter local, ...
            EXTAUTHZ_COUNTERS_URL=f"redis://127.0.0.1:{proxy.port}/0",
            EXTAUTHZ_REPLICAS="2",
        ) as stack,
    ):
        yield stack, proxy


def degraded_metric(port: int) -> float:
    text = scrape(port)[1]
    line = next(x for x in text.splitlines() if x.startswith("extauthz_counters_degraded "))
    return float(line.split()[1])


def test_each_tier_gets_its_mode_at_the_client_while_redis_is_cut(
    degraded: tuple[Stack, FaultProxy],
) -> None:
    """FREE (fail_closed) gets 503 limits_unavailable; STARTER and PROFESSIONAL (local)
    and ENTERPRISE (fail_open) are served; the metric and /readyz say degraded, and
    when Redis is back it ends and both transitions are audited."""
    stack, proxy = degraded
    keys = {tier: stack.new_key(tier)[2] for tier in TenantTier}
    metrics = stack.ports["metrics_port"]
    for key in keys.values():
        assert get(stack.port, headers=[("x-api-key", key)]).status == 200
    assert degraded_metric(metrics) == 0
    proxy.set("cut")
    try:
        # A cut fails each call at once; the breaker opens once failures have spanned
        # three of its windows (100 ms each): traffic meanwhile follows the tiers' modes.
        def opened() -> bool:
            get(stack.port, headers=[("x-api-key", keys[TenantTier.ENTERPRISE])])
            return degraded_metric(metrics) == 1

        wait_until(opened, 5, step=0.05)
        answers = {}
        for tier, key in keys.items():
            started = time.monotonic()
            reply = get(stack.port, headers=[("x-api-key", key)])
            answers[tier] = (reply.status, time.monotonic() - started, reply)
        free = answers[TenantTier.FREE][2]
        assert free.status == 503
        assert free.headers["retry-after"] == "1"
        # HTTP mode: Envoy replaces an authz 5xx with its own 503, which our configs
        # give the generic reason (envoyproxy/envoy#14001).
        reason = "limits_unavailable" if stack.mode == "grpc" else "authorization_unavailable"
        assert free.json()["error"] == reason
        for tier in (TenantTier.STARTER, TenantTier.PROFESSIONAL, TenantTier.ENTERPRISE):
            assert answers[tier][0] == 200, tier  # local share, local share, fail_open
        assert max(took for _, took, _ in answers.values()) < 0.5
        assert degraded_metric(metrics) == 1
        ready = json.loads(scrape(metrics, "/readyz")[1])
        assert ready["counters"] == {"ok": True, "detail": "redis degraded"}
    finally:
        proxy.set("pass")

    def recovered() -> bool:
        get(stack.port, headers=[("x-api-key", keys[TenantTier.STARTER])])
        return degraded_metric(metrics) == 0

    wait_until(recovered, 10, step=0.2)
    assert get(stack.port, headers=[("x-api-key", keys[TenantTier.FREE])]).status == 200

    def audited() -> list[str]:
        events = stack.runtime.audit.get_events(action=LIMITS_DEGRADED)
        return [e.outcome for e in events]

    wait_until(lambda: audited()[-2:] == ["started", "ended"], 5)
