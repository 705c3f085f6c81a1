"""Test upstreams: one that holds requests until told to answer (to keep concurrency
slots busy), and one that reports token usage the way an LLM API would."""

from __future__ import annotations

import contextlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default backlog (5) drops the SYNs of 50 connections opened at
    # once, and Envoy's 1 s connect timeout turns them into 503s.
    request_queue_size = 512
    hits = 0
    release = threading.Event()
    holding = 0


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.server.hits += 1
        headers: list[tuple[str, str]] = []
        if self.path.startswith("/slow"):
            # Held until the test releases it (bounded: never longer than 20 s).
            self.server.holding += 1
            self.server.release.wait(20)
            self.server.holding -= 1
        elif self.path.startswith("/stream-usage/"):
            self._stream_with_trailers(*self.path.split("/")[2:4])
            return
        elif self.path.startswith("/usage/"):
            _, _, tokens_in, tokens_out = self.path.split("/")[:4]
            headers = [("x-usage-input-tokens", tokens_in), ("x-usage-output-tokens", tokens_out)]
        body = b'{"ok": true}\n'
        head = ["HTTP/1.1 200 OK", "content-type: application/json"]
        head += [f"{k}: {v}" for k, v in headers]
        head.append(f"content-length: {len(body)}")
        # One write: headers and body in separate small writes meet Nagle and delayed
        # ACK, and every response would take 40 ms.
        # A hung-up client (or Envoy, on its behalf) is expected in the abort tests.
        with contextlib.suppress(BrokenPipeError):
            self.wfile.write("\r\n".join(head).encode() + b"\r\n\r\n" + body)

    do_POST = do_GET

    def _stream_with_trailers(self, tokens_in: str, tokens_out: str) -> None:
        """A streamed (chunked) answer, like server-sent events from a model API, whose
        token counts come last, as trailers."""
        head = (
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            "transfer-encoding: chunked\r\ntrailer: x-usage-input-tokens, x-usage-output-tokens"
            "\r\n\r\n"
        )
        chunks = b"".join(
            b"%x\r\n%s\r\n" % (len(event), event)
            for event in (b'data: {"delta": "Hel"}\n\n', b'data: {"delta": "lo"}\n\n')
        )
        trailers = (
            f"0\r\nx-usage-input-tokens: {tokens_in}\r\nx-usage-output-tokens: {tokens_out}\r\n\r\n"
        )
        with contextlib.suppress(BrokenPipeError):
            self.wfile.write(head.encode() + chunks + trailers.encode())

    def log_message(self, format: str, *args: object) -> None:
        pass


class TestBackend:
    __test__ = False  # not a pytest class

    def __init__(self) -> None:
        self.httpd = _Server(("127.0.0.1", 0), _Handler)
        self.httpd.release = threading.Event()
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def hits(self) -> int:
        return self.httpd.hits

    @property
    def holding(self) -> int:
        return self.httpd.holding

    def release(self) -> None:
        self.httpd.release.set()

    def hold(self) -> None:
        self.httpd.release.clear()

    def start(self) -> TestBackend:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
