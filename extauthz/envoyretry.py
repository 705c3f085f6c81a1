"""How the generated Envoy configs survive a sidecar that dies or stops answering:
retries of checks that got no answer, and ejection of an endpoint that keeps failing.
(envoyconf.py puts them on the ext_authz client, or on the bridge's internal route.)
"""

from __future__ import annotations

from typing import Any

# A check that could not reach a sidecar, or whose connection died under it, is tried
# again at once on another endpoint: a replica's death then costs no client a request.
# Never on an answer: a deny (even a 503) is the sidecar's decision. Measured with one
# of three replicas SIGKILLed under load: without this, 917-1,370 of 5,000-8,000
# requests got 503 before the health checks took the dead one out
# (tests/e2e/test_replica_death.py).
RETRY_ON = "connect-failure,refused-stream,reset"
PREVIOUS_HOSTS = (
    "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
)


def retry_policy(timeout: float) -> dict[str, Any]:
    return {
        "retry_on": RETRY_ON,
        "num_retries": 2,
        "retry_host_predicate": [
            {
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": {"@type": PREVIOUS_HOSTS},
            }
        ],
        "host_selection_retry_max_attempts": 5,
        # Envoy's default backoff (25 ms base) let a retried check meet the 0.5 s
        # timeout before it was sent: another endpoint is there at once. The maximum is
        # the check's timeout because ext_authz's clients also end each try after it:
        # at 10 ms, 6 % of gRPC checks under load were cut off, retried and failed.
        "retry_back_off": {"base_interval": "0.001s", "max_interval": f"{timeout}s"},
    }


# An endpoint whose checks failed three times in a row without an answer (refused, reset
# or timed out) is ejected for 10 s, besides the health checks; never for what it
# answered (in HTTP mode a 5xx is a deny, not a failure). Not after one: under a burst a
# single timeout would eject a healthy replica and load the others more. With every
# endpoint ejected Envoy still sends to them (its panic threshold).
OUTLIER_DETECTION = {
    "split_external_local_origin_errors": True,
    "consecutive_local_origin_failure": 3,
    "enforcing_consecutive_local_origin_failure": 100,
    "enforcing_consecutive_5xx": 0,
    "enforcing_consecutive_gateway_failure": 0,
    "enforcing_success_rate": 0,
    "enforcing_failure_percentage": 0,
    "enforcing_local_origin_success_rate": 0,
    "enforcing_failure_percentage_local_origin": 0,
    "interval": "1s",
    "base_ejection_time": "10s",
    "max_ejection_percent": 100,
}
