"""A webhook receiver for tests: checks each signature and can fail on purpose."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from extauthz.webhooks import signature


class Receiver:
    """Answers 500 to the first ``fail_first`` attempts, then 204; or ``status`` (with
    ``retry_after``) to every attempt."""

    def __init__(
        self, secret: bytes, fail_first: int = 0, status: int = 0, retry_after: str = ""
    ) -> None:
        self.secret = secret
        self.fail_first = fail_first
        self.attempts = 0
        self.received: list[dict[str, Any]] = []
        self.bad_signatures = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                outer.attempts += 1
                expected = signature(outer.secret, self.headers["x-extauthz-timestamp"], body)
                if self.headers["x-extauthz-signature"] != expected:
                    outer.bad_signatures += 1
                    code = 401
                elif status:
                    code = status
                elif outer.attempts <= outer.fail_first:
                    code = 500
                else:
                    outer.received.append(json.loads(body))
                    code = 204
                self.send_response(code)
                if retry_after:
                    self.send_header("retry-after", retry_after)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
