"""Long-lived sessions (agent/privileged/sessionpool.py) with the real session child as the
unit's user against a real PostgreSQL: kept, still read-only, never idle in a transaction,
started again after errors."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from sqlalchemy import text

from agent.privileged.dbclient import CURRENT_POOL, user_session
from agent.privileged.sessionpool import SessionPool
from agent.privileged.sources import database
from tests.harness.postgres import PgDatabase
from tests.integration.test_user_session import TIMEOUTS, unit_ctx

pytestmark = pytest.mark.postgres


def backend_pid(pool: SessionPool, ctx: object, url: str) -> int:
    with pool.borrow(ctx, url, TIMEOUTS) as conn:  # type: ignore[arg-type]
        return int(conn.execute(text("SELECT pg_backend_pid()")).scalar())


def test_one_session_is_kept_read_only_and_idle(flask_venv: Path,
                                                pg_database: PgDatabase) -> None:
    pool = SessionPool()
    ctx = unit_ctx(flask_venv)
    try:
        first = backend_pid(pool, ctx, pg_database.url)
        assert backend_pid(pool, ctx, pg_database.url) == first
        assert pool.started == 1
        with pool.borrow(ctx, pg_database.url, TIMEOUTS) as conn:
            assert conn.execute(text("SHOW transaction_read_only")).scalar() == "on"
        state, app = pg_database.execute(
            "SELECT state, application_name FROM pg_stat_activity WHERE pid = %s",
            (first,))[0]
        assert (state, app) == ("idle", "driftwatch")   # kept, but no transaction open
    finally:
        pool.close()
    assert pg_database.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s",
                               (first,))[0][0] == 0


def test_a_lost_connection_is_replaced_before_use(flask_venv: Path,
                                                  pg_database: PgDatabase) -> None:
    pool = SessionPool()
    ctx = unit_ctx(flask_venv)
    try:
        first = backend_pid(pool, ctx, pg_database.url)
        pg_database.execute("SELECT pg_terminate_backend(%s)", (first,))
        pool.begin()   # the next inspection run: pinged before its first use
        second = backend_pid(pool, ctx, pg_database.url)   # no error: a new session
        assert second != first and pool.started == 2
    finally:
        pool.close()


def test_an_error_in_the_block_ends_the_session(flask_venv: Path,
                                                pg_database: PgDatabase) -> None:
    pool = SessionPool()
    ctx = unit_ctx(flask_venv)
    try:
        with pytest.raises(database.DatabaseProblem):
            with pool.borrow(ctx, pg_database.url, TIMEOUTS) as conn:
                conn.execute(text("SELECT * FROM no_such_table"))
        assert pool.held == {}
        backend_pid(pool, ctx, pg_database.url)
        assert pool.started == 2
    finally:
        pool.close()


def test_another_environment_is_another_session_and_unused_ones_are_swept(
        flask_venv: Path, pg_database: PgDatabase) -> None:
    pool = SessionPool()
    try:
        old = backend_pid(pool, unit_ctx(flask_venv), pg_database.url)
        pool.begin()
        new = backend_pid(pool, unit_ctx(flask_venv, {"TZ": "UTC"}), pg_database.url)
        assert new != old and len(pool.held) == 2
        pool.sweep()
        assert len(pool.held) == 1
        assert pg_database.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s",
                                   (old,))[0][0] == 0
    finally:
        pool.close()


def test_user_session_borrows_while_a_pool_is_current(flask_venv: Path,
                                                      pg_database: PgDatabase) -> None:
    pool = SessionPool()
    ctx = unit_ctx(flask_venv)
    token = CURRENT_POOL.set(pool)
    try:
        pids = set()
        for _ in range(3):
            with user_session(ctx, pg_database.url, TIMEOUTS) as conn:
                pids.add(conn.execute(text("SELECT pg_backend_pid()")).scalar())
        assert len(pids) == 1 and pool.started == 1
    finally:
        CURRENT_POOL.reset(token)
        pool.close()
    with user_session(ctx, pg_database.url, TIMEOUTS) as conn:   # no pool: its own session
        assert conn.execute(text("SELECT pg_backend_pid()")).scalar() not in pids


def test_a_frozen_backend_is_given_up_after_the_connect_timeout(
        flask_venv: Path, pg_database: PgDatabase) -> None:
    """The ping waits connect_s, not a statement's answer_s: a frozen server side costs
    what a new connection's attempt would."""
    pool = SessionPool()
    ctx = unit_ctx(flask_venv)
    first = backend_pid(pool, ctx, pg_database.url)
    waited: list[float] = []
    held = next(iter(pool.held.values()))
    execute = held.conn.execute

    def recorded(clause: object, params: object = None, timeout: float | None = None) -> object:
        waited.append(timeout or 0.0)
        return execute(clause, params, timeout)

    held.conn.execute = recorded
    os.kill(first, signal.SIGSTOP)
    pool.begin()
    try:
        second = backend_pid(pool, ctx, pg_database.url)
        assert second != first and pool.started == 2
        assert waited == [float(TIMEOUTS.connect_s)]
    finally:
        os.kill(first, signal.SIGCONT)
        pool.close()


def test_pinged_once_per_run(flask_venv: Path, pg_database: PgDatabase) -> None:
    pool = SessionPool()
    ctx = unit_ctx(flask_venv)
    try:
        backend_pid(pool, ctx, pg_database.url)
        held = next(iter(pool.held.values()))
        sent: list[str] = []
        execute = held.conn.execute

        def recorded(clause: object, params: object = None,
                     timeout: float | None = None) -> object:
            sent.append(str(getattr(clause, "text", clause)))
            return execute(clause, params, timeout)

        held.conn.execute = recorded
        for _ in range(2):   # two runs, two borrows each
            pool.begin()
            backend_pid(pool, ctx, pg_database.url)
            backend_pid(pool, ctx, pg_database.url)
        assert sent.count("SELECT 1") == 2 and pool.started == 1
    finally:
        pool.close()
