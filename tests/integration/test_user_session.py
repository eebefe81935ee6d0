"""The agent's own database session as the unit's user: a hostile URL gains nothing.

Real PostgreSQL (scram-sha-256 on TCP), the real test-app venv as the app's interpreter,
the session child really running as www-data.
"""

from __future__ import annotations

import functools
import json
import os
import pwd
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from agent.dbsql import DBAPIError

from agent.context import AppContext, ContextInputs, build_context
from agent.model import ExecCommand, UnitProperties
from agent.privileged.dbclient import user_session
from agent.privileged.probe_runner import ProbeRequest, run_probe
from agent.privileged.sources import database
from tests.harness.apps import APP_USER, AppDir, AppSpec, db_upgrade, db_write_hook, new_workspace
from tests.harness.postgres import PgDatabase, sqlalchemy_url
from tests.integration.test_probe import make_ctx

pytestmark = pytest.mark.postgres

TIMEOUTS = database.Timeouts(connect_s=3)


def unit_ctx(venv: Path, env: dict[str, str] | None = None, user: str = APP_USER,
             workdir: str = "/") -> AppContext:
    """The context of a gunicorn unit running from venv as user."""
    gunicorn = f"{venv}/bin/gunicorn"
    props = UnitProperties(
        name="gunicorn.service", load_state="loaded", active_state="active",
        sub_state="running", working_directory=workdir,
        environment=tuple(f"{k}={v}" for k, v in (env or {}).items()),
        exec_start=(ExecCommand(gunicorn, (gunicorn, "wsgi:app")),), user=user, group=user)
    return build_context(props, ContextInputs(venvs={str(venv): True}))


def passwordless_url(db: PgDatabase, **query: str) -> str:
    """The owner's URL without its password, plus libpq parameters in the query."""
    url = sqlalchemy_url(db.owner, None, db.name, db.cluster.host, db.cluster.port)
    return url + ("?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else "")


@pytest.fixture
def secret_dir() -> Iterator[Path]:
    """A directory only root can enter (like /root), for root-only files."""
    path = new_workspace() / "rootonly"
    path.mkdir(mode=0o700)
    os.chmod(path, 0o700)
    try:
        yield path
    finally:
        shutil.rmtree(path.parent, ignore_errors=True)


def write_passfile(path: Path, db: PgDatabase, owner: str) -> Path:
    """A libpq password file for db's owner, 0600, owned by owner."""
    path.write_text(f"{db.cluster.host}:{db.cluster.port}:{db.name}:{db.owner}:{db.password}\n")
    entry = pwd.getpwnam(owner)
    os.chown(path, entry.pw_uid, entry.pw_gid)
    os.chmod(path, 0o600)
    return path


def test_agent_session_as_the_unit_user_reads_the_version_table(
        flask_venv: Path, pg_database: PgDatabase) -> None:
    pg_database.execute("CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY)",
                        as_owner=True)
    pg_database.execute("INSERT INTO alembic_version VALUES ('r2')", as_owner=True)
    opener = functools.partial(user_session, unit_ctx(flask_venv))
    found = database.inspect(pg_database.url, timeouts=TIMEOUTS, opener=opener)
    assert found.reachable, found.error
    assert found.version.exists and found.version.revisions == ("r2",)
    assert found.privileges.user == pg_database.owner and found.privileges.sufficient
    assert found.identity.database == pg_database.name
    assert found.schema_fingerprint


def test_root_only_passfile_in_the_url_was_read_by_root_and_no_longer_is(
        flask_venv: Path, pg_database: PgDatabase, secret_dir: Path) -> None:
    """issue 7: the URL names a password file only root can read."""
    passfile = write_passfile(secret_dir / "pgpass", pg_database, "root")
    hostile = passwordless_url(pg_database, passfile=str(passfile))
    # Reproduction: a session opened by root itself reads the file and gets in.
    as_root = database.inspect(hostile, timeouts=TIMEOUTS)
    assert as_root.reachable, as_root.error
    # The agent's session is the unit user's: libpq cannot read root's file, no login.
    opener = functools.partial(user_session, unit_ctx(flask_venv))
    as_user = database.inspect(hostile, timeouts=TIMEOUTS, opener=opener)
    assert not as_user.reachable
    assert "authentication failed" in as_user.error or "password" in as_user.error
    assert pg_database.password not in as_user.error


def test_the_unit_users_own_passfile_is_used(flask_venv: Path, pg_database: PgDatabase,
                                             app_workspace: Path) -> None:
    """PGPASSFILE= in the unit's environment, owned by the unit's user: like the app."""
    home = app_workspace / "home"
    home.mkdir()
    passfile = write_passfile(home / "pgpass", pg_database, APP_USER)
    ctx = unit_ctx(flask_venv, {"PGPASSFILE": str(passfile)})
    opener = functools.partial(user_session, ctx)
    found = database.inspect(passwordless_url(pg_database), timeouts=TIMEOUTS, opener=opener)
    assert found.reachable, found.error
    # The same file owned by root (0600): the unit's user cannot use it, neither can we.
    write_passfile(passfile, pg_database, "root")
    denied = database.inspect(passwordless_url(pg_database), timeouts=TIMEOUTS, opener=opener)
    assert not denied.reachable


@pytest.mark.parametrize("options", [
    "-c default_transaction_read_only=off",
    "-c default_transaction_read_only=off -c statement_timeout=0 -c lock_timeout=0",
])
def test_options_in_the_url_cannot_lift_read_only(flask_venv: Path, pg_database: PgDatabase,
                                                  options: str) -> None:
    url = pg_database.url + "?options=" + options.replace(" ", "%20").replace("=", "%3D")
    ctx = unit_ctx(flask_venv)
    with user_session(ctx, url, TIMEOUTS) as conn:
        assert conn.execute(text("SHOW transaction_read_only")).scalar() == "on"
        assert conn.execute(text("SHOW statement_timeout")).scalar() == "3s"
        assert conn.execute(text("SHOW lock_timeout")).scalar() == "500ms"
        # The URL's options did reach the server: its session default says off.
        assert conn.execute(text("SHOW default_transaction_read_only")).scalar() == "off"
        with pytest.raises(DBAPIError, match="read-only transaction"):
            conn.execute(text("CREATE TABLE written_by_agent (id int)"))
        # Nothing can open its own read-write transaction either.
        with pytest.raises(DBAPIError):
            conn.execute(text("COMMIT; BEGIN READ WRITE; CREATE TABLE w2 (id int)"))
    rows = pg_database.execute("SELECT count(*) FROM pg_class WHERE relname LIKE 'w%'")
    assert rows[0][0] == 0


def test_session_never_holds_a_transaction_open(flask_venv: Path,
                                                pg_database: PgDatabase) -> None:
    with user_session(unit_ctx(flask_venv), pg_database.url, TIMEOUTS) as conn:
        me = conn.execute(text("SELECT pg_backend_pid()")).scalar()
        state = pg_database.execute(
            "SELECT state, backend_xid IS NULL AND backend_xmin IS NULL "
            "FROM pg_stat_activity WHERE pid = %s", (me,))
        assert state == [("idle", True)]


def test_unit_without_user_gets_no_session_as_root(flask_venv: Path,
                                                   pg_database: PgDatabase) -> None:
    opener = functools.partial(user_session, unit_ctx(flask_venv, user=""))
    found = database.inspect(pg_database.url, timeouts=TIMEOUTS, opener=opener)
    assert not found.reachable and "root" in found.error


def test_probe_app_writing_at_import_with_options_in_its_url_writes_nothing(
        make_app: Callable[..., AppDir], flask_venv: Path, pg_database: PgDatabase) -> None:
    """issue 7: options= in the app's URL replaced PGOPTIONS, so import-time code could write."""
    app = make_app(AppSpec(on_create=db_write_hook("import_side_effect")))
    db_upgrade(app, flask_venv, pg_database.url)
    before = pg_database.execute("SELECT count(*) FROM import_side_effect")
    url = pg_database.url + "?options=-c%20default_transaction_read_only%3Doff"
    result = run_probe(make_ctx(app, flask_venv, {"DATABASE_URL": url}), ProbeRequest(), 60)
    assert not result.ok and "read-only transaction" in result.error
    assert pg_database.execute("SELECT count(*) FROM import_side_effect") == before


# -- root's own libpq files: a URL must not make root use them -------------------------------
# The agent runs as root; root's ~/.pgpass and ~/.pg_service.conf are stood in for by
# PGPASSFILE / PGSERVICEFILE in the agent's (this test process's) environment.

def test_hostaddr_cannot_send_roots_password_elsewhere(
        flask_venv: Path, pg_database: PgDatabase, secret_dir: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """host= names a host root has a password for, hostaddr= sends it to another server."""
    roots = secret_dir / "pgpass"
    roots.write_text(f"trusted.example:{pg_database.cluster.port}:*:{pg_database.owner}:"
                     f"{pg_database.password}\n")
    roots.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(roots))
    url = sqlalchemy_url(pg_database.owner, None, pg_database.name, "trusted.example",
                         pg_database.cluster.port) + "?hostaddr=127.0.0.1"
    # Reproduction: root's session sends root's password to whatever hostaddr says.
    assert database.inspect(url, timeouts=TIMEOUTS).reachable
    opener = functools.partial(user_session, unit_ctx(flask_venv))
    as_user = database.inspect(url, timeouts=TIMEOUTS, opener=opener)
    assert not as_user.reachable and "password" in as_user.error


def test_service_in_the_url_never_reads_roots_service_file(
        flask_venv: Path, pg_database: PgDatabase, secret_dir: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    services = secret_dir / "pg_service.conf"
    services.write_text(f"[prod]\nhost=127.0.0.1\nport={pg_database.cluster.port}\n"
                        f"dbname={pg_database.name}\nuser={pg_database.owner}\n"
                        f"password={pg_database.password}\n")
    services.chmod(0o600)
    monkeypatch.setenv("PGSERVICEFILE", str(services))
    url = "postgresql+psycopg2:///?service=prod"
    assert database.inspect(url, timeouts=TIMEOUTS).reachable  # reproduction, as root
    opener = functools.partial(user_session, unit_ctx(flask_venv))
    as_user = database.inspect(url, timeouts=TIMEOUTS, opener=opener)
    assert not as_user.reachable
    assert "prod" in as_user.error or "service" in as_user.error, as_user.error


def test_sslrootcert_only_root_can_read_is_not_read(flask_venv: Path, secret_dir: Path) -> None:
    """libpq opens sslrootcert= as the connecting user: root could, the unit's user cannot."""
    import subprocess

    from tests.harness.postgres import PostgresCluster

    cert, key = secret_dir / "server.crt", secret_dir / "server.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    with PostgresCluster() as cluster:
        datadir = cluster.datadir
        owner = datadir.stat()
        for src in (cert, key):
            dest = datadir / src.name
            dest.write_bytes(src.read_bytes())
            dest.chmod(0o600)
            os.chown(dest, owner.st_uid, owner.st_gid)
        cluster.execute("ALTER SYSTEM SET ssl = on")
        cluster.execute("SELECT pg_reload_conf()")
        db = cluster.new_database()
        url = db.url + f"?sslmode=verify-full&sslrootcert={cert}"
        # Reproduction: root's own session reads the root-only CA file and gets in.
        assert database.inspect(url, timeouts=TIMEOUTS).reachable
        opener = functools.partial(user_session, unit_ctx(flask_venv))
        as_user = database.inspect(url, timeouts=TIMEOUTS, opener=opener)
        assert not as_user.reachable
        assert "certificate" in as_user.error or "Permission denied" in as_user.error, \
            as_user.error


def test_symlinks_to_root_only_files_in_the_app_gain_nothing(
        make_app: Callable[..., AppDir], flask_venv: Path, pg_database: PgDatabase,
        secret_dir: Path) -> None:
    """A migration script and a config module symlinked to root-only files: the probe (as
    the unit's user) cannot read them and nothing of them appears in what root reports."""
    secret = secret_dir / "shadow"
    secret.write_text("ROOT_ONLY_SECRET_4711 = 1\n")
    secret.chmod(0o600)
    app = make_app()
    db_upgrade(app, flask_venv, pg_database.url)
    (app.versions / "r9_stolen.py").symlink_to(secret)
    result = run_probe(make_ctx(app, flask_venv, {"DATABASE_URL": pg_database.url}),
                       ProbeRequest(), 60)
    # The unit's user cannot even stat it: Alembic skips it; root never loads it.
    assert [r["revision"] for r in result.revisions] == ["r3", "r2", "r1"]
    assert "ROOT_ONLY_SECRET_4711" not in json.dumps(result.as_dict())
    assert "ROOT_ONLY_SECRET_4711" not in result.output_tail
