"""The probe against real Flask-Migrate apps, their own venvs and a real PostgreSQL."""

from __future__ import annotations

import json
import pwd
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.context import AppContext, ContextInputs, build_context
from agent.model import ExecCommand, UnitProperties
from agent.privileged.probe_runner import ProbeRequest, ProbeResult, run_probe
from agent.privileged.probe_runner import fingerprint
from tests.harness.apps import (
    APP_USER,
    SQLALCHEMY_14_REQUIREMENTS,
    SQLALCHEMY_21_REQUIREMENTS,
    AppDir,
    AppSpec,
    broken_revision,
    db_upgrade,
    db_write_hook,
    read_identities,
    record_identity_hook,
    two_heads_spec,
    writable_dir,
)
from tests.harness.postgres import PgDatabase

pytestmark = pytest.mark.postgres

TIMEOUT = 60.0


def make_ctx(app: AppDir, venv: Path, env: dict[str, str], user: str = APP_USER,
             app_spec: str = "wsgi:app") -> AppContext:
    """The context a gunicorn.service running app from venv as user would have."""
    gunicorn = f"{venv}/bin/gunicorn"
    props = UnitProperties(
        name="gunicorn.service", load_state="loaded", active_state="active",
        sub_state="running", working_directory=str(app.root),
        environment=tuple(f"{k}={v}" for k, v in env.items()),
        exec_start=(ExecCommand(gunicorn, (gunicorn, "--workers", "2", "--bind",
                                           "127.0.0.1:8000", app_spec)),),
        user=user, group=user)
    return build_context(props, ContextInputs(venvs={str(venv): True}))


def probe(app: AppDir, venv: Path, env: dict[str, str], timeout: float = TIMEOUT,
          **kw: object) -> ProbeResult:
    """run_probe with the default request."""
    return run_probe(make_ctx(app, venv, env, **kw), ProbeRequest(), timeout)  # type: ignore[arg-type]


def assert_no_secret(result: ProbeResult, db: PgDatabase) -> None:
    """The password never appears in the surfaced form."""
    assert db.password not in json.dumps(result.as_dict())


def test_healthy_app_at_head_has_no_drift(make_app: Callable[..., AppDir], flask_venv: Path,
                                          pg_database: PgDatabase) -> None:
    app = make_app()
    db_upgrade(app, flask_venv, pg_database.url)
    result = probe(app, flask_venv, {"DATABASE_URL": pg_database.url})
    assert result.ok, result.error
    assert result.urls == {"default": pg_database.url}
    assert result.schema_diff == ()
    assert [r["revision"] for r in result.revisions] == ["r3", "r2", "r1"]
    assert result.heads == ("r3",)
    assert result.migrations_dir == str(app.migrations)
    assert result.script_location == str(app.migrations)
    r2 = next(r for r in result.revisions if r["revision"] == "r2")
    assert r2["down_revisions"] == ["r1"] and r2["path"] == str(app.revision_file("r2"))
    assert len(r2["sha256"]) == 64
    assert result.app_uid == pwd.getpwnam(APP_USER).pw_uid
    assert result.versions["sqlalchemy"].startswith("2.0")
    assert_no_secret(result, pg_database)
    assert "****" in result.as_dict()["urls"]["default"]


def test_model_column_not_migrated_is_add_column(make_app: Callable[..., AppDir],
                                                 flask_venv: Path,
                                                 pg_database: PgDatabase) -> None:
    app = make_app(AppSpec(models_at=4))  # models have posts.created_at, migrations stop at r3
    db_upgrade(app, flask_venv, pg_database.url)
    result = probe(app, flask_venv, {"DATABASE_URL": pg_database.url})
    assert result.ok, result.error
    assert [(d["kind"], d["table"], d["name"]) for d in result.schema_diff or ()] == [
        ("add_column", "posts", "created_at")]


def test_manual_alter_table_is_remove_column(make_app: Callable[..., AppDir],
                                             flask_venv: Path,
                                             pg_database: PgDatabase) -> None:
    app = make_app()
    db_upgrade(app, flask_venv, pg_database.url)
    pg_database.execute("ALTER TABLE users ADD COLUMN legacy_flag boolean")
    result = probe(app, flask_venv, {"DATABASE_URL": pg_database.url})
    assert [(d["kind"], d["table"], d["name"]) for d in result.schema_diff or ()] == [
        ("remove_column", "users", "legacy_flag")]


NOISE = (
    "import sys\n"
    "print('{\"protocol\": 1, \"ok\": false}')  # fake report on stdout\n"
    "sys.stdout.write('x' * 200000)\n"
    "sys.stderr.write('warning: noisy app\\n' * 10000)\n"
)


@pytest.mark.parametrize("app_spec, extra_env", [
    ("wsgi:app", {}),
    ("app:create_app()", {}),
    ("", {"FLASK_APP": "wsgi.py"}),
    ("", {}),  # flask's own fallback: wsgi.py in the working directory
], ids=["variable", "factory", "FLASK_APP", "default"])
def test_app_is_found_the_way_the_unit_finds_it_and_noise_is_harmless(
        app_spec: str, extra_env: dict[str, str], make_app: Callable[..., AppDir],
        flask_venv: Path, pg_database: PgDatabase) -> None:
    app = make_app(AppSpec(on_import=NOISE))
    db_upgrade(app, flask_venv, pg_database.url)
    ctx = make_ctx(app, flask_venv, {"DATABASE_URL": pg_database.url, **extra_env},
                   app_spec=app_spec)
    result = run_probe(ctx, ProbeRequest(), TIMEOUT)
    assert result.ok, result.error
    assert result.schema_diff == () and result.heads == ("r3",)
    # env.py's own logging (fileConfig, as `flask db check` prints it) may follow.
    assert "warning: noisy app\n" in result.output_tail
    assert len(result.output_tail) <= 4096


def test_two_heads_are_both_reported(make_app: Callable[..., AppDir], flask_venv: Path,
                                     pg_database: PgDatabase) -> None:
    app = make_app(two_heads_spec())
    result = probe(app, flask_venv, {"DATABASE_URL": pg_database.url})
    assert result.heads == ("r3", "r3b")
    assert {r["revision"]: r["down_revisions"] for r in result.revisions} == {
        "r1": [], "r2": ["r1"], "r3": ["r2"], "r3b": ["r2"]}
    # An empty database: every model table is missing from the live schema.
    assert {(d["kind"], d["table"]) for d in result.schema_diff or ()} == {
        ("add_table", "users"), ("add_table", "posts")}


def test_database_down_is_a_database_error_with_the_rest_reported(
        make_app: Callable[..., AppDir], flask_venv: Path) -> None:
    from tests.harness.postgres import free_port

    app = make_app()
    url = f"postgresql://app:pw-never-shown@127.0.0.1:{free_port()}/app"
    result = probe(app, flask_venv, {"DATABASE_URL": url})
    assert result.error_kind == "database"
    assert result.error.startswith("the live schema could not be compared: OperationalError")
    assert result.urls == {"default": url} and result.heads == ("r3",)
    assert "pw-never-shown" not in json.dumps(result.as_dict())
    ctx = make_ctx(app, flask_venv, {"DATABASE_URL": url})
    quiet = run_probe(ctx, ProbeRequest(compare_schema=False, include_revisions=False),
                      TIMEOUT)
    assert quiet.ok and quiet.schema_diff is None and quiet.revisions == ()
    assert quiet.migrations_dir == str(app.migrations)


def test_missing_database_url_is_app_load_error(make_app: Callable[..., AppDir],
                                                flask_venv: Path) -> None:
    app = make_app()
    result = probe(app, flask_venv, {})
    assert not result.ok
    assert result.error_kind == "app_load"
    assert result.error.startswith("the app could not be loaded: KeyError: 'DATABASE_URL'")
    assert str(app.package_dir / "__init__.py") in result.error
    assert result.finding() is not None and result.finding().severity == "critical"


def test_syntax_error_in_migration_names_file_and_keeps_the_rest(
        make_app: Callable[..., AppDir], flask_venv: Path, pg_database: PgDatabase) -> None:
    spec = AppSpec().with_revisions(broken_revision("r4", "r3"))
    app = make_app(AppSpec())
    db_upgrade(app, flask_venv, pg_database.url)
    app = make_app(spec)  # the broken file arrives after the database was migrated
    result = probe(app, flask_venv, {"DATABASE_URL": pg_database.url})
    assert result.error_kind == "migrations"
    assert str(app.revision_file("r4")) in result.error
    broken = app.revision_file("r4")
    line = next(n for n, text in enumerate(broken.read_text().splitlines(), 1)
                if "def upgrade(:" in text)
    assert result.error == (f"a migration script could not be read: SyntaxError: invalid "
                            f"syntax (at {broken} line {line})")
    assert result.urls == {"default": pg_database.url}
    assert result.migrations_dir == str(app.migrations)
    assert result.schema_diff == ()  # drift is still compared


def test_app_writing_at_import_gets_read_only_error(make_app: Callable[..., AppDir],
                                                    flask_venv: Path,
                                                    pg_database: PgDatabase) -> None:
    app = make_app(AppSpec(on_create=db_write_hook("import_side_effect")))
    result = probe(app, flask_venv, {"DATABASE_URL": pg_database.url})
    assert result.error_kind == "app_load"
    assert "read-only transaction" in result.error
    assert pg_database.execute(
        "SELECT to_regclass('public.import_side_effect')") == [(None,)]
    assert_no_secret(result, pg_database)


def test_app_code_runs_as_the_unit_user_never_root(make_app: Callable[..., AppDir],
                                                   flask_venv: Path, app_workspace: Path,
                                                   pg_database: PgDatabase) -> None:
    out = writable_dir(app_workspace / "out")
    app = make_app(AppSpec(on_import=record_identity_hook(str(out))))
    db_upgrade(app, flask_venv, pg_database.url, user=APP_USER)
    for old in out.iterdir():
        old.unlink()
    result = probe(app, flask_venv, {"DATABASE_URL": pg_database.url})
    assert result.ok, result.error
    seen = read_identities(out)
    www = pwd.getpwnam(APP_USER)
    assert [(s["uid"], s["euid"], s["gid"]) for s in seen] == [(www.pw_uid, www.pw_uid,
                                                                www.pw_gid)]
    assert 0 not in seen[0]["groups"]
    assert seen[0]["cwd"] == str(app.root)
    assert seen[0]["prefix"] == str(flask_venv)
    assert {"HOME", "USER", "PGAPPNAME", "DATABASE_URL"} <= set(seen[0]["env_keys"])


def test_versions_directory_the_user_cannot_list_is_an_error_not_an_empty_graph(
        make_app: Callable[..., AppDir], flask_venv: Path, pg_database: PgDatabase) -> None:
    # Alembic lists an unreadable versions directory as empty: every revision in the
    # database would then look unknown (a false critical db_revision_unknown).
    app = make_app()
    db_upgrade(app, flask_venv, pg_database.url)
    versions = app.revision_file("r1").parent
    versions.chmod(0o700)  # root-owned: www-data cannot list it
    result = probe(app, flask_venv, {"DATABASE_URL": pg_database.url})
    assert result.error_kind == "migrations", (result.error_kind, result.error)
    assert "Permission denied" in result.error and str(versions) in result.error
    assert result.revisions == ()


def test_working_directory_the_user_cannot_enter(make_app: Callable[..., AppDir],
                                                flask_venv: Path) -> None:
    app = make_app()
    app.root.chmod(0o700)  # root-owned: fine for the agent, not for www-data
    result = probe(app, flask_venv, {"DATABASE_URL": "postgresql://x@127.0.0.1:1/x"})
    assert result.error_kind == "privileges"
    assert result.error == (f"uid 33 cannot enter the working directory {app.root}: "
                            f"Permission denied")


def test_unit_without_user_is_refused(make_app: Callable[..., AppDir],
                                      flask_venv: Path) -> None:
    app = make_app()
    result = probe(app, flask_venv, {"DATABASE_URL": "postgresql://x@127.0.0.1:1/x"},
                   user="")
    assert result.error_kind == "privileges" and "root" in result.error


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_hanging_import_times_out_and_its_group_is_killed(
        make_app: Callable[..., AppDir], flask_venv: Path, app_workspace: Path) -> None:
    out = writable_dir(app_workspace / "out")
    pids = out / "pids"
    hang = (f"import os, subprocess, time\n"
            f"_p = subprocess.Popen(['sleep', '300'])\n"
            f"open({str(pids)!r}, 'w').write('%d %d' % (os.getpid(), _p.pid))\n"
            f"time.sleep(300)\n")
    app = make_app(AppSpec(on_import=hang))
    started = time.monotonic()
    result = probe(app, flask_venv, {"DATABASE_URL": "postgresql://x@127.0.0.1:1/x"},
                   timeout=3)
    took = time.monotonic() - started
    # What the runner reports: it gave up at its timeout, and said so.
    assert result.error_kind == "timeout"
    assert result.error == "the probe timed out after 3 s"
    # Kept on real time (the timeout is a real-world guarantee on a real child): the app
    # sleeps 300 s, so a probe not stopped at its 3 s timeout takes 300 s. 60 s is 20x the
    # timeout (venv start-up and the kill on a loaded 2-core machine), 1/5 of the hang.
    print(f"hanging probe returned after {took:.2f}s (timeout 3 s)")
    assert took < 60, took
    child, grandchild = (int(p) for p in pids.read_text().split())
    # A wait for the kernel to reap them, not a bound: they never exit on their own.
    deadline = time.monotonic() + 30
    while (_alive(child) or _alive(grandchild)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child) and not _alive(grandchild)


#: An older stack: Flask-SQLAlchemy 2.x keeps engines in _SQLAlchemyState, binds in config.
FLASK_SQLALCHEMY_25_REQUIREMENTS = (
    "flask==2.2.5", "werkzeug==2.2.3", "flask-sqlalchemy==2.5.1", "flask-migrate==3.1.0",
    "sqlalchemy==1.4.54", "alembic==1.7.7", "gunicorn==23.0.0", "psycopg2-binary==2.9.13")


@pytest.mark.parametrize("requirements", [SQLALCHEMY_14_REQUIREMENTS,
                                          SQLALCHEMY_21_REQUIREMENTS,
                                          FLASK_SQLALCHEMY_25_REQUIREMENTS],
                         ids=["sqlalchemy-1.4", "sqlalchemy-2.1", "flask-sqlalchemy-2.5"])
def test_other_sqlalchemy_versions(requirements: tuple[str, ...],
                                   make_venv: Callable[[tuple[str, ...]], Path],
                                   make_app: Callable[..., AppDir],
                                   pg_database: PgDatabase) -> None:
    venv = make_venv(requirements)
    app = make_app(AppSpec(models_at=4))
    db_upgrade(app, venv, pg_database.url)
    result = probe(app, venv, {"DATABASE_URL": pg_database.url})
    assert result.ok, result.error
    wanted = next(r for r in requirements if r.startswith("sqlalchemy=="))
    assert result.versions["sqlalchemy"] == wanted.split("==")[1]
    assert result.heads == ("r3",)
    assert [(d["kind"], d["table"], d["name"]) for d in result.schema_diff or ()] == [
        ("add_column", "posts", "created_at")]


def test_fingerprint_changes_with_migration_files(make_app: Callable[..., AppDir],
                                                  flask_venv: Path) -> None:
    app = make_app()
    ctx = make_ctx(app, flask_venv, {"DATABASE_URL": "postgresql://x@127.0.0.1:1/x"})
    before = fingerprint(ctx, str(app.migrations))
    assert fingerprint(ctx, str(app.migrations)) == before
    app.write("migrations/versions/r9_new.py", "revision = 'r9'\n")
    assert fingerprint(ctx, str(app.migrations)) != before


BIND_APP = '''\
import os
from flask import Flask
from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy

app = Flask(__name__)
app.config["SQLALCHEMY_DATABASE_URI"] = os.environ["DATABASE_URL"]
app.config["SQLALCHEMY_BINDS"] = {"audit": os.environ["AUDIT_DATABASE_URL"]}
db = SQLAlchemy(app)
migrate = Migrate(app, db, directory="migrations")


class Account(db.Model):
    __tablename__ = "accounts"
    id = db.Column(db.Integer, primary_key=True)


class AuditLog(db.Model):
    __bind_key__ = "audit"
    __tablename__ = "audit_log"
    id = db.Column(db.Integer, primary_key=True)
'''


@pytest.mark.parametrize("requirements", [None, FLASK_SQLALCHEMY_25_REQUIREMENTS],
                         ids=["flask-sqlalchemy-3.1", "flask-sqlalchemy-2.5"])
def test_binds_are_reported_and_env_py_decides_what_is_compared(
        requirements: tuple[str, ...] | None, make_venv: Callable[..., Path],
        make_app: Callable[..., AppDir], pg: object, pg_database: PgDatabase) -> None:
    """Flask-Migrate's single-database env.py compares get_metadata() with the default
    engine only, as `flask db check` does: Flask-SQLAlchemy 3 gives the default bind's
    MetaData, 2.x its one MetaData holding every bind's tables."""
    venv = make_venv(requirements) if requirements else make_venv()
    audit = pg.new_database()  # type: ignore[attr-defined]
    try:
        app = make_app(AppSpec(extra_files={"bindapp.py": BIND_APP}))
        result = probe(app, venv, {"DATABASE_URL": pg_database.url,
                                   "AUDIT_DATABASE_URL": audit.url}, app_spec="bindapp:app")
        assert result.ok, result.error
        assert result.urls == {"default": pg_database.url, "audit": audit.url}
        expected = [("default", "add_table", "accounts")]
        if requirements:  # Flask-SQLAlchemy 2.x: audit_log is in the same MetaData
            expected.append(("default", "add_table", "audit_log"))
        assert sorted((d["bind"], d["kind"], d["table"]) for d in result.schema_diff or ()) \
            == expected
        assert result.alembic_env.drift_source == "env.py"
        assert audit.password not in json.dumps(result.as_dict())
    finally:
        pg.drop(audit)  # type: ignore[attr-defined]


# -- gunicorn's own configuration: config files, GUNICORN_CMD_ARGS, no gunicorn at all --------

def gunicorn_ctx(venv: Path, args: list[str], env: dict[str, str], working_directory: str = "/",
                 program: str = "") -> AppContext:
    """A gunicorn.service whose ExecStart is PROGRAM ARGS (default: the venv's gunicorn)."""
    argv = [program] if program else [f"{venv}/bin/gunicorn"]
    if program.endswith(("python", "python3")):
        argv += ["-m", "gunicorn"]
    argv += ["--workers", "2", "--bind", "127.0.0.1:8000", *args]
    props = UnitProperties(
        name="gunicorn.service", load_state="loaded", active_state="active",
        sub_state="running", working_directory=working_directory,
        environment=tuple(f"{k}={v}" for k, v in env.items()),
        exec_start=(ExecCommand(argv[0], tuple(argv)),), user=APP_USER, group=APP_USER)
    return build_context(props, ContextInputs(venvs={str(venv): True}))


def write_file(path: Path, text: str) -> Path:
    """A root-owned file www-data can read (0755 parents), like /etc/app/gunicorn.conf.py."""
    for parent in reversed(path.parents):
        if not parent.exists():
            parent.mkdir(mode=0o755)
    path.write_text(text)
    path.chmod(0o644)
    return path


def test_gunicorn_config_file_gives_app_chdir_env_and_pythonpath(
        make_app: Callable[..., AppDir], flask_venv: Path, app_workspace: Path,
        pg_database: PgDatabase) -> None:
    # The app imports a module that only the config file's pythonpath makes importable.
    write_file(app_workspace / "lib" / "sitelib.py", "VALUE = 1\n")
    app = make_app(AppSpec(on_import="import sitelib\n"))
    db_upgrade(app, flask_venv, pg_database.url, env={"PYTHONPATH": str(app_workspace / "lib")})
    conf = write_file(app_workspace / "etc" / "gunicorn.conf.py", (
        f"wsgi_app = 'wsgi:app'\n"
        f"chdir = {str(app.root)!r}\n"
        f"pythonpath = {str(app_workspace / 'lib')!r}\n"
        f"raw_env = ['DATABASE_URL={pg_database.url}', 'SECRET_KEY=never-shown-1234']\n"
        f"workers = 3\n"))
    ctx = gunicorn_ctx(flask_venv, ["-c", str(conf)], {})  # WorkingDirectory=/, no env
    result = run_probe(ctx, ProbeRequest(), TIMEOUT)
    assert result.ok, result.error
    assert result.urls == {"default": pg_database.url}
    assert result.schema_diff == () and result.heads == ("r3",)
    assert (result.config_source, result.gunicorn_config, result.app_chdir, result.app_uri) == (
        "gunicorn config", str(conf), str(app.root), "wsgi:app")
    assert result.pythonpath == (str(app_workspace / "lib"),)
    assert result.raw_env_names == ("DATABASE_URL", "SECRET_KEY")
    assert result.migrations_dir == str(app.migrations)
    shown = json.dumps(result.as_dict())
    assert "never-shown-1234" not in shown and pg_database.password not in shown
    assert result.versions["gunicorn"] == "23.0.0"


def test_default_gunicorn_conf_py_in_the_working_directory_and_command_line_wins(
        make_app: Callable[..., AppDir], flask_venv: Path, pg_database: PgDatabase) -> None:
    app = make_app(AppSpec(models_at=4))
    db_upgrade(app, flask_venv, pg_database.url)
    # gunicorn reads ./gunicorn.conf.py by itself; its wsgi_app loses to the positional app.
    app.write("gunicorn.conf.py", f"wsgi_app = 'nosuchmodule:app'\n"
                                  f"raw_env = ['DATABASE_URL={pg_database.url}']\n")
    ctx = gunicorn_ctx(flask_venv, ["app:create_app()"], {}, working_directory=str(app.root))
    result = run_probe(ctx, ProbeRequest(), TIMEOUT)
    assert result.ok, result.error
    assert result.gunicorn_config == str(app.root / "gunicorn.conf.py")
    assert result.app_uri == "app:create_app()" and result.app_chdir == str(app.root)
    assert result.urls == {"default": pg_database.url}
    assert [(d["kind"], d["table"], d["name"]) for d in result.schema_diff or ()] == [
        ("add_column", "posts", "created_at")]


def test_gunicorn_cmd_args_in_the_environment(make_app: Callable[..., AppDir],
                                              flask_venv: Path,
                                              pg_database: PgDatabase) -> None:
    app = make_app()
    db_upgrade(app, flask_venv, pg_database.url)
    env = {"GUNICORN_CMD_ARGS": f"--chdir {app.root} --env DATABASE_URL={pg_database.url}"}
    ctx = gunicorn_ctx(flask_venv, ["wsgi:app"], env)
    result = run_probe(ctx, ProbeRequest(), TIMEOUT)
    assert result.ok, result.error
    assert (result.config_source, result.gunicorn_config, result.app_chdir) == (
        "gunicorn config", "", str(app.root))
    assert result.raw_env_names == ("DATABASE_URL",)
    assert result.urls == {"default": pg_database.url} and result.schema_diff == ()


def test_broken_gunicorn_config_is_an_app_load_error_naming_file_and_exception(
        make_app: Callable[..., AppDir], flask_venv: Path, app_workspace: Path) -> None:
    app = make_app()
    conf = write_file(app_workspace / "etc" / "gunicorn.conf.py",
                      f"chdir = {str(app.root)!r}\nworkers = undefined_name * 2\n")
    ctx = gunicorn_ctx(flask_venv, ["-c", str(conf), "wsgi:app"], {})
    result = run_probe(ctx, ProbeRequest(), TIMEOUT)
    assert result.error_kind == "app_load"
    assert result.error == (f"gunicorn config {conf} failed: NameError: name 'undefined_name' "
                            f"is not defined (at {conf} line 2)")
    assert result.finding() is not None and result.finding().check == "app_load_failed"
    # An unknown option: gunicorn's own argparse message.
    bad = run_probe(gunicorn_ctx(flask_venv, ["--no-such-option", "wsgi:app"], {}),
                    ProbeRequest(), TIMEOUT)
    assert bad.error_kind == "app_load"
    assert bad.error.startswith("gunicorn's configuration failed: ") and \
        "--no-such-option" in bad.error


def venv_without_gunicorn(flask_venv: Path, where: Path) -> Path:
    """A real venv with the default app packages but no gunicorn (app_venv's import check
    insists on gunicorn): a fresh venv whose site-packages links to flask_venv's entries."""
    import subprocess

    venv = where / "venv-nogunicorn"
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next(venv.glob("lib/python3*/site-packages"))
    source = next(flask_venv.glob("lib/python3*/site-packages"))
    for entry in source.iterdir():
        if not entry.name.lower().startswith(("gunicorn", "_distutils_hack", "pip")):
            (site / entry.name).symlink_to(entry)
    for path in [venv, *venv.rglob("*")]:
        if not path.is_symlink():
            path.chmod(path.stat().st_mode | (0o755 if path.is_dir() else 0o644))
    return venv


def test_without_gunicorn_the_execstart_parse_still_works(
        make_app: Callable[..., AppDir], flask_venv: Path, app_workspace: Path,
        pg_database: PgDatabase) -> None:
    app = make_app()
    db_upgrade(app, flask_venv, pg_database.url)
    venv = venv_without_gunicorn(flask_venv, app_workspace)
    # e.g. a system gunicorn run as "python -m gunicorn" by an interpreter without it.
    ctx = gunicorn_ctx(venv, ["--chdir", str(app.root), "-e",
                              f"DATABASE_URL={pg_database.url}", "wsgi:app"], {},
                       program=f"{venv}/bin/python3")
    result = run_probe(ctx, ProbeRequest(), TIMEOUT)
    assert result.ok, result.error
    assert (result.config_source, result.gunicorn_config, result.app_chdir, result.app_uri) == (
        "ExecStart", "", str(app.root), "wsgi:app")
    assert result.versions["gunicorn"] is None
    assert result.urls == {"default": pg_database.url} and result.schema_diff == ()


# -- resolve-only: gunicorn's settings for agentctl exec / upgrade ---------------------------

def test_resolve_only_gives_chdir_pythonpath_and_raw_env_without_importing_the_app(
        make_app: Callable[..., AppDir], flask_venv: Path, app_workspace: Path,
        pg_database: PgDatabase, capfd: pytest.CaptureFixture[str]) -> None:
    from agent.privileged.probe_runner import resolve_gunicorn_config
    from agent.cli.unitexec import plan_exec, run_captured

    # Importing the app would fail: resolve-only must never do it.
    app = make_app(AppSpec(on_import="raise RuntimeError('the app was imported')\n"))
    lib = app_workspace / "lib"
    write_file(lib / "sitelib.py", "VALUE = 1\n")
    conf = write_file(app_workspace / "etc" / "gunicorn.conf.py", (
        f"wsgi_app = 'wsgi:app'\n"
        f"chdir = {str(app.root)!r}\n"
        f"pythonpath = {str(lib)!r}\n"
        f"raw_env = ['DATABASE_URL={pg_database.url}', 'SECRET_KEY=never-shown-1234']\n"
        f"print('config loaded')\n"))
    ctx = gunicorn_ctx(flask_venv, ["-c", str(conf)], {"PYTHONPATH": "/opt/unit"})
    resolved = resolve_gunicorn_config(ctx, TIMEOUT)
    # No time bound: the app's import raises, so an answer without error proves it never ran
    # (and a run cut at TIMEOUT would be an error too).
    assert resolved is not None and resolved.error == "", resolved
    assert (resolved.config_source, resolved.gunicorn_config, resolved.chdir,
            resolved.pythonpath, resolved.app_uri) == (
        "gunicorn config", str(conf), str(app.root), (str(lib),), "wsgi:app")
    assert resolved.raw_env == {"DATABASE_URL": pg_database.url,
                                "SECRET_KEY": "never-shown-1234"}
    shown = repr(resolved) + json.dumps(resolved.as_dict())
    assert "never-shown-1234" not in shown and pg_database.password not in shown

    # The command runs where gunicorn would, with raw_env over the unit's environment.
    plan = plan_exec(ctx, ["sh", "-c", 'pwd; id -un; echo "PYTHONPATH=$PYTHONPATH"; '
                           'test "$DATABASE_URL" = "$EXPECTED" && echo has-url; '
                           'echo "$SECRET_KEY"'], euid=0,
                     extra_env={"EXPECTED": pg_database.url})
    assert "never-shown-1234" not in repr(plan) and pg_database.password not in repr(plan)
    run = run_captured(plan)
    assert run.returncode == 0, run.tail
    assert run.tail == (str(app.root), APP_USER, f"PYTHONPATH={lib}:/opt/unit", "has-url",
                        "****")
    out, err = capfd.readouterr()
    assert "never-shown-1234" not in out + err and pg_database.password not in out + err


def test_resolve_only_broken_config_is_a_scrubbed_one_line_error(
        make_app: Callable[..., AppDir], flask_venv: Path, app_workspace: Path,
        pg_database: PgDatabase) -> None:
    from agent.privileged.probe_runner import resolve_gunicorn_config
    from agent.cli.unitexec import GunicornConfigError, plan_exec

    app = make_app()
    conf = write_file(app_workspace / "etc" / "gunicorn.conf.py", (
        f"chdir = {str(app.root)!r}\n"
        f"raw_env = ['DATABASE_URL={pg_database.url}']\n"
        f"raise ValueError({pg_database.url!r})\n"))
    ctx = gunicorn_ctx(flask_venv, ["-c", str(conf), "wsgi:app"], {})
    resolved = resolve_gunicorn_config(ctx, TIMEOUT)
    assert resolved is not None and resolved.raw_env == {}
    assert resolved.error.startswith(f"gunicorn config {conf} failed: ValueError: ")
    assert resolved.error.endswith(f"(at {conf} line 3)") and "\n" not in resolved.error
    assert pg_database.password not in resolved.error
    with pytest.raises(GunicornConfigError) as err:
        plan_exec(ctx, ["true"], euid=0)
    assert err.value.exit_code == 125 and pg_database.password not in str(err.value)


def test_resolve_only_without_gunicorn_falls_back_to_execstart(
        make_app: Callable[..., AppDir], flask_venv: Path, app_workspace: Path) -> None:
    from agent.privileged.probe_runner import resolve_gunicorn_config
    from agent.cli.unitexec import plan_exec

    app = make_app()
    venv = venv_without_gunicorn(flask_venv, app_workspace)
    ctx = gunicorn_ctx(venv, ["--chdir", str(app.root), "-e", "MODE=blue", "wsgi:app"], {},
                       program=f"{venv}/bin/python3")
    resolved = resolve_gunicorn_config(ctx, TIMEOUT)
    assert resolved is not None and resolved.error == ""
    assert resolved.config_source == "ExecStart" and not resolved.from_gunicorn
    plan = plan_exec(ctx, ["true"], euid=0)
    assert (plan.cwd, plan.env["MODE"], plan.config_source) == (str(app.root), "blue",
                                                               "ExecStart")
