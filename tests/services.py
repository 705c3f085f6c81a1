"""Redis and PostgreSQL for the tests, started by the tests themselves.

On a fresh machine nothing listens on 6379 or 5432, so the tests that need a server
start their own from the binaries on PATH (``redis-server``; PostgreSQL's ``initdb``
and ``postgres``, also looked for where Debian puts them), on a free loopback port in
a temporary directory, once per test session, and stop it by its pid at the end.

To use servers you already run instead, point these at them (nothing else is changed
on them: each test works in a Redis key prefix of its own or a fresh PostgreSQL schema):

    EXTAUTHZ_TEST_REDIS=redis://127.0.0.1:6379
    EXTAUTHZ_TEST_POSTGRES=postgresql://postgres@127.0.0.1:5432/test

When a binary is missing the test is skipped with a one-line reason, except under
``CI=true``, where every skip is a failure (tests/conftest.py).
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Server:
    """One server process of ours: its URL, its pid, its directory."""

    def __init__(self, url: str, proc: subprocess.Popen[bytes], workdir: Path) -> None:
        self.url = url
        self.proc = proc
        self.workdir = workdir

    def stop(self) -> None:
        if self.proc.poll() is None:
            # SIGINT is PostgreSQL's "fast shutdown"; Redis exits on it too.
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


_started: dict[str, _Server | str] = {}  # name -> our server, or why it cannot start


def stop_all() -> None:
    for server in list(_started.values()):
        if isinstance(server, _Server):
            server.stop()
    _started.clear()


atexit.register(stop_all)  # also when the session ends without pytest's own hook


def _get(name: str, start: Callable[[], _Server]) -> str:
    if name not in _started:
        try:
            _started[name] = start()
        except _Unavailable as exc:
            _started[name] = str(exc)
    server = _started[name]
    if isinstance(server, str):
        pytest.skip(server)
    return server.url


class _Unavailable(Exception):
    """The binaries to start this server are not installed."""


def _wait(ready: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"test server did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.05)


# ---------------------------------------------------------------- Redis


def _start_redis() -> _Server:
    binary = shutil.which("redis-server")
    if binary is None:
        raise _Unavailable("redis-server is not installed (apt-get install redis-server)")
    workdir = Path(tempfile.mkdtemp(prefix="extauthz-test-redis-"))
    port = free_port()
    log = workdir / "redis.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(workdir)],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def ready() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    _wait(ready, proc, log)
    return _Server(f"redis://127.0.0.1:{port}", proc, workdir)


def redis_url(db: int = 0) -> str:
    """``redis://127.0.0.1:PORT/DB`` of the tests' Redis (started on first use)."""
    base = os.environ.get("EXTAUTHZ_TEST_REDIS") or _get("redis", _start_redis)
    return f"{base.rstrip('/')}/{db}"


def redis_address() -> tuple[str, int]:
    """(host, port) of the tests' Redis, for a fault proxy in front of it."""
    parts = urlsplit(redis_url())
    return parts.hostname or "127.0.0.1", parts.port or 6379


# ---------------------------------------------------------------- PostgreSQL


def _pg_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    # Debian and Ubuntu keep initdb and postgres off PATH.
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    return candidates[0] if candidates else None


def _run_as() -> tuple[dict[str, object], int | None]:
    """PostgreSQL refuses to run as root: as root, run it as the `postgres` user."""
    if os.geteuid() != 0:
        return {}, None
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        raise _Unavailable(
            "running as root and there is no `postgres` user to run PostgreSQL as"
        ) from None
    return {"user": user.pw_uid, "group": user.pw_gid}, user.pw_uid


def _start_postgres() -> _Server:
    initdb, postgres = _pg_binary("initdb"), _pg_binary("postgres")
    if initdb is None or postgres is None:
        raise _Unavailable("PostgreSQL is not installed (apt-get install postgresql)")
    as_user, uid = _run_as()
    workdir = Path(tempfile.mkdtemp(prefix="extauthz-test-pg-"))
    if uid is not None:
        os.chown(workdir, uid, -1)
    data, log = workdir / "data", workdir / "postgres.log"
    subprocess.run(
        [initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync",
         "--encoding=UTF8", "--locale=C"],
        check=True, capture_output=True, **as_user,  # type: ignore[call-overload]
    )  # fmt: skip
    port = free_port()
    with log.open("wb") as out:
        if uid is not None:
            os.chown(log, uid, -1)
        proc = subprocess.Popen(  # type: ignore[call-overload]
            [postgres, "-D", str(data), "-p", str(port), "-k", str(workdir),
             "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
             "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
             "-c", "max_connections=200"],
            stdout=out, stderr=subprocess.STDOUT, **as_user,
        )  # fmt: skip
    admin = f"postgresql://postgres@127.0.0.1:{port}/postgres"

    def ready() -> bool:
        import psycopg

        try:
            psycopg.connect(admin, connect_timeout=1).close()
        except psycopg.OperationalError:
            return False
        return True

    _wait(ready, proc, log)
    import psycopg

    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("CREATE DATABASE test")
    return _Server(f"postgresql://postgres@127.0.0.1:{port}/test", proc, workdir)


def postgres_url() -> str:
    """The tests' database (started on first use): trust auth, user postgres, db test."""
    return os.environ.get("EXTAUTHZ_TEST_POSTGRES") or _get("postgres", _start_postgres)


def postgres_address() -> tuple[str, int]:
    parts = urlsplit(postgres_url())
    return parts.hostname or "127.0.0.1", parts.port or 5432


@contextmanager
def pg_schema() -> Iterator[str]:
    """A database URL whose search_path is a new, empty schema; dropped afterwards."""
    import psycopg

    base = postgres_url()
    name = "t_" + secrets.token_hex(6)
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}")
    try:
        yield f"{base}?options=-csearch_path%3D{name}"
    finally:
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {name} CASCADE")
