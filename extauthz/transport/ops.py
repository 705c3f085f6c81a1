"""The operations endpoint, on its own port (EXTAUTHZ_METRICS_ADDR): ``/metrics``
(Prometheus text format), ``/healthz`` (the process is alive) and ``/readyz`` (it can
decide: store reachable, policy loaded, transports started; 503 with the failing check
otherwise). Kept off the check ports, so a scrape never queues behind checks."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from extauthz.threadnames import named

log = logging.getLogger("extauthz.ops")

# name -> (ok, detail); every check must pass for /readyz to answer 200.
ReadyChecks = Callable[[], dict[str, tuple[bool, str]]]


class OpsServer:
    def __init__(self, registry: CollectorRegistry, ready: ReadyChecks) -> None:
        self.registry = registry
        self.ready = ready
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self, host: str, port: int) -> int:
        ops = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, CONTENT_TYPE_LATEST, generate_latest(ops.registry))
                elif path == "/healthz":
                    self._send(200, "text/plain; charset=utf-8", b"ok\n")
                elif path == "/readyz":
                    try:
                        checks = ops.ready()
                    except Exception as exc:  # a failing check is "not ready", not a crash
                        checks = {"ready": (False, f"check failed: {exc}")}
                    ok = all(passed for passed, _ in checks.values())
                    body = {name: {"ok": p, "detail": d} for name, (p, d) in checks.items()}
                    self._send(200 if ok else 503, "application/json", json.dumps(body).encode())
                else:
                    self._send(404, "text/plain; charset=utf-8", b"not found\n")

            def _send(self, status: int, kind: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("content-type", kind)
                self.send_header("content-length", str(len(body)))
                self.send_header("cache-control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # scrapes every few seconds are not news

        try:
            self._httpd = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=named("extauthz-ops", self._httpd.serve_forever),
            name="extauthz-ops",
            daemon=True,
        )
        self._thread.start()
        return int(self._httpd.server_address[1])

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
