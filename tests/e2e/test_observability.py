"""A running sidecar under traffic through Envoy, seen the way operators see it: a
Prometheus scrape (checked by promtool), health endpoints, grpc.health.v1."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extauthz.keys import generate_key
from extauthz.model import TenantTier
from tests.e2e.conftest import Stack, running_stack, wait_until
from tests.e2e.http_util import get

pytestmark = pytest.mark.e2e
POLICY = "tenants:\n  t_lim: {rate_limit: {requests_per_minute: 1, burst: 1}}\n"
METRICS = [
    "extauthz_requests_total",
    "extauthz_latency_seconds_bucket",
    "extauthz_active_requests",
    "extauthz_decisions_total",
    "extauthz_check_duration_seconds_bucket",
    "extauthz_key_cache_lookups_total",
    "extauthz_limit_denials_total",
    "extauthz_queue_depth",
    "extauthz_queue_dropped_total",
    "extauthz_queue_spilled_total",
    "extauthz_store_lookup_seconds_bucket",
    "extauthz_policy_info",
    "extauthz_policy_reloads_total",
    "extauthz_revocation_propagation_seconds_bucket",
    "extauthz_build_info",
    "extauthz_quota_used_ratio",
    "extauthz_concurrency_slots_held",
    "extauthz_queue_written_total",
]


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, int, int]]:
    data = tmp_path_factory.mktemp("observed")
    with running_stack(data, "grpc", POLICY, EXTAUTHZ_TRACE_EXPORTER="console") as stack:
        yield stack, stack.ports["metrics_port"], stack.ports["grpc_port"]


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_a_scrape_under_traffic_has_every_metric_with_sane_values(
    observed: tuple[Stack, int, int],
) -> None:
    stack, port, _ = observed
    tenant = stack.runtime.tenants.create_tenant("m", TenantTier.STARTER)
    key_id, key = stack.runtime.keys.create_key(tenant.id)
    for _ in range(10):
        assert get(stack.port, "/hello", [("x-api-key", key)]).status == 200
    get(stack.port, "/hello", [("x-api-key", generate_key())])
    stack.runtime.tenants.create_tenant("lim", TenantTier.FREE, "t_lim")
    limited = stack.runtime.keys.create_key("t_lim")[1]
    get(stack.port, "/hello", [("x-api-key", limited)])
    get(stack.port, "/hello", [("x-api-key", limited)])
    assert stack.cli("keys", "revoke", key_id).returncode == 0
    wait_until(lambda: get(stack.port, "/hello", [("x-api-key", key)]).status == 401, 3)

    def text() -> str:
        return scrape(port)[1]

    def sample(body: str, name: str) -> float:
        line = next((x for x in body.splitlines() if x.startswith(name + " ")), f"{name} 0")
        return float(line.split()[-1])

    # Every change to tenants or keys in another process is timed to this cache.
    wait_until(lambda: sample(text(), "extauthz_revocation_propagation_seconds_count") >= 1, 3)
    body = text()
    assert sample(body, "extauthz_revocation_propagation_seconds_sum") < 5
    assert sample(body, "extauthz_store_lookup_seconds_count") >= 2
    for name in METRICS:
        assert name in body, name
    assert (
        f'extauthz_requests_total{{endpoint="other",status="200",tenant="{tenant.id}"}} 10.0'
        in body
    )
    assert 'extauthz_decisions_total{reason="unknown_key",result="deny"} 1.0' in body
    assert 'extauthz_limit_denials_total{limit="rate_limited",mode="enforced"} 1.0' in body
    assert 'extauthz_check_duration_seconds_count{transport="grpc"}' in body
    for secret in (key, limited):
        assert secret not in body


def test_promtool_accepts_the_scrape(observed: tuple[Stack, int, int]) -> None:
    """`promtool check metrics` (Prometheus's own linter) passes on a real scrape."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (CI installs the prometheus package)")
    _, port, _ = observed
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=scrape(port)[1],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_health_endpoints_and_grpc_health(observed: tuple[Stack, int, int]) -> None:
    """/healthz 200; /readyz 200 with each check named; grpc.health.v1 SERVING for the
    Check service; 404 elsewhere."""
    _, port, grpc_port = observed
    assert scrape(port, "/healthz") == (200, "ok\n")
    status, body = scrape(port, "/readyz")
    assert status == 200
    assert {name for name, check in json.loads(body).items() if check["ok"]} == {
        "store",
        "counters",
        "policy",
        "transports",
    }
    assert scrape(port, "/nope")[0] == 404
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "envoy.service.auth.v3.Authorization"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_our_span_joins_the_trace_envoy_forwards(observed: tuple[Stack, int, int]) -> None:
    """A request carrying a W3C traceparent through the real Envoy: the sidecar's
    extauthz.check span (console exporter, JSON on stderr) has that trace id and the
    caller's span as its parent, and tenant/key ids but never the key."""
    stack, _, _ = observed
    trace_id, parent = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    _, key_id, key = stack.new_key()
    reply = get(
        stack.port, "/hello", [("x-api-key", key), ("traceparent", f"00-{trace_id}-{parent}-01")]
    )
    assert reply.status == 200

    def span() -> dict[str, object] | None:
        for line in stack.log.read_text().splitlines():
            if line.startswith("{") and trace_id in line and '"extauthz.check"' in line:
                found: dict[str, object] = json.loads(line)
                return found
        return None

    wait_until(lambda: span() is not None, 5)
    found = span()
    assert found is not None
    assert found["context"]["trace_id"] == f"0x{trace_id}"  # type: ignore[index]
    assert found["parent_id"] == f"0x{parent}"
    assert found["attributes"]["extauthz.key_id"] == key_id  # type: ignore[index]
    assert key not in stack.log.read_text()
