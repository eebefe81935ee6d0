"""MySQL/MariaDB apps: the probe and the agent's own session on a real MariaDB, as the
unit's user, through the app's own driver (PyMySQL).

Real Flask-Migrate apps (tests/harness/apps.py) in a venv with PyMySQL, migrated by
`flask db upgrade` as www-data; a throwaway Debian mariadb-server (tests/harness/mariadb.py).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from agent.checks.half_applied import half_applied
from agent.privileged.dbclient import user_session
from agent.privileged.probe_runner import ProbeRequest, ProbeResult, run_probe
from agent.privileged.sources import mysql
from agent.privileged.sources.database import DatabaseProblem, Timeouts, backend_of, db_label
from tests.harness.apps import (
    APP_USER,
    AppDir,
    AppSpec,
    check_ops,
    db_upgrade,
    flask_db_check,
    standard_revisions,
)
from tests.harness.mariadb import MariaDatabase, MariaDBServer
from tests.integration.test_probe import make_ctx

TIMEOUT = 60.0


def look(app: AppDir, venv: Path, url: str) -> tuple[ProbeResult, mysql.MysqlInspection]:
    """What the agent does: the probe, then the session on the URL the probe reported."""
    ctx = make_ctx(app, venv, {"DATABASE_URL": url})
    result = run_probe(ctx, ProbeRequest(), TIMEOUT)
    seen = result.urls.get("default", "")
    return result, mysql.inspect_mysql(seen, opener=functools.partial(user_session, ctx))


def test_pending_revision_and_drift_through_the_apps_driver(
        make_app: Callable[..., AppDir], pymysql_venv: Path,
        maria_database: MariaDatabase) -> None:
    app = make_app()
    url = maria_database.url
    db_upgrade(app, pymysql_venv, url, "r2", user=APP_USER)
    result, found = look(app, pymysql_venv, url)
    seen = found.inspection
    assert result.ok, result.error
    assert backend_of(url) == "mysql"
    assert seen.reachable, seen.error
    assert seen.label == f"127.0.0.1:{maria_database.server.port}/{maria_database.name}" \
        == db_label(url)
    assert seen.version.exists and seen.version.revisions == ("r2",)
    assert not seen.version.locked and not seen.activity.in_progress
    assert sorted(r["revision"] for r in result.revisions) == ["r1", "r2", "r3"]
    # The models are at r3: the drift is the table r3 adds, as `flask db check` says.
    check = flask_db_check(app, pymysql_venv, url)
    assert check.not_up_to_date, check.output
    assert check_ops(result.schema_diff or ()) == (("add_table", "posts"),)
    assert seen.identity.database == maria_database.name
    assert "MariaDB" in seen.identity.version
    assert seen.schema_fingerprint
    assert found.privileges.user.startswith(maria_database.user + "@")
    assert found.privileges.missing == ()
    assert maria_database.password not in repr(found) + repr(result.as_dict())
    # Nothing was written: the version table still says r2.
    assert maria_database.alembic_versions() == ["r2"]


def test_flask_db_check_and_the_probe_agree_at_head(make_app: Callable[..., AppDir],
                                                    pymysql_venv: Path,
                                                    maria_database: MariaDatabase) -> None:
    app = make_app(AppSpec(models_at=3, revisions=standard_revisions(2)))
    url = maria_database.url
    db_upgrade(app, pymysql_venv, url, "head", user=APP_USER)
    result, found = look(app, pymysql_venv, url)
    check = flask_db_check(app, pymysql_venv, url)
    assert not check.not_up_to_date and not check.clean, check.output
    assert check_ops(result.schema_diff or ()) == check.ops == (("add_table", "posts"),)
    assert found.inspection.version.revisions == ("r2",)


def test_schema_fingerprint_follows_a_manual_change(make_app: Callable[..., AppDir],
                                                    pymysql_venv: Path,
                                                    maria_database: MariaDatabase) -> None:
    app = make_app()
    url = maria_database.url
    db_upgrade(app, pymysql_venv, url, "r2", user=APP_USER)
    ctx = make_ctx(app, pymysql_venv, {"DATABASE_URL": url})
    opener = functools.partial(user_session, ctx)
    before = mysql.inspect_mysql(url, opener=opener).inspection.schema_fingerprint
    again = mysql.inspect_mysql(url, opener=opener).inspection.schema_fingerprint
    maria_database.execute("ALTER TABLE users ADD COLUMN nickname VARCHAR(20)")
    after = mysql.inspect_mysql(url, opener=opener).inspection.schema_fingerprint
    assert before == again != after


def test_the_session_is_read_only_as_the_units_user(make_app: Callable[..., AppDir],
                                                    pymysql_venv: Path,
                                                    maria_database: MariaDatabase) -> None:
    """The user may write (ALL PRIVILEGES), the agent's session may not: not DML, not DDL,
    not after trying to lift it, not two statements in one."""
    app = make_app()
    url = maria_database.url
    db_upgrade(app, pymysql_venv, url, "r1", user=APP_USER)
    ctx = make_ctx(app, pymysql_venv, {"DATABASE_URL": url})
    refused = []
    with user_session(ctx, url, Timeouts()) as conn:
        assert conn.execute("SELECT CURRENT_USER()").scalar().startswith(maria_database.user)
        for sql in ("INSERT INTO alembic_version VALUES ('x')",
                    "CREATE TABLE intruder (id INT)",
                    "SELECT 1; DELETE FROM alembic_version",
                    "SET SESSION TRANSACTION READ WRITE",
                    "DELETE FROM alembic_version"):
            try:
                conn.execute(sql)
            except Exception as exc:
                refused.append((sql, str(getattr(exc, "orig", exc))))
    reasons = dict(refused)
    assert "READ ONLY" in reasons["INSERT INTO alembic_version VALUES ('x')"]
    assert "READ ONLY" in reasons["CREATE TABLE intruder (id INT)"]
    assert "one statement" in reasons["SELECT 1; DELETE FROM alembic_version"]
    # Lifting it is a statement the server accepts; the guard refuses everything after it.
    assert "SET SESSION TRANSACTION READ WRITE" not in reasons
    assert "read-only guard" in reasons["DELETE FROM alembic_version"]
    assert maria_database.alembic_versions() == ["r1"]
    assert maria_database.tables() == ["alembic_version", "users"]


def test_the_probe_cannot_write_through_the_apps_engine(make_app: Callable[..., AppDir],
                                                       pymysql_venv: Path,
                                                       maria_database: MariaDatabase) -> None:
    """App code that writes at import, through its own engine, is refused (ERROR 1792)."""
    hook = ("db.session.execute(sa.text('CREATE TABLE IF NOT EXISTS import_side_effect "
            "(id INT)'))\ndb.session.commit()\n")
    app = make_app(AppSpec(on_create=hook))
    url = maria_database.url
    result = run_probe(make_ctx(app, pymysql_venv, {"DATABASE_URL": url}), ProbeRequest(),
                       TIMEOUT)
    assert not result.ok and "READ ONLY" in result.error, result.error
    assert "import_side_effect" not in maria_database.tables()


def test_privileges_from_show_grants(make_app: Callable[..., AppDir], pymysql_venv: Path,
                                     mariadb: MariaDBServer) -> None:
    """A user with only SELECT/INSERT/UPDATE/DELETE on its database cannot migrate."""
    limited = mariadb.new_database("lim", grants="SELECT, INSERT, UPDATE, DELETE")
    try:
        app = make_app()
        ctx = make_ctx(app, pymysql_venv, {"DATABASE_URL": limited.url})
        found = mysql.inspect_mysql(limited.url, opener=functools.partial(user_session, ctx))
        assert found.inspection.reachable, found.inspection.error
        assert found.privileges.missing == ("CREATE", "DROP", "ALTER", "INDEX", "REFERENCES")
        assert found.privileges.database == limited.name
        assert not found.inspection.version.exists
    finally:
        mariadb.drop(limited)


def test_ddl_running_is_a_migration_in_progress(make_app: Callable[..., AppDir],
                                                pymysql_venv: Path,
                                                maria_database: MariaDatabase) -> None:
    """Another session of the app's user running DDL (a long CREATE ... SELECT SLEEP)."""
    app = make_app()
    url = maria_database.url
    db_upgrade(app, pymysql_venv, url, "r2", user=APP_USER)
    ctx = make_ctx(app, pymysql_venv, {"DATABASE_URL": url})
    ddl = threading.Thread(target=maria_database.execute, daemon=True,
                           args=("CREATE TABLE slow_copy AS SELECT SLEEP(4) AS x",),
                           kwargs={"as_user": True})
    ddl.start()
    try:
        for _ in range(50):
            found = mysql.inspect_mysql(url, opener=functools.partial(user_session, ctx))
            if found.inspection.activity.in_progress:
                break
        activity = found.inspection.activity
        assert activity.in_progress, found.processes
        assert any("running DDL" in s.reason and "slow_copy" in s.query
                   for s in activity.sessions), activity.sessions
        assert found.inspection.version.revisions == ("r2",)
    finally:
        ddl.join(timeout=30)


def test_unreachable_server_is_a_clear_error(make_app: Callable[..., AppDir],
                                             pymysql_venv: Path,
                                             maria_database: MariaDatabase) -> None:
    app = make_app()
    url = maria_database.url.replace(str(maria_database.server.port), "1")
    ctx = make_ctx(app, pymysql_venv, {"DATABASE_URL": url})
    found = mysql.inspect_mysql(url, opener=functools.partial(user_session, ctx))
    assert not found.inspection.reachable
    assert "127.0.0.1:1/" in found.inspection.error
    assert maria_database.password not in found.inspection.error
    with pytest.raises(DatabaseProblem):
        with user_session(ctx, url, Timeouts()):
            pass


# r3 creates posts, then fails (a statement MariaDB rejects), before adding users.bio and an
# index: DDL is not transactional there, so posts stays while alembic_version stays at r2.
HALF_R3 = """\
op.create_table('posts',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('title', sa.String(length=200), nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], ),
    sa.PrimaryKeyConstraint('id')
)
op.execute("SELECT no_such_function()")
op.add_column('users', sa.Column('bio', sa.String(length=200), nullable=True))
op.create_index('ix_posts_title', 'posts', ['title'])"""


def half_applied_spec() -> AppSpec:
    """The standard app whose r3 fails halfway (see HALF_R3)."""
    r1, r2, r3 = standard_revisions(3)
    return AppSpec(models_at=3, revisions=(r1, r2, replace(r3, upgrade=HALF_R3)))


def test_a_revision_that_failed_halfway_is_seen_with_its_objects(
        make_app: Callable[..., AppDir], pymysql_venv: Path,
        maria_database: MariaDatabase) -> None:
    app = make_app(half_applied_spec())
    url = maria_database.url
    failed = db_upgrade(app, pymysql_venv, url, "head", user=APP_USER, check=False)
    assert failed.returncode != 0 and "no_such_function" in failed.stdout + failed.stderr
    assert maria_database.alembic_versions() == ["r2"] and "posts" in maria_database.tables()
    # Every retry fails on the table r3 already made: the outage the finding explains.
    retry = db_upgrade(app, pymysql_venv, url, "head", user=APP_USER, check=False)
    assert "already exists" in retry.stdout + retry.stderr
    ctx = make_ctx(app, pymysql_venv, {"DATABASE_URL": url})
    result = run_probe(ctx, ProbeRequest(), TIMEOUT)
    ops = {r["revision"]: r.get("ops") for r in result.revisions}
    assert ops["r3"] == [["create_table", "posts", ""], ["other", "", "ExecuteSQLOp"],
                         ["add_column", "users", "bio"],
                         ["create_index", "posts", "ix_posts_title"]], ops
    found = mysql.inspect_mysql(url, opener=functools.partial(user_session, ctx),
                                revisions=result.revisions)
    assert found.live is not None and "posts" in found.live.tables
    (h,) = half_applied(["r2"], result.revisions, found.live)
    assert h.revision == "r3" and [op.describe() for op in h.done] == ["table posts"]
    assert [op.describe() for op in h.left] == ["column users.bio",
                                                "index ix_posts_title on posts"]


def test_version_row_held_by_an_open_upgrade_is_in_progress_without_waiting(
        make_app: Callable[..., AppDir], pymysql_venv: Path,
        maria_database: MariaDatabase) -> None:
    """An upgrade that updated alembic_version and has not committed: said at once (NOWAIT),
    the agent never queues behind it, and the upgrade's transaction is unharmed."""
    app = make_app()
    url = maria_database.url
    db_upgrade(app, pymysql_venv, url, "r2", user=APP_USER)
    holder = maria_database.server.connect(maria_database.name, maria_database.user,
                                           maria_database.password, autocommit=False)
    try:
        with holder.cursor() as cur:
            cur.execute("UPDATE alembic_version SET version_num = 'r3'")
        ctx = make_ctx(app, pymysql_venv, {"DATABASE_URL": url})
        found = mysql.inspect_mysql(url, opener=functools.partial(user_session, ctx))
        activity = found.inspection.activity
        assert activity.in_progress, found
        assert any("holds the row of alembic_version" in s.reason for s in activity.sessions)
        # The consistent read still sees the committed revision.
        assert found.inspection.version.revisions == ("r2",)
        holder.commit()
    finally:
        holder.close()
    assert maria_database.alembic_versions() == ["r3"]


def test_an_option_file_named_by_the_url_is_read_as_the_units_user(
        make_app: Callable[..., AppDir], pymysql_venv: Path,
        maria_database: MariaDatabase) -> None:
    """`read_default_file=` in the URL names the option file the driver reads (like
    libpq's passfile=): a root-only one logs root in (the reproduction), not the agent's
    session, which runs as www-data; the same file owned by www-data works."""
    import os
    import pwd

    import pymysql

    from tests.harness.apps import new_workspace

    folder = new_workspace() / "rootonly"
    folder.mkdir(mode=0o700)
    option_file = folder / "my.cnf"
    option_file.write_text(f"[client]\nuser={maria_database.user}\n"
                           f"password={maria_database.password}\n")
    option_file.chmod(0o600)
    server = maria_database.server
    url = (f"mysql+pymysql://{server.host}:{server.port}/{maria_database.name}"
           f"?read_default_file={option_file}")
    # The reproduction: root's own process reads the file and logs in.
    pymysql.connect(host=server.host, port=server.port, database=maria_database.name,
                    read_default_file=str(option_file)).close()
    app = make_app()
    ctx = make_ctx(app, pymysql_venv, {"DATABASE_URL": url})
    denied = mysql.inspect_mysql(url, opener=functools.partial(user_session, ctx))
    assert not denied.inspection.reachable
    assert "Access denied" in denied.inspection.error, denied.inspection.error
    assert maria_database.user not in denied.inspection.error
    # Owned by the unit's user, in a folder it may enter: the same URL works.
    www = pwd.getpwnam(APP_USER)
    os.chown(folder, www.pw_uid, www.pw_gid)
    os.chown(option_file, www.pw_uid, www.pw_gid)
    allowed = mysql.inspect_mysql(url, opener=functools.partial(user_session, ctx))
    assert allowed.inspection.reachable, allowed.inspection.error
    assert allowed.privileges.user.startswith(maria_database.user + "@")


def test_mysqlclient_app_with_a_plain_mysql_url(make_app: Callable[..., AppDir],
                                                mysqlclient_venv: Path,
                                                maria_database: MariaDatabase) -> None:
    """`mysql://` means mysqlclient (MySQLdb) to SQLAlchemy: the probe and the session use
    it, read-only the same way."""
    app = make_app()
    url = maria_database.url.replace("mysql+pymysql://", "mysql://")
    db_upgrade(app, mysqlclient_venv, url, "r2", user=APP_USER)
    result, found = look(app, mysqlclient_venv, url)
    assert result.ok, result.error
    assert found.inspection.reachable, found.inspection.error
    assert found.inspection.version.revisions == ("r2",)
    assert check_ops(result.schema_diff or ()) == (("add_table", "posts"),)
    assert found.privileges.missing == ()
    ctx = make_ctx(app, mysqlclient_venv, {"DATABASE_URL": url})
    with user_session(ctx, url, Timeouts()) as conn:
        assert conn.execute("SELECT @@session.tx_read_only").scalar() == 1
        with pytest.raises(Exception, match="READ ONLY"):
            conn.execute("DELETE FROM alembic_version")
        with pytest.raises(Exception, match="one statement"):
            conn.execute("SET SESSION TRANSACTION READ WRITE; DELETE FROM alembic_version")
        assert conn.execute("SELECT @@session.tx_read_only").scalar() == 1
    assert maria_database.alembic_versions() == ["r2"]
