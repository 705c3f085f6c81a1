"""The transport floors: what Envoy's ext_authz costs with an authorizer that does
nothing, so C and D can be read as a share of what any authorizer could keep.

FH  Envoy ext_authz (HTTP service) -> nginx answering `return 200` (when nginx is
    installed; the bench says so and skips it otherwise)
FG  Envoy ext_authz (gRPC) -> a bare grpcio handler returning a constant OK
    CheckResponse, on the same grpcio sync server settings as extauthz's (4 workers)

`python -m bench.floors grpc` runs the gRPC floor on its own and prints its port.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path
from typing import Any

NGINX_CONF = """
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200; }}
    }}
}}
"""


def nginx_path() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(port: int, proc: subprocess.Popen[str], what: str, log: Path) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited: {log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port}")


class Floor:
    """One floor authorizer process: ``pid`` (its CPU is the floor's) and ``port``."""

    proc: subprocess.Popen[str]
    port: int

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        stop_process(self.proc, 10)


def stop_process(proc: subprocess.Popen[str], grace: float) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; its stdout pipe closed."""
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


class NginxFloor(Floor):
    def __init__(self, workdir: Path) -> None:
        binary = nginx_path()
        if binary is None:
            raise RuntimeError("nginx is not installed")
        home = workdir / "nginx"
        home.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        conf = home / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=home, port=self.port))
        log = home / "stderr.log"
        with log.open("w") as err:
            self.proc = subprocess.Popen(
                [binary, "-c", str(conf), "-p", str(home), "-e", str(home / "error.log")],
                stdout=subprocess.DEVNULL,
                stderr=err,
                text=True,
            )
        _wait_listening(self.port, self.proc, "nginx", log)


class GrpcFloor(Floor):
    def __init__(self, workdir: Path) -> None:
        log = workdir / "grpc-floor.log"
        with log.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench.floors", "grpc"],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                cwd=Path(__file__).resolve().parents[1],
            )
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.strip().isdigit():
            raise RuntimeError(f"gRPC floor did not start: {log.read_text()[-2000:]}")
        self.port = int(line)


def serve_grpc_floor() -> None:
    """A bare Check handler: parse the request, answer a constant OK."""
    import grpc
    from envoy.service.auth.v3 import external_auth_pb2 as pb
    from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc

    ok = pb.CheckResponse()
    ok.status.code = 0

    class Bare(pb_grpc.AuthorizationServicer):
        def Check(self, request: pb.CheckRequest, context: grpc.ServicerContext) -> Any:
            return ok

    server = grpc.server(
        futures.ThreadPoolExecutor(4),
        options=[("grpc.so_reuseport", 0), ("grpc.http2.bdp_probe", 0)],
        maximum_concurrent_rpcs=4 * 64,
    )
    pb_grpc.add_AuthorizationServicer_to_server(Bare(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    if sys.argv[1:] == ["grpc"]:
        serve_grpc_floor()
    else:
        raise SystemExit("usage: python -m bench.floors grpc")
