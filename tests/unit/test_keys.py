from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from extauthz.errors import ConfigError
from extauthz.keys import BODY_LEN, KeyFormat, Pepper, checksum, generate_key


def test_generated_key_has_prefix_256_bit_body_and_valid_checksum() -> None:
    """A new key is prefix_body_checksum with a 43-char base62 body and a valid CRC."""
    key = generate_key("nk")
    prefix, body, crc = key.split("_")
    assert prefix == "nk"
    assert len(body) == BODY_LEN
    assert crc == checksum(body)
    assert KeyFormat("nk").problem(key) is None


def test_generated_keys_are_unique() -> None:
    """1,000 generated keys never repeat."""
    assert len({generate_key() for _ in range(1000)}) == 1000


@pytest.mark.parametrize(
    ("presented", "reason"),
    [
        ("", "malformed_key"),
        ("nk_short_abcdef", "malformed_key"),
        ("xx_" + "a" * 43 + "_" + checksum("a" * 43), "malformed_key"),
        ("nk_" + "a" * 43 + "_zzzzzz", "bad_checksum"),
        ("nk_" + "a" * 42 + "\x00_" + checksum("a" * 43), "malformed_key"),
        ("nk_" + "a" * 43 + "_" + checksum("a" * 43) + "\r\n", "malformed_key"),
        ("nk_" + "\u00e9" * 43 + "_abcdef", "malformed_key"),
        ("nk_" + "a" * 1_000_000, "malformed_key"),
    ],
)
def test_format_refuses_malformed_keys_with_a_reason(presented: str, reason: str) -> None:
    """Junk, wrong prefixes, control bytes, non-ASCII and huge inputs are refused by shape."""
    assert KeyFormat("nk").problem(presented) == reason


def test_configured_prefix_is_required() -> None:
    """A key minted with another prefix is malformed for this deployment."""
    assert KeyFormat("acme").problem(generate_key("nk")) == "malformed_key"
    assert KeyFormat("acme").problem(generate_key("acme")) is None


def test_invalid_prefix_is_a_config_error() -> None:
    """Prefixes with separators or capitals are refused when configured."""
    with pytest.raises(ConfigError, match="prefix"):
        KeyFormat("Bad_Prefix")


def test_hash_depends_on_the_pepper() -> None:
    """The same key hashes differently under two peppers, and matches only its own."""
    key = generate_key()
    a, b = Pepper(b"a" * 32), Pepper(b"b" * 32)
    assert a.hash_key(key) != b.hash_key(key)
    assert a.matches(key, a.hash_key(key))
    assert not b.matches(key, a.hash_key(key))


def test_pepper_repr_hides_the_secret() -> None:
    """repr() of a pepper never shows its bytes."""
    assert "aaaa" not in repr(Pepper(b"a" * 32)).lower()


def test_pepper_file_is_created_0600_and_never_overwritten(tmp_path: Path) -> None:
    """init writes a 0600 pepper once; a second create keeps the first."""
    path = tmp_path / "pepper"
    assert Pepper.create(path)
    first = path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not Pepper.create(path)
    assert path.read_text() == first
    assert len(Pepper.load(path).secret) == 32


def test_world_readable_pepper_file_is_refused(tmp_path: Path) -> None:
    """A pepper file others can read is refused, with the chmod that fixes it."""
    path = tmp_path / "pepper"
    Pepper.create(path)
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        Pepper.load(path)


def test_short_or_non_hex_pepper_is_refused() -> None:
    """EXTAUTHZ_PEPPER must be at least 32 bytes of hex."""
    with pytest.raises(ConfigError, match="not hex"):
        Pepper.from_hex("zz", "env")
    with pytest.raises(ConfigError, match="shorter"):
        Pepper.from_hex("ab" * 8, "env")


@pytest.mark.parametrize("secret", [b"p" * 32, b"q" * 64, b"r" * 100, bytes(range(48))])
def test_fast_hmac_equals_the_standard_library(secret: bytes) -> None:
    """Pepper.hash_key is exactly HMAC-SHA256 (RFC 2104), for short and long peppers."""
    import hmac

    for key in (generate_key(), "", "ü" * 10):
        assert Pepper(secret).hash_key(key) == hmac.digest(secret, key.encode(), "sha256")
