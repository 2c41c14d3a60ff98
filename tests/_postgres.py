"""The tests' PostgreSQL: one private server per test session (``koala.testing.postgres``)."""

from __future__ import annotations

import pytest

from koala.testing.postgres import PostgresServer as PostgresServer
from koala.testing.postgres import start_server as start_server


@pytest.fixture(scope="session")
def postgres_server() -> PostgresServer:
    """A running private PostgreSQL; the test fails (with the reason) if it cannot start."""
    try:
        return start_server()
    except Exception as exc:
        pytest.fail(f"could not start a private PostgreSQL for the storage tests: {exc}")


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    return postgres_server.url
