"""The Envoy side of ``mode: bridge`` (see transport/bridge.py): ext_authz speaks gRPC to
an internal listener of the same Envoy, whose ``grpc_http1_reverse_bridge`` filter
hands each CheckRequest to the sidecar's HTTP service as one HTTP/1.1 POST.

An internal listener is a user-space socket inside Envoy: the extra hop costs no
system calls and no port.
"""

from __future__ import annotations

from typing import Any

CONTENT_TYPE = "application/grpc+proto"  # what the filter sends, and expects back
NAME = "extauthz_bridge"  # the internal listener, and the cluster that reaches it
INTERNAL_LISTENER = {
    "name": "envoy.bootstrap.internal_listener",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3."
        "InternalListener"
    },
}
_BRIDGE = (
    "type.googleapis.com/envoy.extensions.filters.http.grpc_http1_reverse_bridge.v3.FilterConfig"
)


def cluster(http_options: str) -> dict[str, Any]:
    """The gRPC (HTTP/2) cluster ext_authz calls: the internal listener."""
    internal = {"envoy_internal_address": {"server_listener_name": NAME}}
    return {
        "name": NAME,
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": NAME,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": internal}}]}],
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": http_options,
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
    }


def listener(
    hcm_type: str, router_type: str, timeout: float, retry: dict[str, Any]
) -> dict[str, Any]:
    """The internal listener: gRPC in, the HTTP service's ``extauthz`` cluster out, a
    check that could not reach a sidecar retried on another (``retry``)."""
    hcm = {
        "@type": hcm_type,
        "stat_prefix": NAME,
        "codec_type": "HTTP2",
        "route_config": {
            "name": NAME,
            "virtual_hosts": [
                {
                    "name": NAME,
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            "route": {
                                "cluster": "extauthz",
                                "timeout": f"{timeout}s",
                                "retry_policy": retry,
                            },
                        }
                    ],
                }
            ],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.grpc_http1_reverse_bridge",
                "typed_config": {
                    "@type": _BRIDGE,
                    "content_type": CONTENT_TYPE,
                    # The sidecar gets the bare CheckRequest and answers a bare
                    # CheckResponse; the filter adds and removes the gRPC framing.
                    "withhold_grpc_frames": True,
                },
            },
            {"name": "envoy.filters.http.router", "typed_config": {"@type": router_type}},
        ],
    }
    manager = {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
    return {"name": NAME, "internal_listener": {}, "filter_chains": [{"filters": [manager]}]}
