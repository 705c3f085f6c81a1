"""The store every contract test runs against: memory, SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from extauthz.auditchain import AuditChain
from extauthz.store import Store, open_store
from tests.services import pg_schema


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    with ExitStack() as stack:
        if request.param == "postgres":
            url = stack.enter_context(pg_schema())
        elif request.param == "sqlite":
            url = f"sqlite:///{tmp_path}/t.db"
        else:
            url = "memory://"
        s = open_store(url)
        stack.callback(s.close)
        s.audit_chain = AuditChain(b"c" * 32)
        yield s
