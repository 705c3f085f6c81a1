"""Where and how the Redis clients connect (resp.py on an event loop, blocking.py on a
thread): a TCP address, TLS (``rediss://``) or a Unix socket (``unix://``), with the
AUTH and SELECT a URL asks for, all read from the redis-py client made from that URL.

TLS options redis-py knows and this does not (OCSP, verify flags) make
:meth:`Endpoint.from_client` return None: those URLs keep redis-py (pipeline.py)
rather than connect with less checking than asked for.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

_TLS_HANDLED = {
    "ssl_keyfile",
    "ssl_certfile",
    "ssl_cert_reqs",
    "ssl_ca_certs",
    "ssl_ca_data",
    "ssl_ca_path",
    "ssl_check_hostname",
    "ssl_password",
    "ssl_min_version",
    "ssl_ciphers",
}
_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


@dataclass(frozen=True)
class Endpoint:
    address: tuple[str, int] | str  # (host, port), or a Unix socket's path
    hello: Sequence[Sequence[Any]] = ()  # AUTH, SELECT: sent first on every connection
    tls: ssl.SSLContext | None = None

    @classmethod
    def from_client(cls, client: redis.Redis) -> Endpoint | None:
        """The same server, database, credentials and TLS settings as ``client``."""
        pool = client.connection_pool
        kwargs = pool.connection_kwargs
        hello: list[tuple[Any, ...]] = []
        if kwargs.get("password"):
            user = kwargs.get("username")
            hello.append(
                ("AUTH", user, kwargs["password"]) if user else ("AUTH", kwargs["password"])
            )
        if kwargs.get("db"):
            hello.append(("SELECT", kwargs["db"]))
        kind = pool.connection_class
        if kind is redis.connection.UnixDomainSocketConnection:
            return cls(str(kwargs["path"]), hello)
        address = (kwargs.get("host") or "localhost", int(kwargs.get("port") or 6379))
        if kind is redis.connection.Connection:
            return cls(address, hello)
        if kind is redis.connection.SSLConnection:
            tls = _tls_context(kwargs)
            return None if tls is None else cls(address, hello, tls)
        return None

    @property
    def server_hostname(self) -> str | None:
        if self.tls is None or isinstance(self.address, str):
            return None
        return self.address[0]

    def connect(self, timeout: float) -> socket.socket:
        """A connected blocking socket (TLS handshake done), or OSError."""
        if isinstance(self.address, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                sock.connect(self.address)
            except OSError:
                sock.close()
                raise
            return sock
        sock = socket.create_connection(self.address, timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls is None:
            return sock
        try:
            return self.tls.wrap_socket(sock, server_hostname=self.server_hostname)
        except OSError:
            sock.close()
            raise

    async def open_on(
        self, loop: asyncio.AbstractEventLoop, protocol: Callable[[], asyncio.Protocol]
    ) -> None:
        """Connect ``protocol`` on ``loop`` (TLS handshake included)."""
        if isinstance(self.address, str):
            await loop.create_unix_connection(protocol, self.address)
            return
        host, port = self.address
        await loop.create_connection(
            protocol, host, port, ssl=self.tls, server_hostname=self.server_hostname
        )


def _tls_context(kwargs: dict[str, Any]) -> ssl.SSLContext | None:
    """redis-py's TLS settings as a context; None if any is one this does not handle."""
    for name, value in kwargs.items():
        if name.startswith("ssl_") and name not in _TLS_HANDLED and value not in (None, False):
            return None
    reqs = kwargs.get("ssl_cert_reqs", "required")
    if isinstance(reqs, str):
        reqs = _CERT_REQS.get(reqs.lower())
        if reqs is None:
            return None
    tls = ssl.create_default_context(
        cafile=kwargs.get("ssl_ca_certs"),
        capath=kwargs.get("ssl_ca_path"),
        cadata=kwargs.get("ssl_ca_data"),
    )
    tls.check_hostname = bool(kwargs.get("ssl_check_hostname", True)) and reqs != ssl.CERT_NONE
    tls.verify_mode = reqs
    if kwargs.get("ssl_certfile"):
        tls.load_cert_chain(
            kwargs["ssl_certfile"], kwargs.get("ssl_keyfile"), kwargs.get("ssl_password")
        )
    if kwargs.get("ssl_min_version") is not None:
        tls.minimum_version = ssl.TLSVersion(int(kwargs["ssl_min_version"]))
    if kwargs.get("ssl_ciphers"):
        tls.set_ciphers(kwargs["ssl_ciphers"])
    return tls
