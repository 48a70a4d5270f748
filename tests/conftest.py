"""Fixtures every tier shares: the throwaway PostgreSQL server (started once, on
first use, for the whole run)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pgserver import PgServer


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    with PgServer() as server:
        yield server
