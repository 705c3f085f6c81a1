"""Fixtures shared by the unit tests' transports."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from extauthz.authorizer import Authorizer
from extauthz.transport.http_authz import HttpAuthzThread


@pytest.fixture
def port(authorizer: Authorizer) -> Iterator[int]:
    """A plain HTTP-service endpoint on a free loopback port."""
    server = HttpAuthzThread(authorizer)
    bound = server.start("127.0.0.1", 0)
    yield bound
    server.stop(1)
