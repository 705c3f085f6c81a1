"""The fluentd access-log receiver: forward-mode records into finished requests, and
hostile bytes met with a closed connection, never an exception."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import msgpack
import pytest

from extauthz.model import Completion
from extauthz.transport.fluentd import FluentdReceiver, _Stream, completion, usage_keys

NAMES = ("x-usage-input-tokens", "x-usage-output-tokens")
KEYS = usage_keys(NAMES)
FULL = {
    "id": "r1",
    "s": 200,
    "us": 1500,
    "ms": 1,
    "qh": 100,
    "qb": 20,
    "sh": 80,
    "sb": 3,
    "t": "t_1",
    "h0": "12",
    "r0": None,
    "h1": "34",
    "r1": None,
}


def test_a_record_becomes_the_finished_request_it_describes() -> None:
    """Status, latency (microseconds -> ms), bytes (headers + body), tokens and tenant."""
    assert completion(FULL, KEYS) == Completion("r1", 200, 1.5, 120, 83, 12, 34, "t_1")


def test_trailers_win_over_headers_and_absent_values_count_as_unreported() -> None:
    """A streaming upstream's trailer count is the final one; "-" and null (Envoy's
    absent values) mean "not reported", so the reservation stands."""
    streamed = {**FULL, "h0": "-", "r0": "70", "h1": "5", "r1": "30"}
    done = completion(streamed, KEYS)
    assert done is not None
    assert (done.tokens_in, done.tokens_out) == (70, 30)
    silent = {**FULL, "h0": "-", "h1": None}
    done = completion(silent, KEYS)
    assert done is not None
    assert done.tokens is None


def test_a_client_that_went_away_is_timed_by_duration() -> None:
    """No last byte sent downstream: the microsecond field is absent, DURATION (ms) is
    used."""
    done = completion({**FULL, "us": "-", "ms": 7, "s": 0}, KEYS)
    assert done is not None
    assert (done.latency_ms, done.status) == (7.0, 0)


@pytest.mark.parametrize("request_id", [None, "-", "", 42])
def test_a_record_without_a_request_id_bills_nothing(request_id: object) -> None:
    assert completion({**FULL, "id": request_id}, KEYS) is None


def test_bad_usage_values_are_ignored_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """An upstream's nonsense count is not billed (and never crashes the entry)."""
    with caplog.at_level(logging.WARNING):
        done = completion({**FULL, "h0": "lots", "h1": "-3"}, KEYS)
    assert done is not None
    assert done.tokens is None
    assert "not a whole number" in caplog.text


class FakeTransport:
    def __init__(self) -> None:
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True


def stream_into(batches: list[list[Completion]]) -> tuple[_Stream, FakeTransport]:
    receiver = FluentdReceiver(batches.append, NAMES)
    receiver.loop.close()  # not started: the stream is fed by hand
    stream = _Stream(receiver)
    transport = FakeTransport()
    stream.connection_made(transport)  # type: ignore[arg-type]
    return stream, transport


def test_messages_split_anywhere_across_reads_are_each_handled_once() -> None:
    """Two forward messages, fed one byte at a time: two batches, nothing lost."""
    batches: list[list[Completion]] = []
    stream, transport = stream_into(batches)
    data = msgpack.packb(["extauthz", [[1, FULL]]]) + msgpack.packb(
        ["extauthz", [[1, {**FULL, "id": "r2"}], [1, {**FULL, "id": "r3"}]]]
    )
    for i in range(len(data)):
        stream.data_received(data[i : i + 1])
    assert [[d.request_id for d in b] for b in batches] == [["r1"], ["r2", "r3"]]
    assert not transport.aborted


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n\r\n",  # not msgpack at all
        msgpack.packb({"not": "a list"}),
        msgpack.packb(["extauthz", b"packed-forward-is-not-understood"]),
        msgpack.packb("just a string"),
        b"\xc1" * 10,  # a byte msgpack never uses
    ],
)
def test_bytes_that_are_not_forward_mode_close_the_connection_quietly(
    data: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """Anything but forward-mode messages: one warning, the connection closed (Envoy
    reconnects); no exception leaves the receiver."""
    batches: list[list[Completion]] = []
    stream, transport = stream_into(batches)
    with caplog.at_level(logging.WARNING):
        stream.data_received(data)
    assert transport.aborted
    assert batches == []
    assert "not Fluentd forward mode" in caplog.text


def test_a_grpc_access_log_stream_sent_here_is_named_as_such(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Envoy configured for the gRPC access-log service against a fluentd receiver (the
    two settings disagree): an error that says which setting to fix."""
    batches: list[list[Completion]] = []
    stream, transport = stream_into(batches)
    with caplog.at_level(logging.ERROR):
        stream.data_received(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    assert transport.aborted
    assert "EXTAUTHZ_ACCESS_LOG=grpc" in caplog.text


def test_a_bad_entry_is_skipped_and_its_neighbours_are_billed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An entry that is not [time, record] is logged and skipped; the others in the
    same message still count."""
    batches: list[list[Completion]] = []
    stream, transport = stream_into(batches)
    entries: list[Any] = [[1, FULL], "nonsense", [1, {**FULL, "id": "r9"}]]
    stream.data_received(msgpack.packb(["extauthz", entries]))
    assert [d.request_id for d in batches[0]] == ["r1", "r9"]
    assert not transport.aborted


def test_an_oversized_message_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    """A message over the 16 MB bound closes the connection instead of growing the
    buffer without end."""
    batches: list[list[Completion]] = []
    stream, transport = stream_into(batches)
    header = b"\x92\xa8extauthz\xdd" + (5_000_000).to_bytes(4, "big")  # array32 of 5M
    stream.data_received(header)
    for _ in range(20):
        if transport.aborted:
            break
        stream.data_received(b"\x92\x01\x80" * 400_000)  # [1, {}] entries, 1.2 MB each
    assert transport.aborted


def test_the_receiver_listens_answers_envoys_bytes_and_stops() -> None:
    """Started on a free port, it handles a forward message sent over TCP, then stops
    within its linger."""
    batches: list[list[Completion]] = []
    receiver = FluentdReceiver(batches.append, NAMES)
    port = receiver.start("127.0.0.1", 0)

    async def send() -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(msgpack.packb(["extauthz", [[1, FULL]]]))
        await writer.drain()
        for _ in range(100):
            if batches:
                break
            await asyncio.sleep(0.01)
        writer.close()

    asyncio.run(send())
    receiver.stop(0.1)
    assert [d.request_id for b in batches for d in b] == ["r1"]
