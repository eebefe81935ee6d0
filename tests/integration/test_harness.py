"""The harness itself, for real: PostgreSQL cluster, Flask-Migrate apps, gunicorn in systemd."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness import apps
from tests.harness.apps import AppSpec
from tests.harness.postgres import PgDatabase, PostgresCluster, free_port
from tests.harness.sandbox import Sandbox

UNIT = "gunicorn.service"
MakeApp = Callable[..., apps.AppDir]
MakeVenv = Callable[[tuple[str, ...]], Path]
MakeSandbox = Callable[[], Sandbox]


def _read_venv_template(venv: Path, name: str) -> str:
    (site,) = venv.glob("lib/python3*/site-packages")
    return (site / "flask_migrate" / "templates" / "flask" / name).read_text()


# -- (a) PostgreSQL --------------------------------------------------------------------------

@pytest.mark.postgres
def test_cluster_roles_databases_and_statement_counts(pg: PostgresCluster) -> None:
    assert pg.pid and pg.port
    pg.create_role("harness_role", "s3cret pass%word@", login=True)
    try:
        pg.create_database("harness_db", owner="harness_role")
        try:
            rows = pg.execute("SELECT current_user, current_database()", db="harness_db",
                              user="harness_role", password="s3cret pass%word@")
            assert rows == [("harness_role", "harness_db")]
            # The SQLAlchemy URL quotes the password; the agent's own engine uses psycopg2.
            import sqlalchemy as sa

            url = pg.dsn("harness_role", "s3cret pass%word@", "harness_db")
            assert url.startswith("postgresql+psycopg2://harness_role:")
            engine = sa.create_engine(url)
            try:
                with engine.connect() as conn:
                    conn.execute(sa.text("CREATE TABLE t (x int)"))
                    conn.execute(sa.text("INSERT INTO t VALUES (1), (2)"))
                    conn.commit()
                    assert conn.execute(sa.text("SELECT sum(x) FROM t")).scalar() == 3
            finally:
                engine.dispose()
            # pg_stat_statements is preloaded and counts per database and role.
            for _ in range(3):
                pg.execute("SELECT count(*) FROM t", db="harness_db", user="harness_role",
                           password="s3cret pass%word@")
            counted = dict(pg.statements(db="harness_db", user="harness_role"))
            assert counted.get("SELECT count(*) FROM t") == 3
        finally:
            pg.drop_database("harness_db")
    finally:
        pg.drop_role("harness_role")


@pytest.mark.postgres
def test_pg_database_fixture_is_fresh_and_password_protected(pg_database: PgDatabase) -> None:
    assert pg_database.execute("SELECT current_user", as_owner=True) == [(pg_database.owner,)]
    assert pg_database.alembic_versions() == []
    import psycopg2

    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        pg_database.cluster.execute("SELECT 1", db=pg_database.name, user=pg_database.owner,
                                    password="wrong")


# -- (b) apps and flask db on the host -----------------------------------------------------

@pytest.mark.postgres
@pytest.mark.parametrize("requirements", [
    pytest.param(apps.SQLALCHEMY_20_REQUIREMENTS, id="sqlalchemy2.0"),
    pytest.param(apps.SQLALCHEMY_14_REQUIREMENTS, id="sqlalchemy1.4"),
    pytest.param(apps.SQLALCHEMY_21_REQUIREMENTS, id="sqlalchemy2.1"),
])
def test_flask_db_upgrade_to_a_chosen_revision(make_venv: MakeVenv, make_app: MakeApp,
                                                pg_database: PgDatabase,
                                                requirements: tuple[str, ...]) -> None:
    venv = make_venv(requirements)
    app = make_app(AppSpec(models_at=3))
    # The migrations/ files are the ones `flask db init` writes for this Flask-Migrate.
    assert apps.FLASK_MIGRATE_ENV_PY == _read_venv_template(venv, "env.py")
    assert apps.FLASK_MIGRATE_SCRIPT_MAKO == _read_venv_template(venv, "script.py.mako")

    assert apps.db_current(app, venv, pg_database.url) == []
    apps.db_upgrade(app, venv, pg_database.url, "r2")
    assert apps.db_current(app, venv, pg_database.url) == ["r2"]
    assert pg_database.alembic_versions() == ["r2"]
    columns = pg_database.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'users' "
        "ORDER BY ordinal_position")
    assert [c for (c,) in columns] == ["id", "email", "name"]
    heads = apps.flask_db(app, venv, pg_database.url, "heads").stdout
    assert heads.split() == ["r3", "(head)"]
    # Freshly upgraded migrations leave no .pyc behind in the app (fingerprints stay stable).
    assert not list(app.root.rglob("__pycache__"))


def test_spec_variants_two_heads_broken_file_missing_env(flask_venv: Path,
                                                         make_app: MakeApp) -> None:
    dummy_url = "postgresql+psycopg2://nobody:x@127.0.0.1:1/none"

    two = make_app(apps.two_heads_spec(), name="two_heads")
    assert two.spec.heads == ("r3", "r3b")
    heads = apps.flask_db(two, flask_venv, dummy_url, "heads").stdout
    assert sorted(line.split()[0] for line in heads.splitlines()) == ["r3", "r3b"]

    broken = make_app(AppSpec().with_revisions(apps.broken_revision("r4", "r3")),
                      name="broken")
    proc = apps.flask_db(broken, flask_venv, dummy_url, "heads", check=False)
    assert proc.returncode != 0
    assert "SyntaxError" in proc.stderr
    assert broken.revision_file("r4").name == "r4_broken.py"

    plain = make_app(name="plain")
    proc = apps.import_app(plain, flask_venv, None, check=False)
    assert proc.returncode != 0 and "KeyError: 'DATABASE_URL'" in proc.stderr

    # Models at version 2 against migrations up to r3, written as files that import cleanly.
    behind = make_app(AppSpec(models_at=2), name="behind")
    models = (behind.package_dir / "models.py").read_text()
    assert "class User" in models and "name = db.Column" in models and "Post" not in models


@pytest.mark.postgres
def test_import_time_hooks(flask_venv: Path, make_app: MakeApp, app_workspace: Path,
                           pg_database: PgDatabase) -> None:
    state = apps.writable_dir(app_workspace / "state")
    app = make_app(AppSpec(on_import=apps.record_identity_hook(str(state)),
                           on_create=apps.db_write_hook()))
    apps.import_app(app, flask_venv, pg_database.url, user="www-data")
    (record,) = apps.read_identities(state)
    assert record["uid"] == 33 and record["gid"] == 33
    assert record["executable"] == f"{flask_venv}/bin/python"
    assert pg_database.execute("SELECT count(*) FROM import_side_effect") == [(1,)]
    # The same app, under the probe's read-only session setting, cannot write on import.
    proc = apps.import_app(app, flask_venv, pg_database.url, check=False,
                           env={"PGOPTIONS": "-c default_transaction_read_only=on"})
    assert proc.returncode != 0 and "ReadOnlySqlTransaction" in proc.stderr
    assert pg_database.execute("SELECT count(*) FROM import_side_effect") == [(1,)]


# -- (c) end to end: gunicorn under a real systemd ---------------------------------------

@pytest.mark.postgres
@pytest.mark.systemd
def test_gunicorn_unit_serves_the_app_as_www_data(make_sandbox: MakeSandbox, flask_venv: Path,
                                                  make_app: MakeApp,
                                                  app_workspace: Path,
                                                  pg_database: PgDatabase) -> None:
    state = apps.writable_dir(app_workspace / "state")
    app = make_app(AppSpec(on_import=apps.record_identity_hook(str(state))))
    apps.db_upgrade(app, flask_venv, pg_database.url)  # as root on the host: one record
    assert [r["uid"] for r in apps.read_identities(state)] == [0]
    port = free_port()
    unit = apps.gunicorn_unit(venv=flask_venv, app_dir=app, port=port,
                              environment={"FLASK_ENV": "production"},
                              environment_files=["/etc/default/site"])

    sb = make_sandbox()
    sb.add_unit(UNIT, unit)
    sb.add_file("/etc/default/site", apps.env_file_text({"DATABASE_URL": pg_database.url}),
                mode=0o600)
    sb.boot()
    sb.systemctl("start", UNIT)
    sb.wait_active(UNIT)

    def diagnostics() -> str:
        return apps.unit_diagnostics(sb, UNIT)

    status, body = apps.http_get(f"http://127.0.0.1:{port}/db", describe=diagnostics)
    assert status == 200, body
    assert json.loads(body) == {"revision": ["r3"], "schema_version": 3,
                                "tables": {"users": 0, "posts": 0}}
    status, body = apps.http_get(f"http://127.0.0.1:{port}/whoami")
    who = json.loads(body)
    assert who["uid"] == 33 and who["executable"] == f"{flask_venv}/bin/python"
    assert who["cwd"] == str(app.root)
    assert who["database"]["database"] == pg_database.name
    assert who["database"]["port"] == pg_database.cluster.port

    master, workers = apps.gunicorn_pids(sb, UNIT, workers=2)
    assert len(workers) == 2
    for pid in (master, *workers):
        st = apps.proc_status(sb, pid)
        assert st["Uid"].split() == ["33"] * 4, (pid, st["Uid"])
        assert st["Gid"].split() == ["33"] * 4, (pid, st["Gid"])
    cmdline = sb.path(f"/proc/{master}/cmdline").read_bytes().split(b"\0")
    assert cmdline[1].decode() == f"{flask_venv}/bin/gunicorn"
    # Each worker imported the app (no --preload): two identity lines, both www-data.
    deadline = time.monotonic() + 20
    while True:  # a worker may still be importing the app while the other one serves
        records = [r for r in apps.read_identities(sb.path(str(state))) if r["uid"] != 0]
        if len(records) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert sorted(r["pid"] for r in records) == sorted(workers)
    assert {r["uid"] for r in records} == {33}
    assert all(r["ppid"] == master for r in records)
    assert "DATABASE_URL" in records[0]["env_keys"]


@pytest.mark.systemd
@pytest.mark.parametrize("launcher,chdir,app_spec", [
    ("python-m", False, "wsgi:app"),
    ("sh-c", True, "wsgi:app"),
    ("sh-activate", False, "app:create_app()"),
])
def test_gunicorn_unit_launcher_variants(make_sandbox: MakeSandbox, flask_venv: Path,
                                         make_app: MakeApp,
                                         launcher: str, chdir: bool, app_spec: str) -> None:
    app = make_app()
    port = free_port()
    unit = apps.gunicorn_unit(
        venv=flask_venv, app_dir=app, port=port, launcher=launcher, chdir=chdir,
        working_directory=not chdir, app_spec=app_spec,
        environment={"DATABASE_URL": "postgresql+psycopg2://nobody:x@127.0.0.1:1/none"})
    assert ("WorkingDirectory=" in unit) is (not chdir)
    sb = make_sandbox()
    sb.add_unit(UNIT, unit)
    sb.boot()
    sb.systemctl("start", UNIT)
    sb.wait_active(UNIT)
    status, body = apps.http_get(f"http://127.0.0.1:{port}/healthz",
                                 describe=lambda: apps.unit_diagnostics(sb, UNIT))
    assert (status, body) == (200, "ok\n")
    status, body = apps.http_get(f"http://127.0.0.1:{port}/whoami")
    assert json.loads(body)["uid"] == 33
    assert json.loads(body)["cwd"] == str(app.root)
