"""The `extauthz` command, run in-process against a temporary data directory."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from extauthz.cli import main


@pytest.fixture(autouse=True)
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EXTAUTHZ_DATA_DIR", str(tmp_path))
    for name in ("EXTAUTHZ_DATABASE_URL", "EXTAUTHZ_PEPPER", "EXTAUTHZ_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> object:
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def test_init_creates_0600_pepper_and_database_and_is_idempotent(
    capsys: pytest.CaptureFixture[str], data_dir: Path
) -> None:
    """init writes the pepper (0600) and schema; running it again changes nothing."""
    first = run_json(capsys, "init")
    pepper = (data_dir / "pepper").read_text()
    assert first["pepper_created"] is True  # type: ignore[index]
    assert stat.S_IMODE((data_dir / "pepper").stat().st_mode) == 0o600
    second = run_json(capsys, "init")
    assert second["pepper_created"] is False  # type: ignore[index]
    assert (data_dir / "pepper").read_text() == pepper


def test_tenant_and_key_json_contract(capsys: pytest.CaptureFixture[str]) -> None:
    """tenants create --json has id/name/tier/status; keys create --json has key_id/key/
    tenant_id/expires_at."""
    tenant = run_json(capsys, "tenants", "create", "acme", "--tier", "starter")
    assert {k: tenant[k] for k in ("name", "tier", "status")} == {  # type: ignore[index]
        "name": "acme",
        "tier": "starter",
        "status": "active",
    }
    key = run_json(capsys, "keys", "create", "acme", "--name", "ci", "--expires-in", "30d")
    assert key["tenant_id"] == tenant["id"]  # type: ignore[index]
    assert key["key"].startswith("nk_")  # type: ignore[index]
    assert key["key_id"].startswith("key_")  # type: ignore[index]
    assert key["expires_at"]  # type: ignore[index]
    no_expiry = run_json(capsys, "keys", "create", "acme")
    assert no_expiry["expires_at"] is None  # type: ignore[index]


def test_key_is_shown_once_and_never_listed(capsys: pytest.CaptureFixture[str]) -> None:
    """keys list/show print key ids but never the key itself."""
    run(capsys, "tenants", "create", "acme")
    key = run_json(capsys, "keys", "create", "acme")
    _, listing, _ = run(capsys, "keys", "list", "acme")
    _, shown, _ = run(capsys, "keys", "show", key["key_id"])  # type: ignore[index]
    assert key["key_id"] in listing  # type: ignore[index]
    assert key["key"] not in listing + shown  # type: ignore[index]


def test_unknown_tenant_is_a_clear_error_without_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An unknown tenant exits 3 with one line that names it, and no traceback."""
    code, out, err = run(capsys, "keys", "create", "ghost")
    assert code == 3
    assert "no tenant with id or name 'ghost'" in err
    assert "Traceback" not in out + err


@pytest.mark.parametrize(
    ("argv", "code", "text"),
    [
        (["tenants", "create", "x", "--tier", "gold"], 1, "unknown tier 'gold'"),
        (["keys", "revoke", "key_nope"], 3, "no API key with id"),
        (["keys", "create", "acme", "--expires-in", "soon"], 1, "--expires-in"),
        (["tenants", "create", "acme"], 4, "already exists"),
    ],
)
def test_errors_have_exit_codes_and_plain_messages(
    capsys: pytest.CaptureFixture[str], argv: list[str], code: int, text: str
) -> None:
    """Bad tier (1), unknown key (3), bad duration (1), duplicate name (4)."""
    run(capsys, "tenants", "create", "acme")
    got, _, err = run(capsys, *argv)
    assert (got, text in err, "Traceback" in err) == (code, True, False)


def test_tenant_lifecycle(capsys: pytest.CaptureFixture[str]) -> None:
    """suspend, resume, set-tier and delete act on a tenant found by name."""
    run(capsys, "tenants", "create", "acme")
    assert run_json(capsys, "tenants", "suspend", "acme")["status"] == "suspended"  # type: ignore[index]
    assert run_json(capsys, "tenants", "resume", "acme")["status"] == "active"  # type: ignore[index]
    assert run_json(capsys, "tenants", "set-tier", "acme", "enterprise")["tier"] == "enterprise"  # type: ignore[index]
    assert run_json(capsys, "tenants", "show", "acme")["name"] == "acme"  # type: ignore[index]
    assert run_json(capsys, "tenants", "delete", "acme")["deleted"] is True  # type: ignore[index]
    assert run_json(capsys, "tenants", "list") == []


def test_revoke_and_rotate(capsys: pytest.CaptureFixture[str]) -> None:
    """revoke marks the key revoked; rotate issues a new key and sets the old one's end."""
    run(capsys, "tenants", "create", "acme")
    a = run_json(capsys, "keys", "create", "acme")
    b = run_json(capsys, "keys", "create", "acme")
    assert run_json(capsys, "keys", "revoke", a["key_id"])["state"] == "revoked"  # type: ignore[index]
    code, _, err = run(capsys, "keys", "revoke", a["key_id"])  # type: ignore[index]
    assert code == 4
    assert "already revoked" in err
    rotated = run_json(capsys, "keys", "rotate", b["key_id"], "--grace", "2h")  # type: ignore[index]
    old = run_json(capsys, "keys", "show", b["key_id"])  # type: ignore[index]
    assert old["rotated_to"] == rotated["key_id"]  # type: ignore[index]
    assert old["expires_at"] is not None  # type: ignore[index]


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    """--help works for each command and subcommand."""
    for argv in (
        ["init"],
        ["serve"],
        ["up"],
        ["demo"],
        ["envoy-config"],
        ["tenants", "create"],
        ["tenants", "list"],
        ["policy", "check"],
        ["keys", "create"],
        ["keys", "rotate"],
        ["keys", "list"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--help"])
        assert exit_info.value.code == 0
        assert "usage: extauthz" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("mode", "authz", "name"),
    [
        ("grpc", "127.0.0.1:9001", "envoy.yaml"),
        ("http", "127.0.0.1:9002", "envoy-http.yaml"),
        ("bridge", "127.0.0.1:9002", "envoy-bridge.yaml"),
    ],
)
def test_envoy_config_in_repo_matches_renderer(
    capsys: pytest.CaptureFixture[str], mode: str, authz: str, name: str
) -> None:
    """envoy/envoy.yaml, envoy-http.yaml and envoy-bridge.yaml are exactly what `extauthz
    envoy-config` prints for the defaults, so the shipped files and `up` never drift apart."""
    code, out, _ = run(capsys, "envoy-config", "--mode", mode, "--authz", authz)
    root = Path(__file__).resolve().parents[2]
    assert code == 0
    assert out == (root / "envoy" / name).read_text()


def test_wrong_pepper_is_refused_before_any_key_silently_fails(
    capsys: pytest.CaptureFixture[str], data_dir: Path
) -> None:
    """Replacing the pepper file makes every command refuse, naming the mismatch."""
    run(capsys, "init")
    (data_dir / "pepper").write_text("ab" * 32 + "\n")
    code, _, err = run(capsys, "tenants", "list")
    assert code == 1
    assert "is not the one the database" in err


def test_lost_pepper_is_not_silently_recreated(
    capsys: pytest.CaptureFixture[str], data_dir: Path
) -> None:
    """With the database initialised and the pepper file gone, commands refuse to mint a
    new pepper (which would invalidate every key) and say how to recover."""
    run(capsys, "init")
    (data_dir / "pepper").unlink()
    code, _, err = run(capsys, "tenants", "list")
    assert code == 1
    assert "restore the file" in err
    assert not (data_dir / "pepper").exists()


def test_pepper_from_environment_needs_no_file(
    capsys: pytest.CaptureFixture[str], data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EXTAUTHZ_PEPPER replaces the file: init creates none."""
    monkeypatch.setenv("EXTAUTHZ_PEPPER", "cd" * 32)
    result = run_json(capsys, "init")
    assert result["pepper_file"] is None  # type: ignore[index]
    assert not (data_dir / "pepper").exists()


def test_quota_show_reports_todays_counts_against_the_tier(
    capsys: pytest.CaptureFixture[str], data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`quota show --json` gives today's requests and tokens against the policy's limits
    (a tenant override here), as written by the seed API in another runtime."""
    from extauthz import open_runtime

    policy = data_dir / "policy.yaml"
    policy.write_text("tenants:\n  t_q: {requests_per_day: 7}\n")
    monkeypatch.setenv("EXTAUTHZ_POLICY_FILE", str(policy))
    run(capsys, "tenants", "create", "q", "--id", "t_q")
    rt = open_runtime()
    rt.quota("t_q").record_usage(tokens=40)
    rt.close()
    shown = run_json(capsys, "quota", "show", "q")
    assert isinstance(shown, dict)
    assert shown["requests_today"] == 1
    assert shown["requests_remaining"] == 6
    assert shown["tokens_today"] == 40
    assert shown["policy_version"] != "builtin"
    assert run(capsys, "quota", "show", "nobody")[0] == 3


def test_audit_list_shows_events_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    """`audit list --json` returns the stored events, filtered by --action."""
    from extauthz import open_runtime

    rt = open_runtime()
    rt.audit.log_config_changed("failure", "abc", {"error": "x.yaml:1: bad"})
    rt.audit.log_quota_exceeded("t_1")
    rt.close()
    events = run_json(capsys, "audit", "list", "--action", "CONFIG_CHANGED")
    assert isinstance(events, list)
    assert [(e["action"], e["outcome"]) for e in events] == [("CONFIG_CHANGED", "failure")]
    code, out, _ = run(capsys, "audit", "list")
    assert code == 0
    assert "QUOTA_EXCEEDED" in out


def test_envoy_config_follows_the_policy_token_source(
    capsys: pytest.CaptureFixture[str], data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a body field in the policy, the rendered Envoy config sends bodies (up to
    max_body_bytes, no partial bodies) and forwards the policy's token header; the
    access log goes to EXTAUTHZ_ALS_ADDR and logs the usage headers."""
    import yaml

    policy = data_dir / "policy.yaml"
    policy.write_text("tokens: {header: x-token-budget, body_field: max_tokens}\n")
    monkeypatch.setenv("EXTAUTHZ_POLICY_FILE", str(policy))
    monkeypatch.setenv("EXTAUTHZ_ALS_ADDR", "127.0.0.1:9555")
    monkeypatch.setenv("EXTAUTHZ_MAX_BODY_BYTES", "2048")
    code, out, _ = run(capsys, "envoy-config")
    assert code == 0
    config = yaml.safe_load(out)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    ext_authz = hcm["typed_config"]["http_filters"][0]["typed_config"]
    assert ext_authz["with_request_body"] == {
        "max_request_bytes": 2048,
        "allow_partial_message": False,
        "pack_as_bytes": True,
    }
    forwarded = [p["exact"] for p in ext_authz["allowed_headers"]["patterns"]]
    assert "x-token-budget" in forwarded
    log = hcm["typed_config"]["access_log"][0]["typed_config"]
    assert log["common_config"]["buffer_flush_interval"] == "0.005s"
    assert log["additional_response_headers_to_log"] == [
        "x-usage-input-tokens",
        "x-usage-output-tokens",
    ]
    als = next(c for c in config["static_resources"]["clusters"] if c["name"] == "extauthz_als")
    endpoint = als["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"]["port_value"] == 9555


def test_envoy_config_follows_the_access_log_setting_and_validates(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """EXTAUTHZ_ACCESS_LOG=fluentd: the bootstrap sends the access log with Envoy's
    fluentd logger (only the fields extauthz reads, headers and trailers) over a plain
    TCP cluster, and Envoy 1.40 accepts it."""
    import subprocess

    import yaml

    from extauthz.launcher import find_envoy

    monkeypatch.setenv("EXTAUTHZ_ACCESS_LOG", "fluentd")
    code, out, _ = run(capsys, "envoy-config")
    assert code == 0
    config = yaml.safe_load(out)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    (logger,) = hcm["typed_config"]["access_log"]
    assert logger["name"] == "envoy.access_loggers.fluentd"
    record = logger["typed_config"]["record"]
    assert record["id"] == "%REQ(X-REQUEST-ID)%"
    assert record["r1"] == "%TRAILER(X-USAGE-OUTPUT-TOKENS)%"
    als = next(c for c in config["static_resources"]["clusters"] if c["name"] == "extauthz_als")
    assert "typed_extension_protocol_options" not in als  # TCP, not HTTP/2
    path = tmp_path / "envoy.yaml"
    path.write_text(out)
    checked = subprocess.run(
        [find_envoy(), "--mode", "validate", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
