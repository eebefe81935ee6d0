"""Long-lived sessions (agent/privileged/sessionpool.py) with the real session child as the
unit's user against a real PostgreSQL: kept, still read-only, never idle in a transaction,
started again after errors."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from sqlalchemy import text
from agent.dbsql import DBAPIError

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
    what a new connection's attempt would (the ping leads the run's batch)."""
    pool = SessionPool()
    ctx = unit_ctx(flask_venv)
    first = backend_pid(pool, ctx, pg_database.url)
    waited: list[float] = []
    held = next(iter(pool.held.values()))
    read_line = held.conn.read_line

    def recorded(timeout: float) -> object:
        waited.append(timeout)
        return read_line(timeout)

    held.conn.read_line = recorded
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
        pings: list[float | None] = []
        prefetch = held.conn.prefetch

        def recorded(statements: object, ping_timeout: float | None = None) -> None:
            pings.append(ping_timeout)
            prefetch(statements, ping_timeout)

        held.conn.prefetch = recorded
        for _ in range(2):   # two runs, two borrows each
            pool.begin()
            backend_pid(pool, ctx, pg_database.url)
            backend_pid(pool, ctx, pg_database.url)
        assert pings == [float(TIMEOUTS.connect_s)] * 2 and pool.started == 1
    finally:
        pool.close()


STEADY = [("SELECT pg_backend_pid()", {}), ("SHOW transaction_read_only", {}),
          ("SELECT to_regclass(:n)::oid", {"n": "pg_class"}),
          ("SELECT count(*) FROM pg_stat_activity WHERE pid = pg_backend_pid()", {})]


def one_run(pool: SessionPool, ctx: object, url: str,
            statements: list[tuple[str, dict[str, object]]]) -> list[object]:
    """One inspection run: two borrows (as the database check and the preflight)."""
    pool.begin()
    out = []
    for part in (statements[:2], statements[2:]):
        with pool.borrow(ctx, url, TIMEOUTS) as conn:  # type: ignore[arg-type]
            out += [conn.execute(text(sql), params).all() for sql, params in part]
    return out


def test_a_steady_run_is_one_round_trip_with_the_same_answers(
        flask_venv: Path, pg_database: PgDatabase) -> None:
    """The statements of the last run go, with the ping, as one batch in one read-only
    transaction; each answer is what the statement alone answers."""
    pool = SessionPool()
    ctx = unit_ctx(flask_venv)
    try:
        first = one_run(pool, ctx, pg_database.url, STEADY)
        conn = next(iter(pool.held.values())).conn
        trips = conn.round_trips
        assert one_run(pool, ctx, pg_database.url, STEADY) == first
        assert conn.round_trips - trips == 1
        trips = conn.round_trips
        assert one_run(pool, ctx, pg_database.url, STEADY) == first
        assert conn.round_trips - trips == 1 and pool.started == 1
        assert first[1] == ["on"]
        # A statement the last run did not ask goes alone; the next run has it in the batch.
        more = STEADY + [("SELECT 2", {})]
        trips = conn.round_trips
        assert one_run(pool, ctx, pg_database.url, more) == first + [[2]]
        assert conn.round_trips - trips == 2
        trips = conn.round_trips
        assert one_run(pool, ctx, pg_database.url, more) == first + [[2]]
        assert conn.round_trips - trips == 1
        state = pg_database.execute("SELECT state FROM pg_stat_activity WHERE pid = %s",
                                    (first[0][0],))[0][0]
        assert state == "idle"   # the batch's transaction was rolled back
    finally:
        pool.close()


def test_a_failed_statement_ends_the_batch_and_the_rest_runs_alone(
        flask_venv: Path, pg_database: PgDatabase) -> None:
    """An error inside the batch (here a lock timeout on a table a migration holds) is that
    statement's answer; the statements after it run one by one, with their own answers."""
    pool = SessionPool()
    ctx = unit_ctx(flask_venv)
    pg_database.execute("CREATE TABLE held (x int)", as_owner=True)
    statements = [("SELECT 1", {}), ("SELECT count(*) FROM held", {}), ("SELECT 3", {})]
    try:
        assert one_run(pool, ctx, pg_database.url, statements) == [[1], [0], [3]]
        holder = pg_database.cluster.connect(pg_database.name, pg_database.owner,
                                             pg_database.password, autocommit=False)
        try:
            holder.cursor().execute("LOCK TABLE held IN ACCESS EXCLUSIVE MODE")
            pool.begin()
            with pool.borrow(ctx, pg_database.url, TIMEOUTS) as conn:  # type: ignore
                trips = conn.round_trips
                assert conn.execute(text("SELECT 1")).all() == [1]
                with pytest.raises(DBAPIError) as failed:
                    conn.execute(text("SELECT count(*) FROM held"))
                assert database.is_lock_wait(failed.value)
                assert conn.execute(text("SELECT 3")).all() == [3]
                assert conn.round_trips - trips == 1   # SELECT 3 alone: not in the batch
        finally:
            holder.close()
    finally:
        pool.close()


def test_the_server_identity_is_asked_once_per_session(flask_venv: Path,
                                                       pg_database: PgDatabase) -> None:
    """Address, port, database, version, backend and cluster cannot change while one
    session lives: a kept session is asked once; a new session is asked again."""
    pool = SessionPool()
    ctx = unit_ctx(flask_venv)
    try:
        with pool.borrow(ctx, pg_database.url, TIMEOUTS) as conn:
            first = database.query_identity(conn)
        assert first.backend_pid and first.database == pg_database.name
        pool.begin()
        with pool.borrow(ctx, pg_database.url, TIMEOUTS) as conn:
            asked = conn.statements
            assert database.query_identity(conn) == first
            assert conn.statements == asked   # nothing sent
        pool.close()
        with pool.borrow(ctx, pg_database.url, TIMEOUTS) as conn:
            again = database.query_identity(conn)
        assert again.backend_pid != first.backend_pid
        assert again == first.__class__(**{**first.__dict__, "backend_pid": again.backend_pid})
    finally:
        pool.close()
