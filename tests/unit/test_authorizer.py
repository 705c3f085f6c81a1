"""The decision core, with a counting in-memory store and a hand-moved clock."""

from __future__ import annotations

import json

import pytest

from extauthz.apikeys import APIKeyManager, KeyResolver
from extauthz.authorizer import REASONS, Authorizer
from extauthz.errors import StoreError
from extauthz.keys import checksum, generate_key
from extauthz.model import CheckInput, Decision, TenantTier
from extauthz.tenants import TenantManager
from extauthz.testing import CountingStore, ManualClock
from tests.conftest import PEPPER


def check(authorizer: Authorizer, path: str = "/v1/items", **hdrs: str) -> Decision:
    headers = {k.replace("_", "-"): v for k, v in hdrs.items()}
    return authorizer.check(CheckInput(method="GET", path=path, headers=headers))


def body(decision: Decision) -> dict[str, str]:
    data: dict[str, str] = json.loads(decision.body)
    return data


def test_valid_key_is_allowed_with_identity_headers_and_key_removed(
    authorizer: Authorizer, acme_key: tuple[str, str]
) -> None:
    """A valid key yields allow, the tenant/tier/key-id headers, and removal of x-api-key."""
    key_id, key = acme_key
    decision = check(authorizer, x_api_key=key)
    assert decision.allowed
    assert dict(decision.upstream_headers) == {
        "x-tenant-id": "acme",
        "x-tenant-tier": "professional",
        "x-api-key-id": key_id,
    }
    assert decision.remove_headers == ("x-api-key",)


def test_bearer_token_is_accepted_and_authorization_removed(
    authorizer: Authorizer, acme_key: tuple[str, str]
) -> None:
    """Authorization: Bearer <key> works like x-api-key, and the header is stripped."""
    decision = check(authorizer, authorization=f"Bearer {acme_key[1]}")
    assert decision.allowed
    assert decision.remove_headers == ("authorization",)


def test_other_authorization_schemes_are_not_keys(authorizer: Authorizer) -> None:
    """Authorization: Basic is left for the upstream; without a key the answer is missing_key."""
    decision = check(authorizer, authorization="Basic dXNlcjpwdw==")
    assert decision.reason == "missing_key"


def test_missing_key_is_401_with_json_and_challenge_and_no_lookup(
    authorizer: Authorizer, store: CountingStore
) -> None:
    """No key: 401, a JSON error body, WWW-Authenticate, and the store is not touched."""
    decision = check(authorizer)
    assert (decision.allowed, decision.status, decision.reason) == (False, 401, "missing_key")
    assert body(decision)["error"] == "missing_key"
    assert "x-api-key" in body(decision)["message"]
    headers = dict(decision.client_headers)
    assert headers["www-authenticate"] == 'Bearer realm="extauthz"'
    assert headers["content-type"] == "application/json"
    assert store.lookups == 0


@pytest.mark.parametrize(
    "bad",
    [
        "nk_" + "a" * 43 + "_zzzzzz",  # wrong checksum
        "nk_tooshort",
        "nk_" + "a" * 42 + "\x00_" + checksum("a" * 43),
        "nk_" + "a" * 43 + "\r\n_" + checksum("a" * 43),
        "nk_\ufffd" + "a" * 42 + "_" + checksum("a" * 43),  # non-UTF-8, as Envoy replaces it
        "nk_" + "A" * (1 << 20),  # a 1 MB header
    ],
)
def test_malformed_keys_are_401_without_touching_the_store(
    authorizer: Authorizer, store: CountingStore, bad: str
) -> None:
    """Bad checksums, NUL/CR/LF, non-UTF-8 and 1 MB keys are refused before any lookup."""
    decision = check(authorizer, x_api_key=bad)
    assert decision.status == 401
    assert decision.reason in {"malformed_key", "bad_checksum"}
    assert store.lookups == 0
    assert "invalid_token" in dict(decision.client_headers)["www-authenticate"]


def test_bad_checksum_has_its_own_reason(authorizer: Authorizer) -> None:
    """A well-shaped key with the wrong checksum says bad_checksum."""
    assert check(authorizer, x_api_key="nk_" + "a" * 43 + "_zzzzzz").reason == "bad_checksum"


@pytest.mark.parametrize(
    "hdrs",
    [
        {"x-api-key": "{k},{k}"},
        {"x-api-key": ("{k}", "{k}")},
        {"x-api-key": "{k}", "authorization": "Bearer {k}"},
        {"authorization": "Bearer {k}, Bearer {k}"},
    ],
)
def test_two_keys_are_refused_never_picking_one(
    authorizer: Authorizer, acme_key: tuple[str, str], hdrs: dict[str, object]
) -> None:
    """Joined (A,B), repeated, or x-api-key plus Bearer: 401 multiple_keys, even if equal."""
    key = acme_key[1]
    filled = {
        n: tuple(x.format(k=key) for x in v) if isinstance(v, tuple) else str(v).format(k=key)
        for n, v in hdrs.items()
    }
    decision = authorizer.check(CheckInput(method="GET", path="/", headers=filled))
    assert decision.reason == "multiple_keys"


@pytest.mark.parametrize("path", ["/x?api_key=abc", "/x?a=1&APIKEY=abc", "/x?apikey"])
def test_key_in_query_string_is_refused(
    authorizer: Authorizer, acme_key: tuple[str, str], path: str
) -> None:
    """?api_key= is refused even when a valid header key is also sent."""
    decision = check(authorizer, path=path, x_api_key=acme_key[1])
    assert (decision.status, decision.reason) == (401, "key_in_query")


def test_query_check_can_be_switched_off(resolver: KeyResolver, acme_key: tuple[str, str]) -> None:
    """With no query_key_params configured, query strings are not inspected."""
    authorizer = Authorizer(resolver, query_key_params=())
    assert check(authorizer, path="/x?api_key=1", x_api_key=acme_key[1]).allowed


def test_unknown_key_is_401_and_cached_negatively(
    authorizer: Authorizer, store: CountingStore, keys: APIKeyManager, tenants: TenantManager
) -> None:
    """An unknown well-formed key costs one lookup, then hits the negative cache."""
    from extauthz.keys import generate_key

    stranger = generate_key()
    assert check(authorizer, x_api_key=stranger).reason == "unknown_key"
    assert check(authorizer, x_api_key=stranger).reason == "unknown_key"
    assert store.lookups == 1


def test_valid_key_is_cached(
    authorizer: Authorizer, store: CountingStore, acme_key: tuple[str, str]
) -> None:
    """Repeated checks of one key reach the store once."""
    for _ in range(5):
        assert check(authorizer, x_api_key=acme_key[1]).allowed
    assert store.lookups == 1


def test_revoked_key_is_refused_at_once_in_process(
    authorizer: Authorizer, keys: APIKeyManager, acme_key: tuple[str, str]
) -> None:
    """Revoking through the manager drops the cached entry: the next check is key_revoked."""
    key_id, key = acme_key
    assert check(authorizer, x_api_key=key).allowed
    keys.revoke_key(key_id)
    assert check(authorizer, x_api_key=key).reason == "key_revoked"


def test_revocation_from_another_process_lands_on_refresh(
    authorizer: Authorizer, store: CountingStore, clock: ManualClock, acme_key: tuple[str, str]
) -> None:
    """A change made behind the cache's back is seen after refresh() notices the revision."""
    key_id, key = acme_key
    authorizer.resolver.refresh()
    assert check(authorizer, x_api_key=key).allowed
    store.revoke_key(key_id, clock.now())  # as the CLI in another process would
    assert check(authorizer, x_api_key=key).allowed  # still cached
    assert authorizer.resolver.refresh()
    assert check(authorizer, x_api_key=key).reason == "key_revoked"


def test_key_that_expires_while_cached_is_refused(
    authorizer: Authorizer, keys: APIKeyManager, clock: ManualClock
) -> None:
    """Expiry is re-checked on every cache hit."""
    TenantManager(keys.store, clock).create_tenant("t", tenant_id="t")
    _, key = keys.create_key("t", "short", expires_in=60)
    assert check(authorizer, x_api_key=key).allowed
    clock.advance(61)
    decision = check(authorizer, x_api_key=key)
    assert (decision.status, decision.reason) == (401, "key_expired")


def test_suspended_tenant_is_403(
    authorizer: Authorizer, tenants: TenantManager, acme_key: tuple[str, str]
) -> None:
    """A valid key of a suspended tenant gets 403 tenant_suspended, and works again on resume."""
    tenants.suspend("acme")
    authorizer.resolver.invalidate()
    decision = check(authorizer, x_api_key=acme_key[1])
    assert (decision.status, decision.reason) == (403, "tenant_suspended")
    assert "www-authenticate" not in dict(decision.client_headers)
    tenants.resume("acme")
    authorizer.resolver.invalidate()
    assert check(authorizer, x_api_key=acme_key[1]).allowed


def test_rotated_key_works_until_grace_ends(
    authorizer: Authorizer, keys: APIKeyManager, clock: ManualClock, acme_key: tuple[str, str]
) -> None:
    """After rotation both keys work; after the grace period only the new one does."""
    old_id, old = acme_key
    new_id, new = keys.rotate_key(old_id, grace=3600)
    assert check(authorizer, x_api_key=old).allowed
    assert dict(check(authorizer, x_api_key=new).upstream_headers)["x-api-key-id"] == new_id
    clock.advance(3601)
    assert check(authorizer, x_api_key=old).reason == "key_expired"
    assert check(authorizer, x_api_key=new).allowed


def test_store_failure_is_503_fail_closed(
    authorizer: Authorizer, store: CountingStore, acme_key: tuple[str, str]
) -> None:
    """When the store raises, the answer is an explicit 503 with Retry-After, never allow."""
    store.fail = StoreError("disk on fire")
    decision = check(authorizer, x_api_key=acme_key[1])
    assert (decision.allowed, decision.status, decision.reason) == (False, 503, "store_unavailable")
    assert dict(decision.client_headers)["retry-after"] == "1"


def test_cached_keys_keep_working_while_the_store_is_down_up_to_the_hard_age(
    authorizer: Authorizer,
    store: CountingStore,
    clock: ManualClock,
    acme_key: tuple[str, str],
) -> None:
    """Past the cache TTL (30 s) a known key whose lookup fails is still allowed from
    the stale copy; past the hard age (300 s) it gets 503. An unknown key gets 503."""
    assert check(authorizer, x_api_key=acme_key[1]).allowed
    store.fail = StoreError("connection refused")
    clock.advance(31)
    assert check(authorizer, x_api_key=acme_key[1]).allowed
    assert authorizer.resolver.stats["stale"] == 1
    assert check(authorizer, x_api_key=generate_key("nk")).reason == "store_unavailable"
    clock.advance(300)
    assert check(authorizer, x_api_key=acme_key[1]).reason == "store_unavailable"
    store.fail = None
    assert check(authorizer, x_api_key=acme_key[1]).allowed


def test_a_change_seen_in_the_store_also_drops_the_stale_copies(
    authorizer: Authorizer,
    store: CountingStore,
    keys: APIKeyManager,
    clock: ManualClock,
    acme_key: tuple[str, str],
) -> None:
    """A key revoked (and noticed by refresh) is not revived by a later outage."""
    assert check(authorizer, x_api_key=acme_key[1]).allowed
    keys.revoke_key(acme_key[0])
    authorizer.resolver.refresh()
    store.fail = StoreError("connection refused")
    assert check(authorizer, x_api_key=acme_key[1]).reason == "store_unavailable"


def test_configured_header_names_are_used(resolver: KeyResolver, acme_key: tuple[str, str]) -> None:
    """With key_headers=('x-custom-key',), only that header carries a key."""
    authorizer = Authorizer(resolver, key_headers=("x-custom-key",))
    assert check(authorizer, x_custom_key=acme_key[1]).allowed
    assert check(authorizer, x_api_key=acme_key[1]).reason == "missing_key"
    assert "x-custom-key" in body(check(authorizer))["message"]


def test_every_reason_has_a_status_and_message() -> None:
    """The reason table is complete: every entry is a 4xx/5xx with a message."""
    for reason, spec in REASONS.items():
        assert 400 <= spec.status < 600, reason
        assert spec.message


def test_deny_bodies_never_echo_the_presented_key(
    authorizer: Authorizer, acme_key: tuple[str, str], keys: APIKeyManager
) -> None:
    """No deny answer contains the key that was presented."""
    key_id, key = acme_key
    keys.revoke_key(key_id)
    for hdrs in ({"x_api_key": key}, {"x_api_key": key + "x"}, {"authorization": f"Bearer {key}"}):
        decision = check(authorizer, **hdrs)
        assert key not in decision.body.decode() + repr(decision)


def test_lookup_racing_a_revocation_is_not_cached(
    authorizer: Authorizer, store: CountingStore, keys: APIKeyManager, acme_key: tuple[str, str]
) -> None:
    """A lookup that read the key just before it was revoked may answer that one request,
    but must not put the stale 'active' entry back into the cache after it was dropped."""
    import threading

    key_id, key = acme_key
    store.gate = threading.Event()
    results: list[Decision] = []
    reader = threading.Thread(target=lambda: results.append(check(authorizer, x_api_key=key)))
    reader.start()
    assert store.entered.wait(5)  # the reader has read the row as active
    keys.revoke_key(key_id)  # commits and drops the cache while the reader is mid-lookup
    store.gate.set()
    reader.join(5)
    store.gate = None
    assert results[0].allowed
    assert check(authorizer, x_api_key=key).reason == "key_revoked"


def test_unknown_and_revoked_keys_take_the_same_path(
    authorizer: Authorizer, store: CountingStore, keys: APIKeyManager, acme_key: tuple[str, str]
) -> None:
    """BAD_INPUTS #8: an unknown key and a revoked key each cost one lookup, and each is
    cached after it (the time difference is measured by `python -m bench.core`)."""
    from extauthz.keys import generate_key

    key_id, revoked = acme_key
    keys.revoke_key(key_id)
    for presented in (generate_key(), revoked):
        before = store.lookups
        check(authorizer, x_api_key=presented)
        check(authorizer, x_api_key=presented)
        assert store.lookups == before + 1


def test_allow_decision_is_reused_until_the_cache_drops(
    authorizer: Authorizer, keys: APIKeyManager, acme_key: tuple[str, str]
) -> None:
    """The same key through the same header returns the very same Decision object (so
    transports can cache its bytes); any invalidation makes a fresh one."""
    first = check(authorizer, x_api_key=acme_key[1])
    assert check(authorizer, x_api_key=acme_key[1]) is first
    authorizer.resolver.invalidate()
    again = check(authorizer, x_api_key=acme_key[1])
    assert again is not first
    assert again == first


def test_encoded_answers_encode_each_decision_once() -> None:
    """EncodedAnswers calls the encoder once per Decision object, and again for a new one."""
    from extauthz.transport import EncodedAnswers

    calls: list[Decision] = []

    def encode(decision: Decision) -> bytes:
        calls.append(decision)
        return decision.reason.encode()

    encoded = EncodedAnswers(encode, limit=2)
    a, b, c = (Decision(True, 200, r) for r in ("a", "b", "c"))
    assert [encoded(a), encoded(a), encoded(b), encoded(c), encoded(a)] == [
        b"a",
        b"a",
        b"b",
        b"c",
        b"a",
    ]
    assert calls == [a, b, c, a]  # the third entry reached the limit and reset the cache


def public_authorizer(resolver: KeyResolver) -> Authorizer:
    from extauthz.policy import parse_policy

    policy = parse_policy(
        "routes:\n  - path: /healthz\n    public: true\n  - prefix: /docs/\n    public: true\n"
    )
    return Authorizer(resolver, policy=policy)


def test_public_route_needs_no_key_and_strips_forged_identity(
    resolver: KeyResolver, store: CountingStore
) -> None:
    """A public path is allowed without a key or a lookup; identity headers and key
    headers are removed so the upstream never sees forged or leaked ones."""
    decision = check(public_authorizer(resolver), path="/healthz", x_tenant_id="evil")
    assert (decision.allowed, decision.reason, decision.upstream_headers) == (True, "public", ())
    assert {"x-tenant-id", "x-tenant-tier", "x-api-key-id", "x-api-key"} <= set(
        decision.remove_headers
    )
    assert "authorization" not in decision.remove_headers  # Basic auth is the upstream's
    assert store.lookups == 0


def test_public_route_removes_a_bearer_key(resolver: KeyResolver) -> None:
    """A Bearer key sent to a public path is removed, not forwarded."""
    decision = check(public_authorizer(resolver), path="/docs/x", authorization="Bearer nk_x")
    assert "authorization" in decision.remove_headers


def test_public_route_matching_is_exact_or_prefix_only(resolver: KeyResolver) -> None:
    """/healthz is public; /healthzz and /admin still need a key; a key in the query
    string is refused even on a public path."""
    authorizer = public_authorizer(resolver)
    assert check(authorizer, path="/healthz?verbose=1").allowed
    assert check(authorizer, path="/healthzz").reason == "missing_key"
    assert check(authorizer, path="/admin").reason == "missing_key"
    assert check(authorizer, path="/healthz?api_key=x").reason == "key_in_query"


def test_the_key_cache_holds_at_most_its_size_and_drops_the_oldest_read(
    store: CountingStore, clock: ManualClock, keys: APIKeyManager, tenants: TenantManager
) -> None:
    """With room for 2 keys, a third key's read drops the oldest: the first key needs
    the store again, the two newest do not; one tenant's keys share one Tenant."""
    tenants.create_tenant("acme", TenantTier.PROFESSIONAL, tenant_id="acme")
    small = KeyResolver(store, PEPPER, clock, ttl=30, negative_ttl=5, size=2)
    presented = [keys.create_key("acme", f"k{i}")[1] for i in range(3)]
    for key in presented:
        assert small.resolve(key).reason is None
    assert store.lookups == 3
    assert [small.resolve(k).reason for k in presented[1:]] == [None, None]
    assert store.lookups == 3  # both still cached
    first, second = small.resolve(presented[0]), small.resolve(presented[2])
    assert store.lookups == 4  # the first was dropped, and read again
    assert first.tenant is second.tenant
