"""pytest fixtures for a throwaway PostgreSQL cluster (loaded as a plugin by tests/conftest.py).

- ``pg`` (session): a running :class:`PostgresCluster` on 127.0.0.1, stopped at session end.
- ``pg_database`` (function): a fresh database owned by a fresh LOGIN role with a random
  password (:class:`PgDatabase`), dropped (WITH FORCE) after the test.

Where the cluster cannot run, tests using these skip with the reason, or fail when CI=true.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness.postgres import (
    PgDatabase,
    PostgresCluster,
    postgres_unavailable_reason,
)
from tests.harness.throwaway import fresh_database, running


@pytest.fixture(scope="session")
def pg() -> Iterator[PostgresCluster]:
    """A throwaway PostgreSQL 15 cluster for the whole session (superuser: ``postgres``)."""
    # With the binaries present a start failure is a real error (PostgresError with the
    # server log), never a skip.
    yield from running(postgres_unavailable_reason, PostgresCluster)


@pytest.fixture
def pg_database(pg: PostgresCluster) -> Iterator[PgDatabase]:
    """A fresh database + owner role (random password) on the session cluster."""
    yield from fresh_database(pg)
