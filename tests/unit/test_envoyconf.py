"""The rendered Envoy config's failure handling, read as data (real Envoy runs it in
tests/e2e: test_lifecycle, test_replica_death)."""

from __future__ import annotations

from typing import Any

import pytest

from extauthz.envoyconf import render


def _config(mode: str, timeout: float = 0.5) -> dict[str, Any]:
    return render(
        listen=("127.0.0.1", 8080),
        upstream=("127.0.0.1", 8000),
        authz=[("127.0.0.1", 9001), ("127.0.0.1", 9011)],
        mode=mode,
        timeout=timeout,
    )


def _retry(config: dict[str, Any], mode: str) -> dict[str, Any]:
    resources = config["static_resources"]
    if mode == "bridge":
        hcm = resources["listeners"][1]["filter_chains"][0]["filters"][0]["typed_config"]
        route: dict[str, Any] = hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
        return dict(route["retry_policy"])
    hcm = resources["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    ext_authz = hcm["http_filters"][0]["typed_config"]
    service = ext_authz["grpc_service" if mode == "grpc" else "http_service"]
    return dict(service["retry_policy"])


@pytest.mark.parametrize("mode", ["grpc", "http", "bridge"])
def test_checks_are_retried_only_when_no_answer_came(mode: str) -> None:
    """Retries on connect failure and reset, on another endpoint; never on a status (in
    HTTP mode a 5xx is a deny)."""
    retry = _retry(_config(mode), mode)
    assert retry["retry_on"] == "connect-failure,refused-stream,reset"
    assert retry["num_retries"] == 2
    assert retry["retry_host_predicate"][0]["name"] == "envoy.retry_host_predicates.previous_hosts"


@pytest.mark.parametrize("mode", ["grpc", "http", "bridge"])
def test_the_retry_backoff_never_cuts_a_check_short(mode: str) -> None:
    """ext_authz's clients end each try after the backoff's maximum: at 10 ms, 6 % of gRPC
    checks under load were cut off and retried (a check decided twice). The maximum is
    the check's own timeout."""
    retry = _retry(_config(mode, timeout=0.75), mode)
    assert retry["retry_back_off"] == {"base_interval": "0.001s", "max_interval": "0.75s"}


@pytest.mark.parametrize("mode", ["grpc", "http", "bridge"])
def test_only_failures_without_an_answer_eject_a_sidecar(mode: str) -> None:
    """Outlier detection counts refused, reset and timed-out checks (three in a row), and
    never the statuses a sidecar answers."""
    cluster = next(
        c for c in _config(mode)["static_resources"]["clusters"] if c["name"] == "extauthz"
    )
    detection = cluster["outlier_detection"]
    assert detection["split_external_local_origin_errors"] is True
    assert detection["consecutive_local_origin_failure"] == 3
    for answered in ("consecutive_5xx", "consecutive_gateway_failure", "success_rate"):
        assert detection[f"enforcing_{answered}"] == 0, answered
