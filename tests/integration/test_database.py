"""The agent's read-only database view and the connection matcher against a real PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import text

from agent.checks.migrations import privilege_findings
from agent.privileged.sources import connections, database
from tests.harness.postgres import PgDatabase, PostgresCluster, free_port

pytestmark = pytest.mark.postgres

VERSION_DDL = "CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY)"


def test_url_conversion_and_label() -> None:
    url = database.agent_url("postgresql://app:s3cret@db.example:6543/shop?sslmode=require")
    assert url.drivername == "postgresql+psycopg2"
    assert url.query["sslmode"] == "require"
    assert database.agent_url("postgresql+psycopg://a@h/d").drivername == "postgresql+psycopg2"
    assert database.db_label("postgresql+asyncpg://app:s3cret@db/shop") == "db:5432/shop"
    assert database.db_label("postgresql://app@/shop?host=/run/postgresql") \
        == "/run/postgresql:5432/shop"
    with pytest.raises(ValueError):
        database.agent_url("mysql://a:b@h/d")


def test_version_table_missing(pg_database: PgDatabase) -> None:
    result = database.read_version_table(pg_database.url)
    assert result.error == "" and result.exists is False and result.revisions == ()


def test_version_table_empty_then_present(pg_database: PgDatabase) -> None:
    pg_database.execute(VERSION_DDL, as_owner=True)
    assert database.read_version_table(pg_database.url).revisions == ()
    assert database.read_version_table(pg_database.url).exists is True
    pg_database.execute("INSERT INTO alembic_version VALUES ('b2'), ('a1')", as_owner=True)
    result = database.read_version_table(pg_database.dsn("postgresql"))  # any driver given
    assert result.exists and result.revisions == ("a1", "b2")


def test_custom_version_table_and_schema(pg_database: PgDatabase) -> None:
    pg_database.execute("CREATE SCHEMA meta", as_owner=True)
    pg_database.execute("CREATE TABLE meta.\"Versions\" (version_num varchar(32))",
                        as_owner=True)
    pg_database.execute("INSERT INTO meta.\"Versions\" VALUES ('x1')", as_owner=True)
    assert database.read_version_table(pg_database.url).exists is False
    result = database.read_version_table(pg_database.url, "Versions", "meta")
    assert result.revisions == ("x1",)


def test_session_is_read_only(pg_database: PgDatabase) -> None:
    pg_database.execute(VERSION_DDL, as_owner=True)
    with pytest.raises(database.DatabaseProblem, match="read-only"):
        with database.session(pg_database.url) as conn:
            conn.execute(text("INSERT INTO alembic_version VALUES ('evil')"))
    assert pg_database.alembic_versions() == []
    with database.session(pg_database.url) as conn:
        settings = conn.execute(text(
            "SELECT current_setting('default_transaction_read_only'), "
            "current_setting('application_name'), current_setting('lock_timeout')")).one()
        assert tuple(settings) == ("on", "driftwatch", "500ms")
    # NullPool: nothing of ours lingers once the session is closed.
    left = pg_database.execute("SELECT count(*) FROM pg_stat_activity "
                               "WHERE application_name = 'driftwatch'")
    assert left[0][0] == 0


def test_app_options_are_kept(pg_database: PgDatabase) -> None:
    pg_database.execute("CREATE SCHEMA app", as_owner=True)
    pg_database.execute("CREATE TABLE app.alembic_version (version_num varchar(32))",
                        as_owner=True)
    url = pg_database.url + "?options=-csearch_path%3Dapp"
    assert database.read_version_table(url).exists is True


@pytest.fixture
def migration_running(pg: PostgresCluster, pg_database: PgDatabase) -> Iterator[int]:
    """A 'migration' holding LOCK TABLE alembic_version and stuck in an ALTER; yields its pid."""
    pg_database.execute(VERSION_DDL, as_owner=True)
    pg_database.execute("INSERT INTO alembic_version VALUES ('a1')", as_owner=True)
    pg_database.execute("CREATE TABLE users (id int)", as_owner=True)
    reader = pg.connect(pg_database.name, pg_database.owner, pg_database.password,
                        autocommit=False)
    migrator = pg.connect(pg_database.name, pg_database.owner, pg_database.password,
                          autocommit=False)
    reader.cursor().execute("SELECT * FROM users")  # holds AccessShareLock: ALTER must wait
    cur = migrator.cursor()
    cur.execute("LOCK TABLE alembic_version")
    cur.execute("SELECT pg_backend_pid()")
    pid = cur.fetchone()[0]
    alter = threading.Thread(target=cur.execute,
                             args=("ALTER TABLE users ADD COLUMN email text",), daemon=True)
    alter.start()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not pg_database.execute(
            "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND wait_event_type = 'Lock'",
            (pid,)):
        time.sleep(0.02)
    try:
        yield pid
    finally:
        reader.rollback()
        alter.join(10)
        migrator.rollback()
        reader.close()
        migrator.close()


# The read gives up on a lock after lock_timeout (500 ms); a statement timeout also counts as
# "locked", so it is set far away: a read that waited for it instead would take 60 s. The
# bound below (60x the lock timeout, half the statement timeout) separates the two on a loaded
# 2-core machine; the time is the one inspect() itself reports.
LOCK_ONLY = database.Timeouts(lock_ms=500, statement_ms=60_000)
LOCK_BOUND_MS = 30_000


def _still_migrating(pg_database: PgDatabase, pid: int) -> bool:
    """From a third session: PID holds ACCESS EXCLUSIVE on alembic_version, and no session of
    the agent is left in the database."""
    held = pg_database.execute(
        "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation WHERE "
        "l.pid = %s AND l.granted AND l.mode = 'AccessExclusiveLock' AND "
        "c.relname = 'alembic_version'", (pid,))[0][0]
    ours = pg_database.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                               "%s", (database.APPLICATION_NAME,))[0][0]
    return held == 1 and ours == 0


def test_migration_in_progress_never_blocks(pg_database: PgDatabase,
                                            migration_running: int) -> None:
    result = database.inspect(pg_database.url, timeouts=LOCK_ONLY)
    # It returned while the migration still holds the version table and its ALTER still waits.
    assert _still_migrating(pg_database, migration_running)
    assert pg_database.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s",
                               (migration_running,)) == [("Lock",)]
    assert result.elapsed_ms < LOCK_BOUND_MS, result.elapsed_ms
    assert result.error == ""
    assert result.version.exists and result.version.locked
    assert result.activity.in_progress
    by_pid = {s.pid: s for s in result.activity.sessions}
    assert migration_running in by_pid
    assert "AccessExclusiveLock on alembic_version" in by_pid[migration_running].reason
    assert by_pid[migration_running].query.startswith("ALTER TABLE users ADD COLUMN email")
    activity = database.migration_activity(pg_database.url)
    assert migration_running in {s.pid for s in activity.sessions}


def test_ddl_without_version_lock_is_seen(pg: PostgresCluster,
                                          pg_database: PgDatabase) -> None:
    pg_database.execute("CREATE TABLE users (id int)", as_owner=True)
    reader = pg.connect(pg_database.name, pg_database.owner, pg_database.password,
                        autocommit=False)
    ddl = pg.connect(pg_database.name, pg_database.owner, pg_database.password)
    reader.cursor().execute("SELECT * FROM users")
    cur = ddl.cursor()
    thread = threading.Thread(target=cur.execute,
                              args=("/* migrate */ ALTER TABLE users ADD c int",), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 5
        sessions: tuple[Any, ...] = ()
        while time.monotonic() < deadline and not sessions:
            sessions = database.migration_activity(pg_database.url).sessions
        assert [s.reason for s in sessions] == ["running DDL"]
    finally:
        reader.rollback()
        thread.join(10)
        reader.close()
        ddl.close()


def test_privileges_of_a_role_without_create_and_not_owner(pg: PostgresCluster,
                                                           pg_database: PgDatabase) -> None:
    pg_database.execute("CREATE TABLE users (id int)", as_owner=True)
    pg_database.execute("CREATE TABLE orders (id int)", as_owner=True)
    role = pg_database.name + "_web"
    pg.create_role(role, "web-pass")
    try:
        pg_database.execute(f'GRANT SELECT ON users, orders TO "{role}"')
        url = pg.dsn(role, "web-pass", pg_database.name)
        priv = database.read_privileges(url)
        assert priv.error == "" and priv.user == role and priv.schema == "public"
        assert not priv.can_create and not priv.superuser and not priv.sufficient
        assert dict(priv.not_owned) == {"users": pg_database.owner,
                                        "orders": pg_database.owner}
        findings = privilege_findings("app.service", priv.user, priv.schema, priv.superuser,
                                      priv.can_create, priv.not_owned)
        assert "users" in findings[0].message and "orders" in findings[0].message
        owner = database.read_privileges(pg_database.url)
        assert owner.sufficient and owner.tables == 2
    finally:
        pg_database.execute(f'DROP OWNED BY "{role}"')
        pg.drop_role(role)


def test_unreachable_database_is_an_error_text(pg_database: PgDatabase) -> None:
    port = free_port()
    url = f"postgresql://app:hunter2secret@127.0.0.1:{port}/app"
    result = database.inspect(url)
    # No time bound: "connection refused" is what an immediate refusal says; a connect that
    # waited would end at connect_timeout and say "connection timed out".
    assert result.error == f"database 127.0.0.1:{port}/app unreachable: connection refused"
    assert result.version.error == result.error
    assert "hunter2" not in repr(result)
    bad_password = pg_database.url.replace(pg_database.password, "hunter2secret")
    assert "authentication failed" in database.read_version_table(bad_password).error


def test_server_identity(pg: PostgresCluster, pg_database: PgDatabase) -> None:
    ident = database.server_identity(pg_database.url)
    assert ident.error == ""
    assert (ident.server_addr, ident.server_port) == ("127.0.0.1", pg.port)
    assert ident.database == pg_database.name
    other = database.server_identity(pg.superuser_dsn())
    assert database.same_server(ident, other) is True
    assert database.same_database(ident, other) is False


def test_full_inspection_round_trip_is_fast(pg_database: PgDatabase) -> None:
    pg_database.execute(VERSION_DDL, as_owner=True)
    database.inspect(pg_database.url)  # warm imports
    times = []
    for _ in range(5):
        result = database.inspect(pg_database.url)
        assert result.error == ""
        times.append(result.elapsed_ms)
    print(f"inspect() round trips (ms): {times}")
    assert min(times) < 500


@pytest.fixture
def client_process(pg: PostgresCluster, pg_database: PgDatabase) -> Iterator[int]:
    """A python child holding a TCP and a unix-socket psycopg2 connection; yields its pid."""
    code = ("import psycopg2, sys, time\n"
            "a = psycopg2.connect(sys.argv[1])\n"
            "b = psycopg2.connect(host=sys.argv[2], port=sys.argv[3], dbname=sys.argv[4],"
            " user='postgres')\n"
            "print('ready', flush=True)\n"
            "sys.stdin.read()\n")
    child = subprocess.Popen(
        [sys.executable, "-c", code,
         pg.libpq_dsn(pg_database.owner, pg_database.password, pg_database.name),
         str(pg.socket_dir), str(pg.port), pg_database.name],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        yield child.pid
    finally:
        child.kill()  # by its own Popen handle: only the process we started
        child.wait(10)


def test_connections_to_the_url_server(pg: PostgresCluster, pg_database: PgDatabase,
                                       client_process: int) -> None:
    verdict, errors = connections.connection_verdict("127.0.0.1", pg.port, [client_process])
    assert errors == []
    assert verdict.status == "connected"
    assert {c.kind for c in verdict.matching} == {"tcp"}
    # The unix-socket connection was identified through its peer (sock_diag).
    assert f"{pg.socket_dir}/.s.PGSQL.{pg.port}" in {c.socket_path for c in verdict.other}

    verdict, _ = connections.connection_verdict(str(pg.socket_dir), pg.port, [client_process])
    assert verdict.status == "connected"
    assert {c.kind for c in verdict.matching} == {"unix"}


def test_connections_elsewhere(pg: PostgresCluster, client_process: int) -> None:
    other_port = free_port()
    verdict, _ = connections.connection_verdict("localhost", other_port, [client_process])
    assert verdict.status == "elsewhere"
    assert f"127.0.0.1:{pg.port}" in verdict.message
    observed, _ = connections.observe([client_process])
    pure = connections.match_connections("10.9.9.9", pg.port, None, observed)
    assert pure.status == "elsewhere"


def test_connections_matched_to_sessions(pg_database: PgDatabase,
                                         client_process: int) -> None:
    observed, _ = connections.observe([client_process])
    inspection = database.inspect(pg_database.url)
    found = connections.sessions_by_connection(observed, inspection.sessions)
    assert list(found.values()) == [pg_database.name]


def test_no_connections_is_none() -> None:
    verdict, errors = connections.connection_verdict("127.0.0.1", 5432, [])
    assert verdict.status == "none" and errors == []


def test_lock_on_a_custom_version_table_is_locked_never_empty(pg: PostgresCluster,
                                                              pg_database: PgDatabase) -> None:
    """A lock held on the version table env.py names: not readable now, not empty."""
    pg_database.execute("CREATE SCHEMA meta", as_owner=True)
    pg_database.execute("CREATE TABLE meta.versions (version_num varchar(32))", as_owner=True)
    pg_database.execute("INSERT INTO meta.versions VALUES ('r2')", as_owner=True)
    holder = pg.connect(pg_database.name, pg_database.owner, pg_database.password,
                        autocommit=False)
    try:
        holder.cursor().execute("LOCK TABLE meta.versions IN ACCESS EXCLUSIVE MODE")
        result = database.inspect(pg_database.url, "versions", "meta", timeouts=LOCK_ONLY)
        assert result.elapsed_ms < LOCK_BOUND_MS, result.elapsed_ms   # see LOCK_ONLY
        assert result.error == ""
        assert result.version.exists is True and result.version.locked
        assert result.version.revisions == ()
        assert result.activity.in_progress
        assert any("AccessExclusiveLock on versions" in s.reason
                   for s in result.activity.sessions)
    finally:
        holder.rollback()
        holder.close()
    after = database.inspect(pg_database.url, "versions", "meta")
    assert after.version.revisions == ("r2",) and not after.version.locked
    assert not after.activity.in_progress


def test_migration_between_statements_is_seen_by_its_ddl_locks(pg: PostgresCluster,
                                                               pg_database: PgDatabase) -> None:
    """A real upgrade step: DDL done, now sleeping in a data step: no DDL query is active
    and the version table is not locked, but the ACCESS EXCLUSIVE lock is held."""
    pg_database.execute(VERSION_DDL, as_owner=True)
    pg_database.execute("INSERT INTO alembic_version VALUES ('r2')", as_owner=True)
    pg_database.execute("CREATE TABLE users (id int)", as_owner=True)
    migrator = pg.connect(pg_database.name, pg_database.owner, pg_database.password,
                          autocommit=False)
    try:
        cur = migrator.cursor()
        cur.execute("ALTER TABLE users ADD COLUMN name text")
        cur.execute("SELECT 1")  # idle in transaction from here on
        result = database.inspect(pg_database.url)
        assert result.version.revisions == ("r2",) and not result.version.locked
        assert result.activity.in_progress
        reasons = [s.reason for s in result.activity.sessions]
        assert reasons == ["holds AccessExclusiveLock on users (DDL in an open transaction)"]
    finally:
        migrator.rollback()
        migrator.close()


def test_temporary_tables_are_not_a_migration(pg: PostgresCluster,
                                              pg_database: PgDatabase) -> None:
    app = pg.connect(pg_database.name, pg_database.owner, pg_database.password,
                     autocommit=False)
    try:
        app.cursor().execute("CREATE TEMP TABLE scratch (id int)")
        assert not database.inspect(pg_database.url).activity.in_progress
    finally:
        app.rollback()
        app.close()


def test_malformed_port_is_a_clear_error_not_an_exception() -> None:
    url = "postgresql://app:s3cret@db.example:5432x/app"
    assert database.db_label(url) == "invalid-url"
    result = database.inspect(url)
    assert result.error == ("database invalid-url: not a valid database URL (the port is "
                            "not a number)")


def test_worker_connections_are_named_by_the_server(pg: PostgresCluster,
                                                    pg_database: PgDatabase,
                                                    client_process: int) -> None:
    """TCP by the client address/port pg_stat_activity shows; a unix socket (no address)
    by the backend holding the other end; another role's sessions by backend pid."""
    observed, _ = connections.observe([client_process])
    pg_conns = [c for c in observed if c.looks_like_postgres({pg.port})]
    backends = connections.backend_pids(pg_conns)
    assert {c.kind for c in backends} == {"tcp", "unix"}
    inspection = database.inspect(pg_database.url)
    named = connections.name_connections(pg_conns, inspection.sessions, backends)
    assert sorted((n.connection.kind, n.database, n.user, n.how) for n in named) == [
        ("tcp", pg_database.name, pg_database.owner, "client address"),
        ("unix", pg_database.name, "postgres", "backend pid")]
    stranger = pg.new_database()
    try:
        seen_by_other_role = database.inspect(stranger.url).sessions
        named = connections.name_connections(pg_conns, seen_by_other_role, backends)
        assert sorted((n.connection.kind, n.database, n.how) for n in named) == [
            ("tcp", pg_database.name, "backend pid"), ("unix", pg_database.name, "backend pid")]
    finally:
        pg.drop(stranger)


def _reading_session(pg: PostgresCluster, db: PgDatabase, application_name: str) -> Any:
    """A session in a read-only transaction that has read the version table and is still
    open: what an agent session holds in the middle of its batch (idle in transaction,
    ACCESS SHARE on alembic_version until the batch's rollback)."""
    conn = pg.connect(db.name, db.owner, db.password, autocommit=False)
    cur = conn.cursor()
    cur.execute("SELECT set_config('application_name', %s, false)", (application_name,))
    cur.execute("SET TRANSACTION READ ONLY")
    cur.execute("SELECT version_num FROM alembic_version")
    return conn


def test_another_agent_session_reading_the_version_table_is_not_a_migration(
        pg: PostgresCluster, pg_database: PgDatabase) -> None:
    """The agent's own sessions (the previous agent's session child finishing its batch, its
    probe) hold ACCESS SHARE on the version table while they read it: not a migration."""
    pg_database.execute(VERSION_DDL, as_owner=True)
    pg_database.execute("INSERT INTO alembic_version VALUES ('r2')", as_owner=True)
    for name in ("driftwatch", "driftwatch-probe"):
        other = _reading_session(pg, pg_database, name)
        try:
            held = pg_database.execute(
                "SELECT l.mode FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                "WHERE a.application_name = %s AND l.relation = 'alembic_version'::regclass",
                (name,))
            assert held == [("AccessShareLock",)]  # the lock really is there
            result = database.inspect(pg_database.url)
            assert result.version.revisions == ("r2",)
            assert not result.activity.in_progress, result.activity.sessions
            assert not database.migration_activity(pg_database.url).in_progress
        finally:
            other.rollback()
            other.close()


def test_a_migration_named_like_the_agent_is_still_seen(pg: PostgresCluster,
                                                        pg_database: PgDatabase) -> None:
    """Only the agent's read lock is left out: DDL locks of a session calling itself
    driftwatch still say a migration is running."""
    pg_database.execute(VERSION_DDL, as_owner=True)
    pg_database.execute("INSERT INTO alembic_version VALUES ('r2')", as_owner=True)
    pg_database.execute("CREATE TABLE users (id int)", as_owner=True)
    migrator = pg.connect(pg_database.name, pg_database.owner, pg_database.password,
                          autocommit=False)
    try:
        cur = migrator.cursor()
        cur.execute("SELECT set_config('application_name', 'driftwatch', false)")
        cur.execute("SELECT version_num FROM alembic_version")
        cur.execute("ALTER TABLE users ADD COLUMN name text")
        cur.execute("UPDATE alembic_version SET version_num = 'r3'")
        result = database.inspect(pg_database.url)
        assert result.activity.in_progress
        reasons = {s.reason for s in result.activity.sessions}
        assert reasons == {"holds RowExclusiveLock on alembic_version"}, reasons
    finally:
        migrator.rollback()
        migrator.close()
