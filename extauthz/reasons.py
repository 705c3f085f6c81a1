"""Every deny reason the product answers with, its status and message; docs/deny-reasons.md's
table mirrors this one, and a test keeps them in step."""

from __future__ import annotations

import json
from dataclasses import dataclass

from extauthz.model import Decision


@dataclass(frozen=True, slots=True)
class Reason:
    status: int
    message: str


# Revoked/expired keys are 401 (the credential is no longer valid); a suspended tenant
# is 403 (the credential is valid, but its owner may not use the service now).
REASONS: dict[str, Reason] = {
    "missing_key": Reason(401, "An API key is required: send it in the {headers} header."),
    "malformed_key": Reason(401, "The API key is not in the expected format."),
    "bad_checksum": Reason(401, "The API key's checksum does not match: was it copied whole?"),
    "multiple_keys": Reason(401, "Send exactly one API key per request."),
    "key_in_query": Reason(
        401, "API keys are not accepted in the URL query string: send it in the {headers} header."
    ),
    "unknown_key": Reason(401, "The API key is not valid."),
    "key_revoked": Reason(401, "The API key has been revoked."),
    "key_expired": Reason(401, "The API key has expired."),
    "tenant_suspended": Reason(403, "The tenant that owns this API key is suspended."),
    "invalid_token_count": Reason(
        400, "The declared token count must be one whole number from 1 upwards."
    ),
    "token_limit_exceeded": Reason(
        400, "This request declares more tokens than the tier allows per request."
    ),
    "rate_limited": Reason(429, "Too many requests in a short time: retry after Retry-After."),
    "daily_quota_exceeded": Reason(
        429, "The tenant's daily quota is used up: it resets at 00:00 (see Retry-After)."
    ),
    "concurrency_limit": Reason(
        429, "The tenant has too many requests in flight: retry when one completes."
    ),
    "source_blocked": Reason(
        429, "Too many failed authentication attempts from this address: retry later."
    ),
    "audit_unavailable": Reason(
        503, "The audit trail cannot be written, and this service requires it; retry shortly."
    ),
    "limits_unavailable": Reason(
        503,
        "Limits cannot be checked right now, and this tier is not served without them; "
        "retry shortly.",
    ),
    # 429, not 503: in HTTP-service mode Envoy replaces any 5xx from the authorization
    # service with an empty 503, and the client must see this reason and Retry-After.
    "overloaded": Reason(429, "The authorization service is overloaded: retry after Retry-After."),
    "invalid_request": Reason(400, "The authorization request was incomplete or malformed."),
    "store_unavailable": Reason(503, "Authorization is temporarily unavailable; retry shortly."),
    "internal_error": Reason(503, "Authorization failed unexpectedly; retry shortly."),
}


def deny_decision(reason: str, key_headers: tuple[str, ...] = ("x-api-key",)) -> Decision:
    """The full deny answer for ``reason``: status, JSON body and client headers."""
    spec = REASONS[reason]
    headers_text = " or ".join(
        "'Authorization: Bearer <key>'" if h == "authorization" else h for h in key_headers
    )
    message = spec.message.format(headers=headers_text)
    client: list[tuple[str, str]] = [
        ("content-type", "application/json"),
        ("cache-control", "no-store"),
    ]
    if spec.status == 401:
        challenge = 'Bearer realm="extauthz"'
        if reason != "missing_key":
            challenge += ', error="invalid_token"'
        client.append(("www-authenticate", challenge))
    if spec.status == 503 or reason == "overloaded":
        client.append(("retry-after", "1"))
    body = json.dumps({"error": reason, "message": message}).encode()
    return Decision(False, spec.status, reason, message, client_headers=tuple(client), body=body)
