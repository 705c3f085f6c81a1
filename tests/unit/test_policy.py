"""The tier policy: defaults, overrides, routes, and strict validation with file:line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from extauthz.cli import main
from extauthz.model import TenantTier
from extauthz.policy import DEFAULT_TIERS, PolicyError, load_policy, parse_policy

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "policy"

# One fixture file per validation error, with the exact message it must produce.
ERRORS = {
    "unknown_key.yaml": "3: unknown key 'concurent' in tiers.free (known: concurrent, "
    "cost_per_1k_tokens, key_rate_limit, on_counters_down, rate_limit, requests_per_day, shadow, "
    "tokens_per_day, tokens_per_request)",
    "unknown_tier.yaml": "2: unknown key 'gold' in tiers (known: enterprise, free, "
    "professional, starter)",
    "negative.yaml": "3: tiers.free.requests_per_day must be at least 0, not -1",
    "wrong_type.yaml": "3: tiers.starter.concurrent must be a whole number, not 'ten'",
    "nan_cost.yaml": "3: tiers.free.cost_per_1k_tokens must be a finite number, not nan",
    "rate_missing_burst.yaml": "3: tiers.free.rate_limit needs burst",
    "bad_bool.yaml": "3: tiers.free.shadow must be true or false, not 'yes please'",
    "route_both.yaml": "2: routes[0] needs exactly one of path or prefix",
    "route_relative.yaml": "2: routes[0] path must start with '/'",
    "route_cost_zero.yaml": "3: routes[0].cost must be at least 1, not 0",
    "bad_timezone.yaml": "1: unknown time zone 'Mars/Olympus' (e.g. UTC, Europe/Berlin)",
    "not_mapping.yaml": "2: tiers.free must be a mapping",
    "duplicate.yaml": "4: 'concurrent' appears twice in tiers.free",
    "broken_yaml.yaml": "2: not valid YAML: expected ',' or '}', but got '<stream end>'",
    "tenant_float.yaml": "3: tenants.t_1.requests_per_day must be a whole number, not 2.5",
    "python_tag.yaml": "3: tiers.free.concurrent: could not determine a constructor for "
    "the tag 'tag:yaml.org,2002:python/name:os.system'",
    "tokens_per_day_negative.yaml": "3: tenants.t_1.tokens_per_day must be at least 0, not -5",
    "key_rate_missing.yaml": "3: tiers.free.key_rate_limit needs requests_per_minute",
    "unknown_top.yaml": "1: unknown key 'limits' in the policy (known: audit, retention, "
    "routes, security, tenants, tiers, timezone, tokens, webhooks)",
    "webhook_bad_url.yaml": "3: webhooks.t_1.url must start with https:// or http://",
    "webhook_bad_event.yaml": "5: webhooks.t_1.events: 'KEY_CREATED' is not one of "
    "QUOTA_EXCEEDED, KEY_REVOKED, SECURITY_ALERT",
    "allowed_too_big.yaml": "2: audit.allowed must be none, all or a share from 0 to 1, not 2",
    "allowed_word.yaml": "2: audit.allowed must be none, all or a share from 0 to 1, not 'some'",
    "allowed_twice.yaml": "3: audit.sample_allowed was replaced by audit.allowed: keep only "
    "allowed",
    "security_zero.yaml": "2: security.max_auth_failures must be at least 1, not 0",
}


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_each_invalid_policy_names_file_line_and_problem(name: str) -> None:
    """Every fixture is refused with exactly its message, prefixed by file and line."""
    path = FIXTURES / name
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    assert str(err.value) == f"{path}:{ERRORS[name]}"


def test_every_fixture_has_an_expected_message() -> None:
    """No fixture file is left untested."""
    assert {p.name for p in FIXTURES.glob("*.yaml")} == set(ERRORS)


def test_shipped_policy_is_valid_and_matches_the_builtin_defaults() -> None:
    """config/policy.yaml loads and states exactly the seed's tier defaults."""
    policy = load_policy(ROOT / "config" / "policy.yaml")
    assert policy.tiers == DEFAULT_TIERS
    assert (
        policy.tiers[TenantTier.FREE].requests_per_day,
        policy.tiers[TenantTier.ENTERPRISE].concurrent,
    ) == (1_000, 500)
    assert policy.route("/healthz") is not None


@pytest.mark.parametrize(
    ("text", "share"), [("", 0.0), ("none", 0.0), ("all", 1.0), ("0.25", 0.25), ("0", 0.0)]
)
def test_audit_allowed_is_none_by_default_and_takes_none_all_or_a_share(
    text: str, share: float
) -> None:
    """Allowed requests are not audited unless the policy says so: none, all or a share."""
    policy = parse_policy(f"audit:\n  allowed: {text}\n" if text else "")
    assert policy.audit.allowed == share
    assert policy.notices == ()


def test_the_old_sample_allowed_still_loads_with_a_warning_naming_its_replacement(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """audit.sample_allowed is read as audit.allowed, and `policy check` warns (file:line)
    that it is deprecated and what changed; the policy still checks OK."""
    path = tmp_path / "old.yaml"
    path.write_text("audit:\n  sample_allowed: 0.5\n")
    assert load_policy(path).audit.allowed == 0.5
    assert main(["policy", "check", str(path)]) == 0
    out = capsys.readouterr()
    assert f"warning: {path}:2: audit.sample_allowed is deprecated; read as audit.allowed: 0.5" in (
        out.err
    )
    assert "allowed requests audited: 50%" in out.out
    assert main(["policy", "check", "--json", str(path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["audit"] == {"allowed": 0.5}
    assert report["warnings"][0].startswith(f"{path}:2: audit.sample_allowed is deprecated")


def test_empty_policy_means_builtin_defaults() -> None:
    """An empty file is valid: every tier keeps its defaults."""
    assert parse_policy("").tiers == DEFAULT_TIERS


def test_tier_fields_default_individually() -> None:
    """A tier that sets one field keeps the defaults for the others."""
    policy = parse_policy("tiers:\n  free:\n    concurrent: 7\n")
    free = policy.tiers[TenantTier.FREE]
    assert free.concurrent == 7
    assert free.requests_per_day == DEFAULT_TIERS[TenantTier.FREE].requests_per_day


def test_tenant_override_applies_only_to_that_tenant() -> None:
    """limits_for merges a tenant's overrides over its tier; other tenants see the tier."""
    policy = parse_policy("tenants:\n  t_big:\n    requests_per_day: 250000\n    shadow: true\n")
    big = policy.limits_for("t_big", TenantTier.STARTER)
    assert (big.requests_per_day, big.shadow, big.concurrent) == (250_000, True, 10)
    assert policy.limits_for("t_other", TenantTier.STARTER) == DEFAULT_TIERS[TenantTier.STARTER]


def test_routes_match_first_rule_on_the_path_without_query() -> None:
    """Exact paths and prefixes match in order; the query string is ignored."""
    policy = parse_policy(
        "routes:\n  - path: /healthz\n    public: true\n  - prefix: /v1/emb\n    cost: 3\n"
    )
    assert policy.route("/healthz?x=1").public  # type: ignore[union-attr]
    assert policy.route("/healthz/") is None
    assert policy.route("/v1/embeddings").cost == 3  # type: ignore[union-attr]
    assert policy.route("/admin") is None


def test_version_is_a_content_hash() -> None:
    """The version changes with the file's content and is stable for the same bytes."""
    a, b = parse_policy("timezone: UTC\n"), parse_policy("timezone: Europe/Berlin\n")
    assert a.version != b.version
    assert a.version == parse_policy("timezone: UTC\n").version
    assert len(a.version) == 12


def test_policy_check_command(capsys: pytest.CaptureFixture[str]) -> None:
    """`extauthz policy check` prints OK and the version, or the error with exit 1."""
    assert main(["policy", "check", str(ROOT / "config" / "policy.yaml"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True
    assert report["tiers"]["free"]["requests_per_day"] == 1000
    assert main(["policy", "check", str(FIXTURES / "negative.yaml")]) == 1
    err = capsys.readouterr().err
    assert "negative.yaml:3: tiers.free.requests_per_day must be at least 0" in err
    assert "Traceback" not in err
