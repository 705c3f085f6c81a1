"""A tiny HTTP backend that echoes what it received, to show what the upstream sees."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hits = 0  # requests that reached the backend (tests assert denied ones never do)


class _Echo(BaseHTTPRequestHandler):
    server: _Server

    server_version = "extauthz-demo-backend"
    protocol_version = "HTTP/1.1"

    def _reply(self) -> None:
        self.server.hits += 1
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        body = (
            json.dumps(
                {
                    "message": "hello from the demo backend",
                    "method": self.command,
                    "path": self.path,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                },
                indent=2,
            ).encode()
            + b"\n"
        )
        head = (
            "HTTP/1.1 200 OK\r\n"
            f"server: {self.server_version}\r\n"
            "content-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        )
        # One write: a separate small write for the body meets Nagle's algorithm and
        # delayed ACKs, and every response then takes 40 ms.
        self.wfile.write(head.encode() + body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _reply

    def log_message(self, format: str, *args: object) -> None:
        pass  # request lines can carry query strings; the demo keeps quiet


class _Server6(_Server):
    address_family = socket.AF_INET6


class EchoBackend:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        server = _Server6 if ":" in host else _Server
        self.httpd = server((host, port), _Echo)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def hits(self) -> int:
        return self.httpd.hits

    def start(self) -> EchoBackend:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def main() -> None:
    """``python -m extauthz.demo [--port 8000]``: the echo backend alone (docker-compose)."""
    import argparse

    parser = argparse.ArgumentParser(description="extauthz demo backend: echoes requests")
    parser.add_argument("--host", default="0.0.0.0")  # noqa: S104 - a container's service
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    backend = EchoBackend(args.host, args.port)
    print(f"demo backend on {args.host}:{backend.port}", flush=True)
    backend.httpd.serve_forever()


if __name__ == "__main__":
    main()
