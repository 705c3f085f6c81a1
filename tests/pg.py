"""PostgreSQL for tests: the server on this machine (.ci/run starts it), one fresh
schema per test so tests never see each other's rows."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

PG_URL = os.environ.get("EXTAUTHZ_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


@contextmanager
def pg_schema(base: str = PG_URL) -> Iterator[str]:
    """A database URL whose search_path is a new, empty schema; dropped afterwards."""
    import psycopg

    name = "t_" + secrets.token_hex(6)
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}")
    try:
        yield f"{base}?options=-csearch_path%3D{name}"
    finally:
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {name} CASCADE")
