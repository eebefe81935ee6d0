"""Read-only by construction behind a real PgBouncer in transaction-pooling mode.

The agent's session and the probe set read-only and their timeouts inside every transaction
(SET TRANSACTION READ ONLY + SET LOCAL), verified with SHOW transaction_read_only: a
transaction runs on one server connection even in transaction pooling, and nothing leaks to
the app's own clients that get that server connection next.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg2
import pytest
from sqlalchemy import text
from agent.dbsql import DBAPIError

from agent.privileged.dbclient import user_session
from agent.privileged.probe_runner import ProbeRequest, run_probe
from agent.privileged.sources import database
from tests.conftest import skip_or_fail
from tests.harness.apps import AppDir, AppSpec, db_upgrade, db_write_hook
from tests.harness.pgbouncer import PgBouncer, pgbouncer_unavailable_reason
from tests.harness.postgres import PgDatabase
from tests.integration.test_probe import make_ctx
from tests.integration.test_user_session import unit_ctx

pytestmark = pytest.mark.postgres

TIMEOUTS = database.Timeouts(connect_s=3)


@pytest.fixture
def bouncer(pg_database: PgDatabase) -> Iterator[PgBouncer]:
    """A transaction-pooling PgBouncer in front of the test cluster, knowing the owner."""
    reason = pgbouncer_unavailable_reason()
    if reason:
        skip_or_fail(reason)
    with PgBouncer(pg_database.cluster, users={pg_database.owner: pg_database.password}) as b:
        yield b


def owner_url(bouncer: PgBouncer, db: PgDatabase, driver: str = "postgresql+psycopg2") -> str:
    return bouncer.url(db.owner, db.password, db.name, driver)


def libpq(bouncer: PgBouncer, db: PgDatabase) -> psycopg2.extensions.connection:
    """A plain client of the bouncer, like one of the app's workers."""
    conn = psycopg2.connect(host=bouncer.host, port=bouncer.port, dbname=db.name,
                            user=db.owner, password=db.password)
    conn.autocommit = True
    return conn


def test_session_level_set_would_leak_to_the_apps_clients(bouncer: PgBouncer,
                                                          pg_database: PgDatabase) -> None:
    """Why the guard never uses session-level SET: in transaction pooling it outlives us."""
    ours = libpq(bouncer, pg_database)
    ours.cursor().execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
    ours.close()
    app = libpq(bouncer, pg_database)  # gets the same (only) server connection
    with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
        app.cursor().execute("CREATE TABLE app_table (id int)")
    app.cursor().execute("RESET ALL")
    app.close()


def test_agent_session_behind_pgbouncer_is_read_only_and_leaves_nothing(
        flask_venv: Path, bouncer: PgBouncer, pg_database: PgDatabase) -> None:
    pg_database.execute("CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY)",
                        as_owner=True)
    pg_database.execute("INSERT INTO alembic_version VALUES ('r1')", as_owner=True)
    url = owner_url(bouncer, pg_database)
    opener = functools.partial(user_session, unit_ctx(flask_venv))
    found = database.inspect(url, timeouts=TIMEOUTS, opener=opener)
    assert found.reachable, found.error
    assert found.version.revisions == ("r1",)
    with user_session(unit_ctx(flask_venv), url, TIMEOUTS) as conn:
        assert conn.execute(text("SHOW transaction_read_only")).scalar() == "on"
        with pytest.raises(DBAPIError, match="read-only transaction"):
            conn.execute(text("INSERT INTO alembic_version VALUES ('evil')"))
    # The app's next client on the same server connection can still write: nothing leaked.
    app = libpq(bouncer, pg_database)
    cur = app.cursor()
    cur.execute("SHOW transaction_read_only")
    assert cur.fetchone() == ("off",)
    cur.execute("CREATE TABLE written_by_app (id int)")
    app.close()
    assert pg_database.alembic_versions() == ["r1"]


def test_options_in_the_url_are_refused_by_pgbouncer(flask_venv: Path, bouncer: PgBouncer,
                                                     pg_database: PgDatabase) -> None:
    url = owner_url(bouncer, pg_database) + "?options=-c%20default_transaction_read_only%3Doff"
    opener = functools.partial(user_session, unit_ctx(flask_venv))
    found = database.inspect(url, timeouts=TIMEOUTS, opener=opener)
    assert not found.reachable and "options" in found.error


def test_probe_behind_pgbouncer_reads_and_never_writes(
        make_app: Callable[..., AppDir], flask_venv: Path, bouncer: PgBouncer,
        pg_database: PgDatabase) -> None:
    """The app writes at import through the bouncer: refused; the probe still compares."""
    app = make_app(AppSpec(on_create=db_write_hook("import_side_effect")))
    db_upgrade(app, flask_venv, pg_database.url)
    url = owner_url(bouncer, pg_database)
    before = pg_database.execute("SELECT count(*) FROM import_side_effect")  # flask db upgrade
    result = run_probe(make_ctx(app, flask_venv, {"DATABASE_URL": url}), ProbeRequest(), 60)
    assert not result.ok and "read-only transaction" in result.error
    assert pg_database.execute("SELECT count(*) FROM import_side_effect") == before
    # The same app without the write: loads, compares the schema through the bouncer.
    pg_database.execute("DROP TABLE import_side_effect")  # left by flask db upgrade above
    clean = make_app(name="clean")
    db_upgrade(clean, flask_venv, pg_database.url)
    result = run_probe(make_ctx(clean, flask_venv, {"DATABASE_URL": url}), ProbeRequest(), 60)
    assert result.ok, result.error
    assert result.schema_diff == ()
    # And the app's own clients of that server connection were left read-write.
    app_conn = libpq(bouncer, pg_database)
    cur = app_conn.cursor()
    cur.execute("SHOW transaction_read_only")
    assert cur.fetchone() == ("off",)
    app_conn.close()
