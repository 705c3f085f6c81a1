"""Redis servers of our own for the tests that need TLS or a Unix socket: redis-server
from PATH on a free port or a short socket path, with a self-signed certificate made
by openssl, stopped by its pid afterwards."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from tests.services import free_port

NO_DISK = ["--save", "", "--appendonly", "no"]


@contextmanager
def tls_redis() -> Iterator[tuple[int, Path]]:
    """A TLS-only Redis on 127.0.0.1: (its port, the CA file that trusts it)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (to make the test certificate)")
    with tempfile.TemporaryDirectory(prefix="rtls") as tmp:
        work = Path(tmp)
        cert, key = work / "cert.pem", work / "key.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out", str(cert),
             "-days", "2", "-subj", "/CN=localhost",
             "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
            check=True, capture_output=True,
        )  # fmt: skip
        port = free_port()
        args = ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert)]
        args += ["--tls-key-file", str(key), "--tls-ca-cert-file", str(cert)]
        args += ["--tls-auth-clients", "no"]
        client = redis.Redis(port=port, ssl=True, ssl_ca_certs=str(cert))
        with _server(work, args, client):
            yield port, cert


@contextmanager
def unix_redis() -> Iterator[str]:
    """A Redis listening only on a Unix socket: its path (short, under /tmp)."""
    with tempfile.TemporaryDirectory(prefix="rsock", dir="/tmp") as tmp:
        path = str(Path(tmp) / "redis.sock")
        args = ["--port", "0", "--unixsocket", path, "--unixsocketperm", "700"]
        with _server(Path(tmp), args, redis.Redis(unix_socket_path=path)):
            yield path


@contextmanager
def _server(work: Path, args: list[str], client: redis.Redis) -> Iterator[None]:
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    log = (work / "redis.log").open("w")
    proc = subprocess.Popen(
        [server, *args, *NO_DISK, "--bind", "127.0.0.1", "--dir", str(work)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.RedisError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError((work / "redis.log").read_text()) from None
                time.sleep(0.05)
        yield
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
