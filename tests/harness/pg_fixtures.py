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


def _skip_or_fail(reason: str) -> None:
    from tests.conftest import skip_or_fail  # late: conftest imports this plugin

    skip_or_fail(reason)


@pytest.fixture(scope="session")
def pg() -> Iterator[PostgresCluster]:
    """A throwaway PostgreSQL 15 cluster for the whole session (superuser: ``postgres``)."""
    reason = postgres_unavailable_reason()
    if reason:
        _skip_or_fail(reason)
    # With the binaries present a start failure is a real error (PostgresError with the
    # server log), never a skip.
    cluster = PostgresCluster().start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_database(pg: PostgresCluster) -> Iterator[PgDatabase]:
    """A fresh database + owner role (random password) on the session cluster."""
    database = pg.new_database()
    try:
        yield database
    finally:
        pg.drop(database)
