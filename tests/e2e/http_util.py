"""Small HTTP helpers that can send what urllib refuses (repeated headers, raw bytes)."""

from __future__ import annotations

import http.client
import json
import socket
import threading
from dataclasses import dataclass


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, object]:
        data: dict[str, object] = json.loads(self.body)
        return data


def get(
    port: int,
    path: str = "/hello",
    headers: list[tuple[str, str]] | None = None,
    method: str = "GET",
    body: bytes = b"",
) -> Reply:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest(method, path)
        for name, value in headers or []:
            conn.putheader(name, value)
        if body:
            conn.putheader("content-length", str(len(body)))
        conn.endheaders(body or None)
        resp = conn.getresponse()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def raw_status(port: int, request: bytes) -> int:
    """Send raw bytes as a request; return the status code Envoy answers with."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0


def at_once(
    port: int, n: int, path: str, key: str, replies: list[Reply] | None = None
) -> list[Reply]:
    """n requests released together by a barrier, each on its own connection; pass
    ``replies`` to watch them arrive from another thread."""
    barrier = threading.Barrier(n)
    replies = [] if replies is None else replies
    lock = threading.Lock()

    def one() -> None:
        barrier.wait(30)
        reply = get(port, path, [("x-api-key", key)])
        with lock:
            replies.append(reply)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(replies) == n
    return replies
