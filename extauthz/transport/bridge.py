"""gRPC checks over the HTTP service: Envoy's ``grpc_http1_reverse_bridge`` filter.

Envoy's ext_authz speaks gRPC to an internal listener of the same Envoy; that listener's
reverse-bridge filter strips the gRPC frame and sends the CheckRequest to the HTTP
service as one HTTP/1.1 POST with a protobuf body, and frames our protobuf answer back
into a gRPC response (envoyconf.py renders it as ``mode: bridge``). So gRPC checks reach
the HTTP service's event loop instead of grpcio's server and its thread hand-offs.

The HTTP service answers bridged checks only when started for them (``mode: bridge``):
in plain HTTP mode any 200 allows, and a client must never be able to get a 200 that
carries a deny by posting a CheckRequest of its own.
"""

from __future__ import annotations

from envoy.service.auth.v3 import external_auth_pb2 as authz_pb2
from google.protobuf.message import DecodeError

from extauthz.envoybridge import CONTENT_TYPE
from extauthz.model import CheckInput, Decision
from extauthz.transport.grpc_authz import CHECK_METHOD, CheckResponses, to_input

_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: " + CONTENT_TYPE.encode() + b"\r\ncontent-length: "


def read_bridged(method: bytes, path: str, content_type: object, body: bytes) -> CheckInput | None:
    """The check a bridged request carries, or None when it is not one."""
    if method != b"POST" or path != CHECK_METHOD or content_type != CONTENT_TYPE:
        return None
    try:
        request = authz_pb2.CheckRequest.FromString(body)
    except DecodeError:
        return None
    return to_input(request)


def http_answer(message: bytes, keep_alive: bool = True) -> bytes:
    """A CheckResponse as the 200 the filter turns into gRPC status OK and a message."""
    close = b"" if keep_alive else b"\r\nconnection: close"
    return _HEAD + b"%d" % len(message) + close + b"\r\n\r\n" + message


class BridgeAnswers:
    """HTTP answers carrying CheckResponses, encoded as the gRPC adapter encodes them."""

    def __init__(self, denials: dict[str, Decision]) -> None:
        self.responses = CheckResponses()
        self.invalid = http_answer(self.responses(denials["invalid_request"]))
        self.internal_error = http_answer(
            self.responses(denials["internal_error"]), keep_alive=False
        )
        self.overloaded = http_answer(self.responses(denials["overloaded"]))

    def __call__(self, decision: Decision, keep_alive: bool) -> bytes:
        return http_answer(self.responses(decision), keep_alive)
