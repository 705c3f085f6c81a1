"""The access-log receiver over a real gRPC channel: finished requests release their
slot and report the upstream's token usage; junk never breaks the stream."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2

from extauthz.model import Completion
from extauthz.transport.als import AccessLogReceiver, reported_tokens
from extauthz.transport.grpc_authz import GrpcServer

METHOD = "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs"
USAGE = ("x-usage-input-tokens", "x-usage-output-tokens")


def entry(request_id: str, status: int = 200, intermediate: bool = False, **headers: str) -> Any:
    e = accesslog_pb2.HTTPAccessLogEntry()
    e.request.request_id = request_id
    e.response.response_code.value = status
    e.common_properties.intermediate_log_entry = intermediate
    for name, value in headers.items():
        e.response.response_headers[name.replace("_", "-")] = value
    return e


def message(*entries: Any) -> bytes:
    msg = als_pb2.StreamAccessLogsMessage()
    msg.http_logs.log_entry.extend(entries)
    data: bytes = msg.SerializeToString()
    return data


@pytest.fixture
def receiver() -> Iterator[tuple[AccessLogReceiver, list[tuple[str, int | None, int]], Any]]:
    finished: list[tuple[str, int | None, int]] = []
    rcv = AccessLogReceiver(
        lambda batch: finished.extend((d.request_id, d.tokens, d.status) for d in batch), USAGE
    )
    server = GrpcServer([rcv.handler()], workers=2)
    port = server.bind("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    call = channel.stream_unary(METHOD)
    yield rcv, finished, call
    channel.close()
    server.stop(0)


def test_finished_requests_are_reported_with_their_token_usage(receiver: Any) -> None:
    """Each final entry reports (request id, input+output tokens, status); entries
    without usage headers report None; periodic (intermediate) entries are skipped."""
    rcv, finished, call = receiver
    call(
        iter(
            [
                message(entry("a", x_usage_input_tokens="120", x_usage_output_tokens="180")),
                message(entry("b", 429), entry("c", intermediate=True)),
            ]
        ),
        timeout=5,
    )
    assert finished == [("a", 300, 200), ("b", None, 429)]
    assert rcv.entries == 2


def test_requests_ext_authz_denied_are_skipped(receiver: Any) -> None:
    """An entry flagged UAEX (denied by us) held no slot: it is not passed on, so it
    costs the counters nothing."""
    _, finished, call = receiver
    denied = entry("d", 429)
    denied.common_properties.response_flags.unauthorized_details.reason = 1  # EXTERNAL_SERVICE
    call(iter([message(denied, entry("ok"))]), timeout=5)
    assert finished == [("ok", None, 200)]


def test_junk_message_is_invalid_argument(receiver: Any) -> None:
    """Bytes that are not a StreamAccessLogsMessage end that stream with
    INVALID_ARGUMENT, never UNKNOWN; the receiver keeps serving."""
    _, finished, call = receiver
    with pytest.raises(grpc.RpcError) as err:
        call(iter([b"\xff\xff\xff"]), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    call(iter([message(entry("d"))]), timeout=5)
    assert finished == [("d", None, 200)]


def test_a_failing_entry_does_not_strand_the_rest(receiver: Any) -> None:
    """If reading one entry raises, the others of its message still release; if a
    whole batch fails, the next message is still handled."""
    rcv, finished, call = receiver
    original_entry, original_finished = rcv._entry, rcv.finished

    def flaky_entry(e: Any) -> Completion | None:
        if e.request.request_id == "bad":
            raise RuntimeError("boom")
        return original_entry(e)

    def flaky_finished(batch: list[Completion]) -> None:
        if batch[0].request_id == "doomed":
            raise RuntimeError("store down")
        original_finished(batch)

    rcv._entry, rcv.finished = flaky_entry, flaky_finished
    call(
        iter([message(entry("bad"), entry("good")), message(entry("doomed")), message(entry("x"))]),
        timeout=5,
    )
    assert finished == [("good", None, 200), ("x", None, 200)]


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"x-usage-input-tokens": "10"}, 10),
        ({"x-usage-input-tokens": "10", "x-usage-output-tokens": "5"}, 15),
        ({"x-usage-input-tokens": "-1"}, None),
        ({"x-usage-input-tokens": "1e9"}, None),
        ({"x-usage-input-tokens": "७"}, None),
        ({"x-usage-input-tokens": "99999999999999999999"}, None),
        ({"x-usage-input-tokens": "oops", "x-usage-output-tokens": "7"}, 7),
    ],
)
def test_usage_headers_are_read_strictly(headers: dict[str, str], expected: int | None) -> None:
    """Only plain whole numbers count; anything else is ignored (and logged)."""
    assert reported_tokens(headers, USAGE) == expected


def test_latency_bytes_and_split_token_counts_come_from_the_entry() -> None:
    """Latency is Envoy's time to the last byte sent downstream; bytes are headers plus
    body each way; the first usage header is input tokens, the others output."""
    rcv = AccessLogReceiver(lambda batch: None, USAGE)
    e = entry("z", x_usage_input_tokens="7", x_usage_output_tokens="5")
    e.common_properties.time_to_last_downstream_tx_byte.FromMilliseconds(42)
    e.request.request_headers_bytes, e.request.request_body_bytes = 100, 20
    e.response.response_headers_bytes, e.response.response_body_bytes = 80, 300
    e.request.request_headers["x-tenant-id"] = "t_acme"
    done = rcv._entry(e)
    assert done is not None
    assert done.tenant_id == "t_acme"
    assert (done.latency_ms, done.request_bytes, done.response_bytes) == (42.0, 120, 380)
    assert (done.tokens_in, done.tokens_out, done.tokens) == (7, 5, 12)
