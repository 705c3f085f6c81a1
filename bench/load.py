"""Load generators (wrk, h2load) and CPU accounting from /proc."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

SETUP_HINT = (
    "the benchmark needs wrk and h2load: install them with\n"
    "    sudo apt-get install -y wrk nghttp2-client"
)


def require_tools() -> None:
    missing = [t for t in ("wrk", "h2load") if shutil.which(t) is None]
    if missing:
        raise SystemExit(f"bench: {', '.join(missing)} not found; {SETUP_HINT}")


@dataclass
class LoadResult:
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    bad: int  # non-2xx responses plus socket errors


_UNIT = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if match is None:
        raise ValueError(f"cannot parse latency {text!r}")
    return float(match.group(1)) * _UNIT[match.group(2)]


def wrk(
    url: str,
    seconds: float,
    headers: dict[str, str],
    connections: int = 16,
    delay_ms: float | None = None,
) -> LoadResult:
    """Closed-loop load; with ``delay_ms`` each connection pauses that long between
    requests, which holds the rate near ``connections * 1000 / delay_ms`` per second."""
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency"]
    for name, value in headers.items():
        cmd += ["-H", f"{name}: {value}"]
    script = None
    if delay_ms is not None:
        script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)  # noqa: SIM115
        script.write(f"function delay() return {delay_ms} end\n")
        script.close()
        cmd += ["-s", script.name]
    try:
        out = subprocess.run(
            [*cmd, url], capture_output=True, text=True, timeout=seconds + 60, check=True
        ).stdout
    finally:
        if script is not None:
            os.unlink(script.name)
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    bad = 0
    if match := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        bad += int(match.group(1))
    if match := re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    ):
        bad += sum(int(g) for g in match.groups())
    return LoadResult(requests, rps, p50, p99, bad)


def h2load_grpc(
    url: str, body: bytes, seconds: float, clients: int = 4, streams: int = 16
) -> LoadResult:
    """gRPC unary load over HTTP/2: ``body`` is one length-prefixed gRPC message."""
    with tempfile.NamedTemporaryFile(suffix=".bin") as data:
        Path(data.name).write_bytes(body)
        out = subprocess.run(
            [
                "h2load",
                "-c",
                str(clients),
                "-m",
                str(streams),
                "-D",
                str(max(1, round(seconds))),
                "-d",
                data.name,
                "-H",
                "content-type: application/grpc",
                "-H",
                "te: trailers",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=True,
        ).stdout
    done = int(re.search(r"requests: \d+ total, \d+ started, (\d+) done", out).group(1))  # type: ignore[union-attr]
    ok = int(re.search(r"status codes: (\d+) 2xx", out).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))  # type: ignore[union-attr]
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+(\S+)", out)
    p50 = _ms(mean.group(1)) if mean else 0.0  # h2load gives mean, not percentiles
    return LoadResult(done, rps, p50, 0.0, done - ok)


def grpc_frame(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(4, "big") + message


def check_request(key: str, path: str = "/bench") -> bytes:
    """A serialised CheckRequest shaped like the ones our Envoy configs send."""
    from envoy.service.auth.v3 import attribute_context_pb2 as ctx_pb2
    from envoy.service.auth.v3 import external_auth_pb2 as authz_pb2

    http = ctx_pb2.AttributeContext.HttpRequest(
        method="GET",
        path=path,
        host="bench",
        id="r1",
        headers={
            "x-api-key": key,
            ":authority": "bench",
            ":method": "GET",
            ":path": path,
            "x-request-id": "r1",
            "x-forwarded-for": "127.0.0.1",
        },
    )
    request = authz_pb2.CheckRequest(
        attributes=ctx_pb2.AttributeContext(request=ctx_pb2.AttributeContext.Request(http=http))
    )
    data: bytes = request.SerializeToString()
    return data


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and all its descendants (threads included)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for proc in _tree(pid):
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """Each thread of ``pid``: its name (extauthz names its own, extauthz/threadnames.py)
    and its user + system CPU so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[str, float]] = {}
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        out[int(task.name)] = (name, (int(fields[11]) + int(fields[12])) / ticks)
    return out


# Thread names grouped for the bench's CPU split: the access-log stream, the usage and
# audit writers, and everything else (checks, grpcio's own threads, the event loop).
THREAD_GROUPS = {"extauthz-als": "als", "extauthz-usage": "writers", "extauthz-audit": "writers"}


def cpu_by_group(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]
) -> dict[str, float]:
    """CPU seconds spent between two :func:`thread_cpu` readings, per group."""
    groups = {"als": 0.0, "writers": 0.0, "checks": 0.0}
    for tid, (name, seconds) in after.items():
        spent = seconds - before.get(tid, (name, 0.0))[1]
        groups[THREAD_GROUPS.get(name, "checks")] += spent
    return groups


def context_switches(pid: int) -> int:
    """Voluntary context switches of every thread of ``pid`` and its descendants: each
    is a thread going to sleep (on I/O, a lock or the GIL) and being woken again, which
    on the bench's VM costs several microseconds of CPU (docs/benchmarks.md)."""
    total = 0
    for proc in _tree(pid):
        try:
            tasks = list((proc / "task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                status = (task / "status").read_text()
            except OSError:
                continue
            total += int(status.split("voluntary_ctxt_switches:", 1)[1].split()[0])
    return total


def _tree(pid: int) -> list[Path]:
    """/proc entries of ``pid`` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(Path("/proc") / str(current))
        todo += children.get(current, [])
    return found
