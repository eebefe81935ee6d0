"""pytest fixtures for a throwaway MariaDB (loaded as a plugin by tests/conftest.py).

- ``mariadb`` (session): a running :class:`MariaDBServer` on 127.0.0.1, stopped at the end.
- ``maria_database`` (function): a fresh database and a user with every privilege on it
  (random password), dropped after the test.
- ``pymysql_venv`` / ``mysqlclient_venv`` (session): the default app venv plus PyMySQL /
  mysqlclient.

Where the server cannot run, tests using these skip with the reason, or fail when CI=true.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness.apps import DEFAULT_REQUIREMENTS
from tests.harness.mariadb import MariaDatabase, MariaDBServer, mariadb_unavailable_reason
from tests.harness.throwaway import fresh_database, running

PYMYSQL_REQUIREMENTS = (*DEFAULT_REQUIREMENTS, "pymysql==1.1.1")
# mysqlclient (MySQLdb) builds against libmariadb-dev (pkg-config), installed by .ci/setup.
MYSQLCLIENT_REQUIREMENTS = (*DEFAULT_REQUIREMENTS, "mysqlclient==2.2.7")


@pytest.fixture(scope="session")
def mariadb() -> Iterator[MariaDBServer]:
    """A throwaway MariaDB (Debian's mariadb-server) for the whole session."""
    # With the server installed a start failure is a real error (with its log), never a skip.
    yield from running(mariadb_unavailable_reason, MariaDBServer)


@pytest.fixture
def maria_database(mariadb: MariaDBServer) -> Iterator[MariaDatabase]:
    """A fresh database + user (ALL PRIVILEGES on it, random password)."""
    yield from fresh_database(mariadb)


@pytest.fixture(scope="session")
def pymysql_venv(make_venv: Callable[[tuple[str, ...]], Path]) -> Path:
    """The default test app venv with PyMySQL added."""
    return make_venv(PYMYSQL_REQUIREMENTS)


@pytest.fixture(scope="session")
def mysqlclient_venv(make_venv: Callable[[tuple[str, ...]], Path]) -> Path:
    """The default test app venv with mysqlclient (MySQLdb) added."""
    return make_venv(MYSQLCLIENT_REQUIREMENTS)
