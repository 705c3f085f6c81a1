"""The same decision core as an RSGI app on granian, for `python -m bench.servers` only.

Granian was the other candidate for the HTTP-service mode; this app exists so the choice
stays measurable. Settings come from the environment like `extauthz serve`.
"""

from __future__ import annotations

from typing import Any

from extauthz.app import Runtime
from extauthz.model import CheckInput
from extauthz.settings import load_settings

_runtime = Runtime.open(load_settings())
_authorizer = _runtime.authorizer()


async def app(scope: Any, proto: Any) -> None:
    headers = scope.headers
    decision = _authorizer.check(
        CheckInput(
            method=scope.method,
            path=scope.path + ("?" + scope.query_string if scope.query_string else ""),
            headers={k: headers.get(k) for k in headers.keys()},  # noqa: SIM118
        )
    )
    if decision.allowed:
        out = [*decision.upstream_headers]
        out.append(("x-envoy-auth-headers-to-remove", ",".join(decision.remove_headers)))
    else:
        out = [*decision.client_headers]
    proto.response_bytes(decision.status, out, decision.body)
