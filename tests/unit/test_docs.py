"""The docs document every setting and every deny reason the code has, and every link
between them points at a file that exists."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from extauthz.authorizer import REASONS
from extauthz.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
SETTINGS = (ROOT / "docs" / "settings.md").read_text()
DENIALS = (ROOT / "docs" / "deny-reasons.md").read_text()


def test_every_setting_is_documented_with_its_environment_name() -> None:
    """Each Settings field appears in docs/settings.md with its EXTAUTHZ_ variable."""
    for field in dataclasses.fields(Settings):
        if field.name == "given":
            continue  # which settings were given, not a setting
        env = f"`EXTAUTHZ_{field.name.upper()}` |"
        # The pepper has no settings-file name: it is accepted from the environment only.
        assert f"| `{field.name}` | {env}" in SETTINGS or f"| — | {env}" in SETTINGS, field.name


def test_every_documented_default_is_the_codes_default() -> None:
    """The default column of docs/settings.md, read with each setting's own parser,
    equals the Settings default (defaults that name other settings or paths, such as
    `<data_dir>/pepper`, are prose and skipped)."""
    from extauthz.settings import _PARSERS

    defaults = Settings()
    checked = 0
    for name, default in re.findall(
        r"^\| `(\w+)` \| `EXTAUTHZ_\w+` \| `([^`]*)` \|", SETTINGS, re.M
    ):
        if "<" in default or "$" in default:
            continue
        parsed = _PARSERS[name](default, f"docs/settings.md: {name}")
        assert parsed == getattr(defaults, name), name
        checked += 1
    assert checked >= 30, checked


def test_the_readme_settings_table_agrees_with_the_code() -> None:
    """Each README row (one variable or several, with one default each) names a real
    setting and its default, as the code has it (prose defaults are skipped)."""
    from extauthz.settings import _PARSERS

    defaults = Settings()
    rows = re.findall(r"^\| (`EXTAUTHZ_[^|]*) \| ([^|]*) \|", README, re.M)
    assert len(rows) >= 10, rows
    checked = 0
    for names_cell, defaults_cell in rows:
        names = re.findall(r"`EXTAUTHZ_(\w+)`", names_cell)
        values = re.findall(r"`([^`]*)`", defaults_cell)
        for i, env_name in enumerate(names):
            name = env_name.lower()
            assert name in _PARSERS, env_name
            if len(values) != len(names) or "<" in values[i] or "~" in values[i]:
                continue
            assert _PARSERS[name](values[i], f"README: {name}") == getattr(defaults, name), name
            checked += 1
    assert checked >= 8, checked


def test_every_deny_reason_is_documented_with_its_status() -> None:
    """Each reason code appears in docs/deny-reasons.md's table with its HTTP status, and
    by name in the README's summary."""
    for reason, spec in REASONS.items():
        assert f"| `{reason}` | {spec.status} |" in DENIALS, reason
        assert f"`{reason}`" in README or reason in {"invalid_token_count",
            "token_limit_exceeded", "invalid_request", "store_unavailable",
            "limits_unavailable", "audit_unavailable", "internal_error"}, reason  # fmt: skip


def test_the_readme_stays_short() -> None:
    """The README is a way in (under 400 lines); the reference lives in docs/."""
    assert len(README.splitlines()) < 400


def test_every_relative_link_in_the_docs_resolves() -> None:
    """Links between README.md, CONTRIBUTING.md and docs/*.md point at files that exist
    (anchors aside)."""
    pages = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name}: {target}"
