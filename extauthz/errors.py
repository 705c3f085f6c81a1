"""The exceptions extauthz raises.

    ExtauthzError                 every error of ours; its message is safe to show a user
    ├── ConfigError               a bad setting or settings file
    ├── UsageError                a command used wrongly (exit 2, like argparse's errors)
    ├── NotFoundError             a tenant or key that does not exist
    │   ├── UnknownTenantError
    │   └── UnknownKeyError
    ├── ConflictError             a name that is taken, a key already revoked
    └── StoreError                the database failed (driver errors are wrapped here)

No message ever contains an API key, a key hash or the pepper: callers name keys by
their public key id only; a database or Redis URL appears only through redact().
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


class ExtauthzError(Exception):
    """Base of every extauthz error. The message is meant for the user."""


class ConfigError(ExtauthzError):
    """A setting, the settings file or the pepper is missing or invalid."""


class UsageError(ExtauthzError):
    """Arguments that make no sense together, or point outside what exists."""


class NotFoundError(ExtauthzError):
    """The object asked for does not exist."""


class UnknownTenantError(NotFoundError):
    """No tenant with that id or name."""


class UnknownKeyError(NotFoundError):
    """No API key with that key id."""


class ConflictError(ExtauthzError):
    """The change conflicts with the current state (a duplicate name, say)."""


class StoreError(ExtauthzError):
    """The store could not answer; the driver's own error is chained as the cause."""
