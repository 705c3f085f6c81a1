"""The README documents every setting and every deny reason the code has."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from extauthz.authorizer import REASONS
from extauthz.settings import Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_setting_is_documented_with_its_environment_name() -> None:
    """Each Settings field appears in the README with its EXTAUTHZ_ variable."""
    for field in dataclasses.fields(Settings):
        if field.name == "given":
            continue  # which settings were given, not a setting
        assert f"EXTAUTHZ_{field.name.upper()}" in README, field.name


def test_every_deny_reason_is_documented_with_its_status() -> None:
    """Each reason code appears in the README's table with its HTTP status."""
    for reason, spec in REASONS.items():
        assert f"| `{reason}` | {spec.status} |" in README, reason
