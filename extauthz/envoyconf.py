"""Renders the Envoy bootstrap that puts ext_authz in front of an upstream.

``envoy/envoy.yaml`` in the repository is this function's output for the default
addresses (a test keeps them equal), so what `extauthz up` runs and what users copy
are one config.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import yaml

from extauthz import envoybridge
from extauthz.envoyretry import OUTLIER_DETECTION, retry_policy
from extauthz.errors import ConfigError

HCM = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
    "HttpConnectionManager"
)
EXT_AUTHZ = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
AUTHZ_SERVICE = "envoy.service.auth.v3.Authorization"
ALS = "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig"
FLUENTD = "type.googleapis.com/envoy.extensions.access_loggers.fluentd.v3.FluentdAccessLogConfig"
HTTP_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _cluster(
    name: str,
    endpoints: list[tuple[str, int]],
    http2: bool,
    *,
    health: dict[str, Any] | None = None,
    burst: bool = False,
    trailers: bool = False,
) -> dict[str, Any]:
    is_ip = True
    for host, _ in endpoints:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            is_ip = False
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC" if is_ip else "STRICT_DNS",
        "connect_timeout": "1s",
        # `localhost` and like names: the IPv4 address when there is one (Envoy's own
        # default tries IPv6 first, and a backend on 127.0.0.1 then never answers).
        **({} if is_ip else {"dns_lookup_family": "V4_PREFERRED"}),
        "lb_policy": "ROUND_ROBIN",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": _address(h, p)}} for h, p in endpoints]}
            ],
        },
    }
    if health is not None:
        # An endpoint that fails (or is stopping: it answers NOT_SERVING) leaves the
        # rotation within a couple of seconds instead of failing checks with 503s.
        cluster["health_checks"] = [
            {
                "timeout": "0.5s",
                "interval": "1s",
                "unhealthy_threshold": 2,
                "healthy_threshold": 1,
                # Envoy's default (60 s) also applies after the first check if that ran
                # before any traffic: a replica that dies then stays in rotation for up
                # to a minute (envoyproxy/envoy#16724). Found by the replica-kill test.
                "no_traffic_interval": "1s",
                **health,
            }
        ]
    if burst:
        # Envoy's default circuit breaker (1,024 requests, pending requests and
        # connections) fails checks past it with a bare error. Measured: 2,000
        # concurrent clients lost 572 (gRPC) and 741 (HTTP) checks to it. Let a burst
        # queue for the sidecar instead, which answers each one, with `overloaded` if
        # need be; what still fails gets the local reply below.
        cluster["circuit_breakers"] = {
            "thresholds": [
                {
                    "max_connections": 1024,
                    "max_pending_requests": 100_000,
                    "max_requests": 100_000,
                    # Retries (see RETRY_ON) at once: Envoy's default allows 3, fewer
                    # than the checks a dying replica can have in flight. At least 10,
                    # or a fifth of what is in flight, so a mass failure is not doubled.
                    "retry_budget": {
                        "budget_percent": {"value": 20.0},
                        "min_retry_concurrency": 10,
                    },
                }
            ]
        }
    if trailers:
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": HTTP_OPTIONS,
                "explicit_http_config": {"http_protocol_options": {"enable_trailers": True}},
            }
        }
    if http2:
        # Without HTTP/2 a gRPC cluster passes `envoy --mode validate` but every check
        # fails at runtime (403 for everything, nothing logged at warning level).
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": HTTP_OPTIONS,
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    return cluster


# What Envoy forwards to the sidecar besides method, path and host. Fewer headers means
# less work per check; tenant identity headers are never forwarded (they come from us).
# x-envoy-external-address is the client address Envoy trusts (with use_remote_address);
# the last x-forwarded-for hop is not: for loopback clients Envoy appends its own address.
# traceparent (W3C) and B3 let our span join the request's trace, and audit events
# carry its trace id.
FORWARDED = (
    "x-request-id",
    "x-envoy-external-address",
    "x-forwarded-for",
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
)
UPSTREAM_HEADERS = ("x-tenant-id", "x-tenant-tier", "x-api-key-id")
RATELIMIT_HEADERS = ("ratelimit-policy", "ratelimit")
CLIENT_HEADERS = (
    "content-type",
    "cache-control",
    "www-authenticate",
    "retry-after",
    *RATELIMIT_HEADERS,
)
USAGE_HEADERS = ("x-usage-input-tokens", "x-usage-output-tokens")
# Headers ext_authz itself sets as signals to the upstream (a check that failed open; a
# body cut short). We never fail open nor send partial bodies, so any copy the upstream
# could see was sent by the client: removed by the router, after ext_authz has run.
# (The identity headers are not here: our allow answer overwrites them, and a public
# route's answer removes them.)
ENVOY_SIGNALS = ("x-envoy-auth-failure-mode-allowed", "x-envoy-auth-partial-body")


# Envoy's own answer when a check fails (the sidecar down, too slow, or past a circuit
# breaker; in HTTP-service mode also any 5xx the sidecar sends): instead of an empty
# 503, a JSON reason and Retry-After like every deny of ours. Matched by the reply's
# details, so the sidecar's own denials ("ext_authz_denied") keep their bodies.
AUTHZ_UNAVAILABLE: dict[str, Any] = {
    "filter": {
        "extension_filter": {
            "name": "envoy.access_loggers.extension_filters.cel",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3."
                "ExpressionFilter",
                "expression": "response.code_details == 'ext_authz_error'",
            },
        }
    },
    "headers_to_add": [
        {
            "header": {"key": "retry-after", "value": "1"},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
        },
        {
            "header": {"key": "cache-control", "value": "no-store"},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
        },
    ],
    "body": {
        "inline_string": '{"error": "authorization_unavailable", "message": "Authorization '
        'is temporarily unavailable; retry shortly."}'
    },
    "body_format_override": {
        # text_format_source, not text_format: Envoy 1.40 warns the latter is deprecated.
        "text_format_source": {"inline_string": "%LOCAL_REPLY_BODY%"},
        "content_type": "application/json",
    },
}


def _matchers(names: tuple[str, ...]) -> dict[str, Any]:
    return {"patterns": [{"exact": n, "ignore_case": True} for n in names]}


def render(
    *,
    listen: tuple[str, int],
    upstream: tuple[str, int],
    authz: list[tuple[str, int]],
    admin: tuple[str, int] = ("127.0.0.1", 9901),
    timeout: float = 0.5,
    mode: str = "grpc",
    key_headers: tuple[str, ...] = ("x-api-key", "authorization"),
    als: list[tuple[str, int]] | None = None,
    token_header: str | None = "x-max-tokens",  # noqa: S107 - a header name, not a secret
    usage_headers: tuple[str, ...] = USAGE_HEADERS,
    body_bytes: int | None = None,
    access_log: str = "grpc",
) -> dict[str, Any]:
    """An Envoy bootstrap: ``listen`` -> ext_authz (``mode`` grpc or http) -> ``upstream``,
    with every finished request reported to ``als`` (extauthz's access-log receiver;
    omit it only to run without concurrency release and token settling). ``body_bytes``
    sends request bodies up to that size to ext_authz (for a ``max_tokens`` body field);
    larger bodies get 413 from Envoy."""
    forwarded = key_headers + FORWARDED + ((token_header,) if token_header else ())
    ext_authz: dict[str, Any] = {
        "transport_api_version": "V3",
        # Explicit, although these are Envoy's defaults: a failed or timed-out check
        # must never let a request through.
        "failure_mode_allow": False,
        "status_on_error": {"code": "ServiceUnavailable"},
        "allowed_headers": _matchers(tuple(dict.fromkeys(forwarded))),
    }
    if body_bytes is not None:
        ext_authz["with_request_body"] = {
            "max_request_bytes": body_bytes,
            # A cut-off body could hide its max_tokens: refuse it (413) instead.
            "allow_partial_message": False,
            "pack_as_bytes": True,
        }
    if mode in ("grpc", "bridge"):
        ext_authz["grpc_service"] = {
            "envoy_grpc": {"cluster_name": "extauthz" if mode == "grpc" else envoybridge.NAME},
            "timeout": f"{timeout}s",
            # Bridge: the internal listener's route retries (envoybridge.py).
            **({"retry_policy": retry_policy(timeout)} if mode == "grpc" else {}),
        }
    elif mode == "http":
        host, port = authz[0]
        ext_authz["http_service"] = {
            "server_uri": {
                "uri": f"http://{host}:{port}",
                "cluster": "extauthz",
                "timeout": f"{timeout}s",
            },
            "authorization_response": {
                # Set on the upstream request, replacing any client-sent copy.
                "allowed_upstream_headers": _matchers(UPSTREAM_HEADERS),
                "allowed_client_headers": _matchers(CLIENT_HEADERS),
                "allowed_client_headers_on_success": _matchers(RATELIMIT_HEADERS),
            },
            "retry_policy": retry_policy(timeout),
        }
    else:
        raise ConfigError(f"Envoy config mode must be grpc, http or bridge, not {mode!r}")
    hcm = {
        "@type": HCM,
        "stat_prefix": "ingress",
        # Envoy is the edge: it sets x-forwarded-for from the peer and generates
        # x-request-id itself, so a client can never choose either.
        "use_remote_address": True,
        "preserve_external_request_id": False,
        # Route rules and the upstream see one canonical path: no //admin or /a/../admin.
        "normalize_path": True,
        "merge_slashes": True,
        "path_with_escaped_slashes_action": "UNESCAPE_AND_REDIRECT",
        # HTTP/1 drops trailers unless asked: a streaming upstream's token counts come
        # as trailers, for the client and for the access log (below, and on the cluster).
        "http_protocol_options": {"enable_trailers": True},
        **({"access_log": [_access_log(usage_headers, access_log)]} if als else {}),
        "local_reply_config": {"mappers": [AUTHZ_UNAVAILABLE]},
        "route_config": {
            "name": "local",
            "request_headers_to_remove": list(ENVOY_SIGNALS),
            "virtual_hosts": [
                {
                    "name": "upstream",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}],
                }
            ],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.ext_authz",
                "typed_config": {"@type": EXT_AUTHZ, **ext_authz},
            },
            {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}},
        ],
    }
    config: dict[str, Any] = {
        # The admin interface can stop Envoy and dump its config: loopback only.
        "admin": {"address": _address(*admin)},
        "static_resources": {
            "listeners": [
                {
                    "name": "ingress",
                    "address": _address(*listen),
                    # Envoy's default (SO_REUSEPORT) lets a second Envoy bind the same
                    # port and silently take half the traffic; off, it fails to start.
                    "enable_reuse_port": False,
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                _cluster("upstream", [upstream], http2=False, trailers=True),
                {
                    **_cluster(
                        "extauthz",
                        authz,
                        http2=mode == "grpc",
                        burst=True,
                        # grpc.health.v1 on the Check port; the HTTP-service port answers
                        # every path as a check, so there only the connection is tested.
                        health={"grpc_health_check": {"service_name": AUTHZ_SERVICE}}
                        if mode == "grpc"
                        else {"tcp_health_check": {}},
                    ),
                    "outlier_detection": OUTLIER_DETECTION,
                },
                # The gRPC access-log service speaks HTTP/2; fluentd is a plain TCP stream.
                *([_cluster("extauthz_als", als, http2=access_log == "grpc")] if als else []),
            ],
        },
    }
    if mode == "bridge":
        config["bootstrap_extensions"] = [envoybridge.INTERNAL_LISTENER]
        resources = config["static_resources"]
        resources["listeners"].append(
            envoybridge.listener(HCM, ROUTER, timeout, retry_policy(timeout))
        )
        bridge = envoybridge.cluster(HTTP_OPTIONS)
        bridge["circuit_breakers"] = resources["clusters"][1]["circuit_breakers"]
        resources["clusters"].append(bridge)
    return config


def _access_log(usage_headers: tuple[str, ...], protocol: str = "grpc") -> dict[str, Any]:
    if protocol == "fluentd":
        from extauthz.transport.fluentd import record_format

        return {
            "name": "envoy.access_loggers.fluentd",
            "typed_config": {
                "@type": FLUENTD,
                "cluster": "extauthz_als",
                "tag": "extauthz",
                "stat_prefix": "extauthz_access_log",
                # As for the gRPC stream below: a finished request frees its slot quickly.
                "buffer_flush_interval": "0.005s",
                # Only what extauthz reads (transport/fluentd.py), as plain values.
                "record": record_format(usage_headers),
            },
        }
    return {
        "name": "envoy.access_loggers.http_grpc",
        "typed_config": {
            "@type": ALS,
            "common_config": {
                "log_name": "extauthz",
                "transport_api_version": "V3",
                "grpc_service": {"envoy_grpc": {"cluster_name": "extauthz_als"}},
                # Envoy's default is 1 s: a finished request would hold its concurrency
                # slot that long, and a quick sequential client would see false 429s.
                # At 0.02 s the lag was ~20 ms and still caused some; 5 ms: ~10 ms.
                "buffer_flush_interval": "0.005s",
            },
            # The upstream's usage report, to settle reserved tokens: in its response
            # headers, or in trailers when it streams and knows the count only at the end.
            "additional_response_headers_to_log": list(usage_headers),
            "additional_response_trailers_to_log": list(usage_headers),
            # The tenant our allow answer set: shared counters find the lease by it.
            "additional_request_headers_to_log": [UPSTREAM_HEADERS[0]],
        },
    }


def to_yaml(config: dict[str, Any]) -> str:
    header = (
        "# Generated by `extauthz envoy-config`; edit the addresses to fit your deployment.\n"
        "# Envoy -> ext_authz (gRPC, HTTP/2) -> upstream. See docs/envoy.md.\n"
    )
    return header + yaml.safe_dump(config, sort_keys=False, width=120)
