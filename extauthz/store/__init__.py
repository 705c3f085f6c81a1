"""Stores picked by URL scheme: ``sqlite:///path/to/db``, ``postgresql://...`` or
``memory://``."""

from __future__ import annotations

from pathlib import Path

from extauthz.errors import ConfigError
from extauthz.store.base import Store

__all__ = ["Store", "open_store"]


def open_store(url: str, timeout: float = 0.25) -> Store:
    """``timeout``: how long a key lookup may wait on a networked database."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ConfigError(
            f"database URL {url!r} has no scheme: use sqlite:///PATH, postgresql://... or memory://"
        )
    if scheme == "sqlite":
        from extauthz.store.sqlite import SQLiteStore

        # sqlite:///relative.db and sqlite:////abs/path.db, as SQLAlchemy spells them.
        path = rest[1:] if rest.startswith("/") else rest
        if not path:
            raise ConfigError(f"database URL {url!r} names no file")
        return SQLiteStore(Path(path), url=url)
    if scheme in ("postgresql", "postgres", "postgresql+psycopg"):
        try:
            from extauthz.store.postgres import PostgresStore
        except ImportError as exc:
            raise ConfigError(
                f"database URL {scheme}://... needs the PostgreSQL client ({exc.name} is not "
                "installed): pip install 'extauthz[postgres]'"
            ) from None
        return PostgresStore(url, timeout=timeout)
    if scheme == "memory":
        from extauthz.store.memory import MemoryStore

        return MemoryStore()
    raise ConfigError(
        f"database URL scheme {scheme!r} is not supported: use sqlite://, postgresql:// "
        "or memory://"
    )
