"""SQLite apps: the probe and the agent's own session on real files, as the unit's user.

Real Flask-Migrate apps (tests/harness/apps.py) in their own venvs, real SQLite files migrated
by `flask db upgrade` as www-data; the probe and the session child run as www-data.
"""

from __future__ import annotations

import functools
import os
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.privileged.dbclient import user_session
from agent.privileged.probe_runner import ProbeRequest, ProbeResult, run_probe
from agent.privileged.sources import sqlite
from agent.privileged.sources.database import backend_of, db_label
from tests.harness.apps import (
    APP_USER,
    AppDir,
    AppSpec,
    as_user_argv,
    check_ops,
    db_upgrade,
    flask_db_check,
    standard_revisions,
    writable_dir,
)
from tests.integration.test_probe import make_ctx

TIMEOUT = 60.0


def files_of(directory: Path) -> dict[str, tuple[int, int, int]]:
    """name -> (inode, size, mtime_ns) of every file in directory."""
    return {p.name: (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.iterdir())}


def look(app: AppDir, venv: Path, url: str) -> tuple[ProbeResult, sqlite.DatabaseInspection]:
    """What the agent does: the probe, then the session on the URL the probe reported."""
    ctx = make_ctx(app, venv, {"DATABASE_URL": url})
    result = run_probe(ctx, ProbeRequest(), TIMEOUT)
    seen = result.urls.get("default", "")
    return result, sqlite.inspect_sqlite(seen, opener=functools.partial(user_session, ctx))


@pytest.fixture
def instance(make_app: Callable[..., AppDir]) -> tuple[AppDir, Path]:
    """The default app and its instance folder (owned by www-data, empty)."""
    app = make_app()
    return app, writable_dir(app.root / "instance")


def test_pending_revision_read_from_the_file(instance: tuple[AppDir, Path],
                                             flask_venv: Path) -> None:
    app, folder = instance
    url = f"sqlite:///{folder}/app.db"
    db_upgrade(app, flask_venv, url, "r2", user=APP_USER)
    before = files_of(folder)
    result, seen = look(app, flask_venv, url)
    assert result.ok, result.error
    assert result.urls == {"default": url}
    assert seen.reachable, seen.error
    assert seen.label == f"sqlite:{folder}/app.db" == db_label(url)
    assert backend_of(url) == "sqlite"
    assert seen.version.revisions == ("r2",) and not seen.version.locked
    assert not seen.activity.in_progress and seen.schema_fingerprint
    # The models are at r3: the drift is the table r3 would add, read from the file.
    assert check_ops(result.schema_diff or ()) == (("add_table", "posts"),)
    # Never created, never written: same inode, size and mtime, no journal beside it.
    assert files_of(folder) == before == {"app.db": before["app.db"]}


def test_relative_path_resolved_in_the_instance_folder_without_creating_it(
        instance: tuple[AppDir, Path], flask_venv: Path) -> None:
    """Flask-SQLAlchemy 3 takes sqlite:///app.db in the instance folder; the file missing
    there is a finding that names that path, and nothing is created."""
    app, folder = instance
    result, seen = look(app, flask_venv, "sqlite:///app.db")
    assert result.urls == {"default": f"sqlite:///{folder}/app.db"}
    assert not seen.reachable and sqlite.is_missing(seen.error), seen.error
    assert f"{folder}/app.db" in seen.error
    assert list(folder.iterdir()) == []
    assert not (app.root / "app.db").exists()


def test_flask_db_check_and_the_probe_agree_on_drift(make_app: Callable[..., AppDir],
                                                     flask_venv: Path) -> None:
    app = make_app(AppSpec(models_at=3, revisions=standard_revisions(2)))
    folder = writable_dir(app.root / "instance")
    url = f"sqlite:///{folder}/app.db"
    db_upgrade(app, flask_venv, url, "head", user=APP_USER)
    before = files_of(folder)
    result, seen = look(app, flask_venv, url)
    check = flask_db_check(app, flask_venv, url)
    assert not check.not_up_to_date and not check.clean, check.output
    assert check_ops(result.schema_diff or ()) == check.ops == (("add_table", "posts"),)
    assert seen.version.revisions == ("r2",)
    assert files_of(folder) == before


@pytest.fixture
def write_lock(instance: tuple[AppDir, Path], flask_venv: Path) -> Iterator[str]:
    """The app's file at r2 while another connection holds BEGIN EXCLUSIVE (a migration)."""
    app, folder = instance
    url = f"sqlite:///{folder}/app.db"
    db_upgrade(app, flask_venv, url, "r2", user=APP_USER)
    holder = sqlite3.connect(str(folder / "app.db"), isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("CREATE TABLE posts_new (id INTEGER)")
    try:
        yield url
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_a_migration_holding_the_write_lock_is_in_progress(
        instance: tuple[AppDir, Path], flask_venv: Path, write_lock: str) -> None:
    app, _ = instance
    started = time.monotonic()
    result, seen = look(app, flask_venv, write_lock)
    assert seen.reachable, seen.error
    assert seen.version.locked and seen.activity.in_progress
    assert seen.version.revisions == ()
    # The probe's comparison met the lock too: a database error, not an app failure.
    assert result.schema_diff is None and "locked" in (result.schema_diff_error or "")
    print(f"probe + session with the write lock held: {time.monotonic() - started:.2f} s")


def test_the_session_refuses_to_write_even_where_the_file_is_writable(
        instance: tuple[AppDir, Path], flask_venv: Path) -> None:
    app, folder = instance
    url = f"sqlite:///{folder}/app.db"
    db_upgrade(app, flask_venv, url, "r2", user=APP_USER)
    before = files_of(folder)
    ctx = make_ctx(app, flask_venv, {"DATABASE_URL": url})
    with user_session(ctx, url, sqlite.DEFAULT_TIMEOUTS) as conn:
        assert conn.execute("PRAGMA query_only").scalar() == 1
        with pytest.raises(Exception, match="readonly|read-only|query_only"):
            conn.execute("DELETE FROM alembic_version")
        with pytest.raises(Exception, match="readonly|read-only|query_only"):
            conn.execute("PRAGMA query_only = OFF")  # refused: the guard checks each time
            conn.execute("DELETE FROM alembic_version")
    assert files_of(folder) == before
    assert sqlite3.connect(f"file:{folder}/app.db?mode=ro", uri=True).execute(
        "SELECT version_num FROM alembic_version").fetchall() == [("r2",)]


def test_open_databases_names_the_file_a_process_of_the_unit_user_holds(
        instance: tuple[AppDir, Path], flask_venv: Path) -> None:
    app, folder = instance
    db_upgrade(app, flask_venv, f"sqlite:///{folder}/app.db", "r2", user=APP_USER)
    db_upgrade(app, flask_venv, f"sqlite:///{folder}/old.db", "r1", user=APP_USER)
    holder = subprocess.Popen(as_user_argv(APP_USER, [
        "/usr/bin/python3", "-c",
        "import sqlite3, sys, time; c = sqlite3.connect(sys.argv[1]); "
        "c.execute('SELECT 1 FROM alembic_version').fetchall(); print('ok', flush=True); "
        "time.sleep(60)", str(folder / "old.db")]), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ok"
        held, errors = sqlite.open_databases([holder.pid])
        assert errors == []
        assert [f.path for f in held] == [str(folder / "old.db")]
        configured = str(folder / "app.db")
        verdict = sqlite.file_verdict(configured, sqlite.stat_identity(configured), held)
        assert verdict.status == "elsewhere" and verdict.others == (str(folder / "old.db"),)
        same = sqlite.file_verdict(str(folder / "old.db"),
                                   sqlite.stat_identity(str(folder / "old.db")), held)
        assert same.status == "connected"
    finally:
        holder.kill()
        holder.wait()
    assert os.path.exists(folder / "old.db")
