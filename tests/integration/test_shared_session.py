"""One kept session child per launch identity (agent/privileged/sessionpool.py with
agent/privileged/sharedkey.py): two units of the same user, venv and environment but for
DATABASE_URL share one real child as the unit's user, a connection per database, against a
real PostgreSQL; one connection's trouble never reaches the other's answers."""

from __future__ import annotations

import dataclasses
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from agent.context import AppContext
from agent.privileged.sessionpool import SessionPool
from agent.privileged.sources import database
from tests.harness.postgres import PgDatabase, PostgresCluster
from tests.harness.throwaway import fresh_database
from tests.integration.test_user_session import TIMEOUTS, unit_ctx

pytestmark = pytest.mark.postgres


@pytest.fixture
def other_database(pg: PostgresCluster) -> Iterator[PgDatabase]:
    """A second fresh database with its own owner and password."""
    yield from fresh_database(pg)


def unit(venv: Path, name: str, db: PgDatabase, **env: str) -> AppContext:
    """A gunicorn unit whose DATABASE_URL names db."""
    return dataclasses.replace(unit_ctx(venv, {"DATABASE_URL": db.url, **env}), unit=name)


def ask(pool: SessionPool, ctx: AppContext, db: PgDatabase, sql: str) -> Any:
    with pool.borrow(ctx, db.url, TIMEOUTS) as conn:
        return conn.execute(text(sql)).scalar()


def test_two_units_of_one_identity_share_one_child(flask_venv: Path, pg_database: PgDatabase,
                                                   other_database: PgDatabase) -> None:
    pool = SessionPool()
    a = unit(flask_venv, "a.service", pg_database)
    b = unit(flask_venv, "b.service", other_database)
    try:
        assert ask(pool, a, pg_database, "SELECT current_database()") == pg_database.name
        assert ask(pool, b, other_database, "SELECT current_database()") == other_database.name
        assert ask(pool, a, pg_database, "SELECT current_user") == pg_database.owner
        assert ask(pool, b, other_database, "SELECT current_user") == other_database.owner
        assert (pool.children_started, pool.started, len(pool.children)) == (1, 2, 1)
        pids = (ask(pool, a, pg_database, "SELECT pg_backend_pid()"),
                ask(pool, b, other_database, "SELECT pg_backend_pid()"))
        pool.begin()   # the next run: each pinged and kept
        assert (ask(pool, a, pg_database, "SELECT pg_backend_pid()"),
                ask(pool, b, other_database, "SELECT pg_backend_pid()")) == pids
        assert ask(pool, b, other_database, "SHOW transaction_read_only") == "on"
        pool.sweep(["a.service"])   # b was not used in this run: its connection ends alone
        assert (len(pool.held), len(pool.children)) == (2, 1)
        pool.begin()
        ask(pool, a, pg_database, "SELECT 1")
        pool.sweep()
        assert (len(pool.held), len(pool.children)) == (1, 1)
        assert other_database.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s",
                                      (pids[1],))[0][0] == 0
    finally:
        pool.close()
    assert pool.children == {}
    assert pg_database.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s",
                               (pids[0],))[0][0] == 0


def test_another_environment_is_another_child(flask_venv: Path, pg_database: PgDatabase,
                                              other_database: PgDatabase) -> None:
    pool = SessionPool()
    try:
        ask(pool, unit(flask_venv, "a.service", pg_database), pg_database, "SELECT 1")
        ask(pool, unit(flask_venv, "b.service", other_database, PGPASSFILE="/nonexistent"),
            other_database, "SELECT 1")
        assert (pool.children_started, len(pool.children)) == (2, 2)
    finally:
        pool.close()


def test_a_lock_timeout_on_one_connection_leaves_the_other(
        flask_venv: Path, pg_database: PgDatabase, other_database: PgDatabase,
        pg: PostgresCluster) -> None:
    pg_database.execute("CREATE TABLE t (x int)")
    pg_database.execute(f'GRANT SELECT ON t TO "{pg_database.owner}"')
    pool = SessionPool()
    a = unit(flask_venv, "a.service", pg_database)
    b = unit(flask_venv, "b.service", other_database)
    locker = pg.connect(pg_database.name, autocommit=False)
    try:
        pid_b = ask(pool, b, other_database, "SELECT pg_backend_pid()")
        assert ask(pool, a, pg_database, "SELECT count(*) FROM t") == 0
        with locker.cursor() as cur:
            cur.execute("LOCK TABLE t IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(database.DatabaseProblem, match="lock"):
            ask(pool, a, pg_database, "SELECT count(*) FROM t")
        # b's connection, on the same child, is untouched and answers its own database.
        assert ask(pool, b, other_database, "SELECT pg_backend_pid()") == pid_b
        assert ask(pool, b, other_database, "SELECT current_database()") == other_database.name
        locker.rollback()
        assert ask(pool, a, pg_database, "SELECT count(*) FROM t") == 0   # a new connection
        assert (pool.children_started, pool.started) == (1, 3)
    finally:
        locker.close()
        pool.close()


def test_a_terminated_backend_is_replaced_alone(flask_venv: Path, pg_database: PgDatabase,
                                                other_database: PgDatabase) -> None:
    pool = SessionPool()
    a = unit(flask_venv, "a.service", pg_database)
    b = unit(flask_venv, "b.service", other_database)
    try:
        pid_a = ask(pool, a, pg_database, "SELECT pg_backend_pid()")
        pid_b = ask(pool, b, other_database, "SELECT pg_backend_pid()")
        pg_database.execute("SELECT pg_terminate_backend(%s)", (pid_a,))
        pool.begin()
        assert ask(pool, a, pg_database, "SELECT pg_backend_pid()") != pid_a
        assert ask(pool, b, other_database, "SELECT pg_backend_pid()") == pid_b
        assert ask(pool, a, pg_database, "SELECT current_database()") == pg_database.name
        assert pool.children_started == 1
    finally:
        pool.close()


def test_a_frozen_backend_replaces_the_child_and_the_other_still_answers_its_own(
        flask_venv: Path, pg_database: PgDatabase, other_database: PgDatabase) -> None:
    pool = SessionPool()
    a = unit(flask_venv, "a.service", pg_database)
    b = unit(flask_venv, "b.service", other_database)
    pid_a = ask(pool, a, pg_database, "SELECT pg_backend_pid()")
    ask(pool, b, other_database, "SELECT 1")
    os.kill(pid_a, signal.SIGSTOP)
    try:
        pool.begin()
        assert ask(pool, a, pg_database, "SELECT current_database()") == pg_database.name
        assert ask(pool, b, other_database, "SELECT current_database()") == other_database.name
        assert (pool.children_started, len(pool.children)) == (2, 1)
    finally:
        os.kill(pid_a, signal.SIGCONT)
        pool.close()


def test_one_urls_secret_never_in_the_others_errors(flask_venv: Path, pg_database: PgDatabase,
                                                    other_database: PgDatabase) -> None:
    pool = SessionPool()
    a = unit(flask_venv, "a.service", pg_database)
    b = unit(flask_venv, "b.service", other_database)
    try:
        ask(pool, a, pg_database, "SELECT 1")
        with pytest.raises(database.DatabaseProblem) as err:
            # b's error quotes a's password: masked, though b's own URL does not hold it.
            ask(pool, b, other_database, f'SELECT * FROM "{pg_database.password}"')
        assert pool.children_started == 1
        assert pg_database.password not in str(err.value)
        assert "does not exist" in str(err.value)
    finally:
        pool.close()
