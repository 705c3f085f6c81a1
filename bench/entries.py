"""In-process cost of one access-log entry, per transport (no network, no Envoy):

    python -m bench.entries [--n 20000]

Each run allows ``n`` checks (memory counters, SQLite), then reports them finished in
batches of 10 (Envoy's batches at a few thousand requests a second) through the gRPC
access-log receiver (protobuf bytes in) and the fluentd receiver (msgpack bytes in):
decode, release the slot, settle the tokens, queue the usage record. The records are
written afterwards, outside the timing (the writer thread's own cost is the bench's
`writers` column).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
from envoy.service.accesslog.v3 import als_pb2

from extauthz.app import Runtime
from extauthz.model import CheckInput, TenantTier
from extauthz.settings import Settings
from extauthz.sidecar import Sidecar
from extauthz.transport.fluentd import FluentdReceiver, _Stream

BATCH = 10
POLICY = """
tenants:
  t:
    requests_per_day: 1000000000000
    concurrent: 1000000000
    rate_limit: {requests_per_minute: 1000000000000, burst: 1000000000}
"""


def grpc_message(ids: list[str]) -> bytes:
    message = als_pb2.StreamAccessLogsMessage()
    for request_id in ids:
        entry = message.http_logs.log_entry.add()
        entry.request.request_id = request_id
        entry.request.request_headers["x-tenant-id"] = "t"
        entry.response.response_code.value = 200
        entry.response.response_headers["x-usage-input-tokens"] = "12"
        entry.response.response_headers["x-usage-output-tokens"] = "34"
        entry.common_properties.time_to_last_downstream_tx_byte.nanos = 1_500_000
    return message.SerializeToString()


def fluentd_message(ids: list[str]) -> bytes:
    entries = [
        [
            int(time.time()),
            {
                "id": request_id,
                "s": 200,
                "us": 1500,
                "ms": 1,
                "qh": 120,
                "qb": 0,
                "sh": 80,
                "sb": 3,
                "t": "t",
                "h0": "12",
                "r0": None,
                "h1": "34",
                "r1": None,
            },
        ]
        for request_id in ids
    ]
    packed: bytes = msgpack.packb(["extauthz", entries])
    return packed


def _with_leases(
    tmp: Path,
    n: int,
    encode: Callable[[list[str]], bytes],
    deliver: Callable[[Sidecar, bytes], None],
) -> float:
    """Microseconds per entry for ``deliver`` over n allowed requests (the messages are
    encoded beforehand: Envoy's work, not ours)."""
    policy = tmp / "policy.yaml"
    policy.write_text(POLICY)
    runtime = Runtime.open(Settings(data_dir=tmp, policy_file=policy, metrics_addr="off"))
    try:
        runtime.tenants.create_tenant("t", TenantTier.STARTER, "t")
        key = runtime.keys.create_key("t")[1]
        sidecar = Sidecar(runtime)
        headers = {"x-api-key": key}
        ids = [f"r{i}" for i in range(n)]
        for request_id in ids:
            sidecar.authorizer.check(CheckInput("GET", "/v1", headers, request_id=request_id))
        messages = [encode(ids[i : i + BATCH]) for i in range(0, n, BATCH)]
        started = time.perf_counter()
        for message in messages:
            deliver(sidecar, message)
        spent = time.perf_counter() - started
        if runtime.counters.leases_held():
            raise RuntimeError("an entry did not free its slot")
        runtime.flush()
        return spent / n * 1e6
    finally:
        runtime.close()


def measure(n: int = 20000) -> dict[str, float]:
    def over_grpc(sidecar: Sidecar, message: bytes) -> None:
        sidecar.als.stream(iter([message]), None)  # type: ignore[arg-type]

    def over_fluentd(sidecar: Sidecar, message: bytes) -> None:
        stream = streams.get(id(sidecar))
        if stream is None:
            receiver = FluentdReceiver(sidecar._finished, sidecar.runtime.settings.usage_headers)
            stream = streams[id(sidecar)] = _Stream(receiver)
        stream.data_received(message)

    streams: dict[int, Any] = {}
    out = {}
    for name, encode, deliver in (
        ("grpc", grpc_message, over_grpc),
        ("fluentd", fluentd_message, over_fluentd),
    ):
        with tempfile.TemporaryDirectory(prefix="extauthz-bench-") as tmp:
            out[f"access_log_entry_{name}_us"] = _with_leases(Path(tmp), n, encode, deliver)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--n", type=int, default=20000)
    args = parser.parse_args()
    print(json.dumps(measure(args.n), indent=2))


if __name__ == "__main__":
    main()
