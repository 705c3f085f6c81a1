"""`python -m bench.servers`: the HTTP-service candidates alone, no Envoy.

Runs wrk straight at (1) `extauthz serve --mode http` (httptools on uvloop) and
(2) the same core as an RSGI app on granian (`pip install granian`), in interleaved
rounds, and prints checks/s and CPU microseconds per check for each.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.load import cpu_seconds, require_tools, wrk
from bench.setups import Sidecar, bench_env
from extauthz.app import Runtime
from extauthz.settings import load_settings


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _granian(env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "granian",
            "--interface",
            "rsgi",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--runtime-threads",
            "1",
            "--no-ws",
            "--log-level",
            "warning",
            "bench.granian_app:app",
        ],
        env=env,
        cwd=Path(__file__).resolve().parents[1],
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("granian did not start (pip install granian)")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    require_tools()
    results: dict[str, list[tuple[float, float]]] = {"httptools+uvloop": [], "granian rsgi": []}
    with tempfile.TemporaryDirectory() as tmp:
        env = bench_env(Path(tmp) / "data")
        runtime = Runtime.open(load_settings(environ=env))
        _, key = runtime.keys.create_key(runtime.tenants.create_tenant("b", "free").id)
        runtime.close()
        for _ in range(args.rounds):
            for name, runs in results.items():
                if name.startswith("httptools"):
                    sidecar = Sidecar("http", env, Path(tmp))
                    pid, port, stop = sidecar.pid, sidecar.ports[0], sidecar.stop
                else:
                    port = _free_port()
                    proc = _granian(env, port)
                    pid, stop = proc.pid, proc.terminate
                try:
                    url = f"http://127.0.0.1:{port}/bench"
                    wrk(url, 1, {"x-api-key": key})
                    before = cpu_seconds(pid)
                    result = wrk(url, args.seconds, {"x-api-key": key})
                    used = cpu_seconds(pid) - before
                    if result.bad:
                        raise SystemExit(f"{name} answered with errors")
                    runs.append((result.rps, used / result.requests * 1e6))
                finally:
                    stop()
    print(f"{args.rounds} interleaved rounds x {args.seconds}s, wrk -t1 -c16, medians")
    for name, runs in results.items():
        rps = statistics.median(r for r, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        print(f"{name:18} {rps:8.0f} checks/s {cpu:6.1f} us CPU/check")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
