"""Limits inside the decision core: statuses, reasons, Retry-After and RateLimit
headers, token counts, shadow mode, all with fakes and a hand-moved clock."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from extauthz.apikeys import APIKeyManager, KeyResolver
from extauthz.audit import AuditLogger
from extauthz.authorizer import Authorizer
from extauthz.limits.gate import LimitGate
from extauthz.limits.memory import MemoryCounters
from extauthz.model import CheckInput, Decision, TenantTier
from extauthz.policy import Policy, parse_policy
from extauthz.tenants import TenantManager
from extauthz.testing import CountingStore, ManualClock

POLICY = """
tiers:
  free:
    requests_per_day: 3
    tokens_per_request: 1000
    concurrent: 2
    rate_limit: {requests_per_minute: 60, burst: 2}
routes:
  - path: /healthz
    public: true
  - prefix: /v1/embeddings
    cost: 2
tokens:
  header: x-max-tokens
  body_field: max_tokens
"""


class Env:
    def __init__(self, store: CountingStore, clock: ManualClock, resolver: KeyResolver) -> None:
        self.clock = clock
        self.counters = MemoryCounters(clock, lease_ttl=30)
        self.audit = AuditLogger(store, clock)
        self.gate = LimitGate(self.counters, clock, self.audit)
        self.authorizer = Authorizer(resolver, policy=parse_policy(POLICY), gate=self.gate)
        TenantManager(store, clock).create_tenant("f", TenantTier.FREE, tenant_id="f")
        self.key_id, self.key = APIKeyManager(store, resolver.pepper, clock).create_key("f")
        self.n = 0

    def check(
        self, path: str = "/v1/chat", body: bytes | None = None, hold: bool = False, **hdrs: str
    ) -> Decision:
        """One request; unless ``hold``, it completes at once (its slot is released, as
        the access log would), so only the concurrency tests fill slots."""
        self.n += 1
        headers = {"x-api-key": self.key, **{k.replace("_", "-"): v for k, v in hdrs.items()}}
        decision = self.authorizer.check(
            CheckInput("POST", path, headers, request_id=f"req-{self.n}", body=body)
        )
        if not hold:
            self.counters.release(f"req-{self.n}")
        return decision


@pytest.fixture
def env(store: CountingStore, clock: ManualClock, resolver: KeyResolver) -> Env:
    return Env(store, clock, resolver)


def reason(decision: Decision) -> str:
    return str(json.loads(decision.body)["error"])


def test_allow_carries_ratelimit_headers_for_the_client(env: Env) -> None:
    """An allowed request gets RateLimit-Policy and RateLimit describing the bucket and
    the daily quota (draft-ietf-httpapi-ratelimit-headers syntax)."""
    decision = env.check()
    assert decision.allowed
    assert not decision.reusable
    headers = dict(decision.client_headers)
    assert headers["ratelimit-policy"] == '"burst";q=2;w=2, "daily";q=3;w=86400'
    assert headers["ratelimit"].startswith('"burst";r=1;t=1, "daily";r=2;t=')


def test_bucket_denial_is_429_with_whole_second_retry_after(env: Env) -> None:
    """Burst 2 at 1/s: the third request is 429 rate_limited, Retry-After 1 (never 0),
    and the headers name the burst policy; after a second it passes."""
    assert env.check().allowed
    assert env.check().allowed
    env.clock.advance(0.01)
    denied = env.check()
    assert (denied.status, reason(denied)) == (429, "rate_limited")
    headers = dict(denied.client_headers)
    assert headers["retry-after"] == "1"
    assert headers["ratelimit-policy"] == '"burst";q=2;w=2'
    assert headers["ratelimit"] == '"burst";r=0;t=1'
    assert json.loads(denied.body)["retry_after"] == 1
    env.clock.advance(1.0)
    assert env.check().allowed


def test_daily_quota_denial_retries_at_midnight(env: Env) -> None:
    """The 4th request of a 3/day tier is 429 daily_quota_exceeded with Retry-After up
    to the next 00:00 UTC, and the next day it passes."""
    midnight = datetime(2027, 1, 16, tzinfo=UTC).timestamp()
    env.clock.jump(wall=midnight - 100 - env.clock.now())
    for _ in range(3):
        assert env.check().allowed
        env.clock.advance(1)
    denied = env.check()
    assert (denied.status, reason(denied)) == (429, "daily_quota_exceeded")
    assert dict(denied.client_headers)["retry-after"] == "97"
    assert dict(denied.client_headers)["ratelimit-policy"] == '"daily";q=3;w=86400'
    env.clock.advance(97)
    assert env.check().allowed


def test_concurrency_denial_and_release(env: Env) -> None:
    """Two in flight fill the tier's 2 slots: the third is 429 concurrency_limit; the
    access log's release of one lets the next through."""
    env.check(hold=True)
    env.clock.advance(1)
    env.check(hold=True)
    env.clock.advance(1)
    denied = env.check(hold=True)
    assert (denied.status, reason(denied)) == (429, "concurrency_limit")
    assert env.counters.release("req-1") is not None
    assert env.check(hold=True).allowed


def test_declared_tokens_above_the_cap_are_refused_before_any_charge(env: Env) -> None:
    """x-max-tokens above tokens_per_request: 400 token_limit_exceeded naming the cap;
    no quota, bucket or slot is taken."""
    denied = env.check(x_max_tokens="1001")
    assert (denied.status, reason(denied)) == (400, "token_limit_exceeded")
    assert "1000" in json.loads(denied.body)["message"]
    assert env.counters.usage("f", env.gate.calendar.day(env.clock.now(), "UTC")[0]) == (0, 0)
    assert env.counters.in_flight("f") == 0
    assert env.check(x_max_tokens="1000").allowed


@pytest.mark.parametrize(
    "value",
    ["0", "-5", "NaN", "nan", "1e3", "9223372036854775808", "ten", "", " ", "12,13", "١٢"],
)
def test_bad_declared_token_counts_are_400_before_any_charge(env: Env, value: str) -> None:
    """BAD_INPUTS #10: 0, negative, NaN, 2^63, non-numeric, two values, non-ASCII digits
    in the header -> 400 invalid_token_count, nothing charged."""
    denied = env.check(x_max_tokens=value)
    assert (denied.status, reason(denied)) == (400, "invalid_token_count")
    assert env.counters.in_flight("f") == 0


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"max_tokens": 500}', "ok"),
        (b'{"max_tokens": 5000}', "token_limit_exceeded"),
        (b'{"max_tokens": 0}', "invalid_token_count"),
        (b'{"max_tokens": -1}', "invalid_token_count"),
        (b'{"max_tokens": NaN}', "invalid_token_count"),
        (b'{"max_tokens": 1.5}', "invalid_token_count"),
        (b'{"max_tokens": "100"}', "invalid_token_count"),
        (b'{"max_tokens": true}', "invalid_token_count"),
        (b'{"max_tokens": 9223372036854775808}', "invalid_token_count"),
        (b'{"max_tokens": 1, "max_tokens": 99999}', "invalid_token_count"),
        (b'{"max_tokens": null}', "ok"),
        (b"not json at all", "ok"),
        (b"[1, 2]", "ok"),
    ],
)
def test_body_token_counts(env: Env, body: bytes, expected: str) -> None:
    """max_tokens in a JSON body is held to the same rules; a duplicated field (which
    parsers resolve differently) is refused; a body that is not a JSON object declares
    nothing."""
    decision = env.check(body=body)
    assert (reason(decision) if not decision.allowed else "ok") == expected


def test_declared_tokens_are_reserved(env: Env) -> None:
    """An allowed request with x-max-tokens reserves them on today's count."""
    env.check(x_max_tokens="400")
    day = env.gate.calendar.day(env.clock.now(), "UTC")[0]
    assert env.counters.usage("f", day) == (1, 400)


def test_route_cost_weights_and_public_routes(env: Env) -> None:
    """/v1/embeddings costs 2 (the whole burst); /healthz needs no key and is never
    counted."""
    assert env.check("/v1/embeddings").allowed
    assert reason(env.check("/v1/chat")) == "rate_limited"
    for _ in range(5):
        public = env.authorizer.check(CheckInput("GET", "/healthz", {}))
        assert public.allowed
        assert public.reason == "public"


def test_shadow_mode_lets_would_be_denials_through_and_counts_them(env: Env) -> None:
    """With shadow on, the 3rd request (over the burst) is allowed; the would-deny is
    counted and audited as RATE_LIMITED/shadow, and nothing is charged for it."""
    env.authorizer.policy = parse_policy(POLICY + "tenants:\n  f: {shadow: true}\n")
    assert env.check().allowed
    assert env.check().allowed
    env.clock.advance(0.01)
    passed = env.check()
    assert passed.allowed
    assert passed.status == 200
    assert env.gate.stats[("shadow", "rate_limited")] == 1
    assert env.gate.stats[("denied", "rate_limited")] == 0
    env.audit.flush()
    events = env.audit.store.list_audit(action="RATE_LIMITED")
    assert [(e.outcome, e.reason, e.tenant_id) for e in events] == [("shadow", "rate_limited", "f")]
    day = env.gate.calendar.day(env.clock.now(), "UTC")[0]
    assert env.counters.usage("f", day)[0] == 2


def test_every_limit_denial_is_audited(env: Env) -> None:
    """Denials are never sampled: 50 rate-limited requests leave 50 RATE_LIMITED rows,
    each naming the tenant, key id, limit and request id, and none holding the key."""
    env.check()
    env.check()
    for _ in range(50):
        env.check()
    env.audit.flush()
    events = env.audit.store.list_audit(action="RATE_LIMITED")
    assert len(events) == 50
    assert {(e.tenant_id, e.key_id, e.reason) for e in events} == {
        ("f", env.key_id, "rate_limited")
    }
    assert len({e.request_id for e in events}) == 50
    assert all(env.key not in json.dumps(e.to_dict()) for e in events)


def test_policy_is_read_once_per_request(env: Env) -> None:
    """Swapping the policy object is all a reload does: the next request uses it."""
    env.authorizer.policy = Policy()  # built-in FREE: burst 10
    for _ in range(5):
        assert env.check().allowed
