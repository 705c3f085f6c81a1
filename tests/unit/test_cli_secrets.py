"""A secret key typed where an id belongs is recognised and never printed back."""

from __future__ import annotations

import pytest

from extauthz.keys import checksum, looks_secret, without_secrets
from tests.unit.test_cli import data_dir, run, run_json  # noqa: F401 - autouse fixture

UNKNOWN = "nk_" + "Ab3" * 14 + "A_" + checksum("Ab3" * 14 + "A")


@pytest.fixture
def secret(capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    """(key_id, key) of a new key of tenant acme."""
    run_json(capsys, "tenants", "create", "acme")
    made = run_json(capsys, "keys", "create", "acme")
    return made["key_id"], made["key"]  # type: ignore[index]


def test_revoking_by_the_secret_itself_revokes_it_and_names_only_its_id(
    capsys: pytest.CaptureFixture[str], secret: tuple[str, str]
) -> None:
    """`keys revoke <the full key>` revokes that key, answers with its key id, warns
    that the secret may be in the shell history, and never prints the secret."""
    key_id, key = secret
    code, out, err = run(capsys, "keys", "revoke", key)
    assert code == 0
    assert f"revoked API key {key_id}" in out
    assert "shell history" in err
    assert key not in out + err
    assert run_json(capsys, "keys", "show", key_id)["state"] == "revoked"  # type: ignore[index]


@pytest.mark.parametrize("command", [["keys", "revoke"], ["keys", "show"], ["keys", "rotate"]])
def test_an_unknown_secret_is_not_found_without_being_echoed(
    capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    """A well-formed key that is not ours: exit 3, and the message says a secret was
    given without repeating it."""
    run(capsys, "init")
    code, out, err = run(capsys, *command, UNKNOWN)
    assert code == 3
    assert "is a secret key, so it is not shown" in err
    assert UNKNOWN not in out + err


def test_a_secret_in_place_of_a_tenant_or_an_argument_is_never_echoed(
    capsys: pytest.CaptureFixture[str], secret: tuple[str, str]
) -> None:
    """A key pasted as a tenant name, or as an argument argparse refuses, is hidden
    from the error; other values are still quoted."""
    _, key = secret
    code, _, err = run(capsys, "tenants", "show", key)
    assert (code, key in err) == (3, False)
    assert "looks like an API key, not shown" in err
    with pytest.raises(SystemExit) as refused:
        run(capsys, "keys", "create", "acme", key)
    assert refused.value.code == 2
    assert key not in capsys.readouterr().err
    code, _, err = run(capsys, "tenants", "show", "no-such-tenant")
    assert "'no-such-tenant'" in err


@pytest.mark.parametrize(
    ("text", "secret_like"),
    [
        (UNKNOWN, True),
        (UNKNOWN[:-12], True),  # a key cut short is still most of a secret
        ("key_Oz9dW3kLm2Pq8Rst", False),  # a key id: 16 random characters
        ("acme-production-2026", False),
        ("averyveryverylongtenantnamewithoutdigits", False),
    ],
)
def test_secret_detection_tells_keys_from_ids_and_names(text: str, secret_like: bool) -> None:
    """Long mixed-case base62 runs with digits (256 random bits) count as secrets; key
    ids and ordinary names do not."""
    assert looks_secret(text) is secret_like
    assert (text in without_secrets(f"x {text} y")) is not secret_like
