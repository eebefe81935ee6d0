"""agentctl check on a real Flask-Migrate app on SQLite under gunicorn.service (real systemd).

The SQLite files are migrated by `flask db upgrade` as www-data on the host before boot; inside
the sandbox they sit in the overlay's lower layer, and tests change them only through the
running sandbox (Sandbox.path / write_file).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from agent.checks.schema import KINDS
from tests.harness.agent import agentctl
from tests.harness.apps import (
    APP_USER,
    AppDir,
    AppSpec,
    check_ops,
    db_upgrade,
    env_file_text,
    flask_db_check,
    gunicorn_pids,
    gunicorn_unit,
    http_get,
    standard_revisions,
    unit_diagnostics,
    writable_dir,
)
from tests.harness.postgres import free_port
from tests.harness.sandbox import Sandbox

pytestmark = [pytest.mark.systemd]

UNIT = "gunicorn.service"
ENV_FILE = "/etc/site/env"


class SqliteSite:
    """A booted sandbox with the app's unit on a SQLite file in the app's instance folder."""

    def __init__(self, sb: Sandbox, app: AppDir, venv: Path, port: int, folder: Path) -> None:
        self.sb, self.app, self.venv, self.port, self.folder = sb, app, venv, port, folder

    def check(self) -> tuple[int, dict[str, Any]]:
        proc = agentctl(self.sb, "check", UNIT, "--json", "--probe-timeout", "30")
        assert proc.returncode in (0, 1, 2), proc.stderr
        import json
        return proc.returncode, json.loads(proc.stdout)["units"][0]

    def inside(self, name: str) -> Path:
        """A file of the instance folder as the sandbox sees it."""
        return self.sb.path(str(self.folder / name))

    def listing(self) -> dict[str, tuple[int, int, int]]:
        """name -> (inode, size, mtime_ns) of the instance folder inside the sandbox."""
        folder = self.sb.path(str(self.folder))
        return {p.name: (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns)
                for p in sorted(folder.iterdir())}

    def set_url(self, url: str) -> None:
        self.sb.write_file(ENV_FILE, env_file_text({"DATABASE_URL": url}))


@pytest.fixture
def sqlite_site(make_sandbox: Callable[[], Sandbox], make_app: Callable[..., AppDir],
                flask_venv: Path) -> Callable[..., SqliteSite]:
    """sqlite_site(spec, files={name: revision}, url_name="app.db") -> a running SqliteSite."""

    def start(spec: AppSpec | None = None, files: dict[str, str] | None = None,
              url_name: str = "app.db") -> SqliteSite:
        app = make_app(spec)
        folder = writable_dir(app.root / "instance")
        for name, revision in (files if files is not None else {"app.db": "head"}).items():
            db_upgrade(app, flask_venv, f"sqlite:///{folder}/{name}", revision, user=APP_USER)
        port = free_port()
        sb = make_sandbox()
        sb.add_file(ENV_FILE, env_file_text({"DATABASE_URL": f"sqlite:///{folder}/{url_name}"}))
        sb.add_unit(UNIT, gunicorn_unit(venv=flask_venv, app_dir=app, port=port,
                                        environment={"FLASK_APP": "wsgi.py"},
                                        environment_files=[ENV_FILE]))
        sb.boot()
        sb.systemctl("start", UNIT)
        http_get(f"http://127.0.0.1:{port}/healthz", describe=lambda: unit_diagnostics(sb, UNIT))
        gunicorn_pids(sb, UNIT)
        return SqliteSite(sb, app, flask_venv, port, folder)

    return start


def checks(unit: dict[str, Any]) -> list[str]:
    return sorted(f["check"] for f in unit["findings"])


def assert_flask_db_check_agrees(site: SqliteSite, unit: dict[str, Any], name: str) -> None:
    """`flask db check` as www-data on the same file (host side, unchanged by the sandbox)."""
    check = flask_db_check(site.app, site.venv, f"sqlite:///{site.folder}/{name}")
    if check.not_up_to_date:
        assert unit["migrations"]["pending"], check.output
        return
    ops = {kind: op for op, kind in KINDS.items()}
    items = unit["schema_drift"]["items"]
    ours = check_ops([{"kind": ops.get(i["kind"], i["kind"]), "table": i["table"],
                       "name": i["name"]} for i in items])
    assert ours == check.ops, (check.output, items)


def test_pending_revision_on_sqlite(sqlite_site: Callable[..., SqliteSite]) -> None:
    s = sqlite_site(files={"app.db": "r2"})
    before = s.listing()
    code, unit = s.check()
    assert code == 1, unit["findings"]
    assert unit["database"] == f"sqlite:{s.folder}/app.db" and unit["backend"] == "sqlite"
    assert unit["db_up"] is True
    assert unit["migrations"]["current"] == ["r2"] and unit["migrations"]["pending"] == ["r3"]
    assert "pending_migrations" in checks(unit) and "database_unreachable" not in checks(unit)
    assert any("not applicable to SQLite" in n for n in unit["notes"])
    assert "privileges" not in {c["name"] for c in unit["checks"]}
    assert all(c["success"] for c in unit["checks"]), unit["checks"]
    assert s.listing() == before  # not written: same inode, size, mtime; no journal
    assert_flask_db_check_agrees(s, unit, "app.db")
    started = time.monotonic()
    text = agentctl(s.sb, "check", UNIT).stdout
    print(f"agentctl check on SQLite: {time.monotonic() - started:.2f} s\n{text}")
    assert "sqlite" in text and f"sqlite:{s.folder}/app.db" in text
    plan = agentctl(s.sb, "plan", UNIT)
    assert "PostgreSQL-only" in plan.stdout + plan.stderr, (plan.stdout, plan.stderr)
    assert s.listing() == before


def test_drift_at_head_agrees_with_flask_db_check(
        sqlite_site: Callable[..., SqliteSite]) -> None:
    s = sqlite_site(AppSpec(models_at=3, revisions=standard_revisions(2)))
    code, unit = s.check()
    assert unit["migrations"]["pending"] == [] and unit["migrations"]["current"] == ["r2"]
    assert "schema_drift" in checks(unit), unit["findings"]
    assert [(i["kind"], i["table"]) for i in unit["schema_drift"]["items"]] == \
        [("missing_table", "posts")]
    assert_flask_db_check_agrees(s, unit, "app.db")


def test_missing_file_is_named_and_never_created(
        sqlite_site: Callable[..., SqliteSite]) -> None:
    s = sqlite_site(files={"app.db": "head"}, url_name="gone.db")
    code, unit = s.check()
    missing = [f for f in unit["findings"] if f["check"] == "database_file_missing"]
    assert missing and f"{s.folder}/gone.db" in missing[0]["message"], unit["findings"]
    assert missing[0]["severity"] == "critical" and code == 1  # known, not "cannot inspect"
    assert "database_unreachable" not in checks(unit)
    assert not s.inside("gone.db").exists()
    assert sorted(s.listing()) == ["app.db"]


HOLD_LOCK = """
import sqlite3, sys, time
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("BEGIN EXCLUSIVE")
c.execute("CREATE TABLE posts_next (id INTEGER)")
print("locked", flush=True)
sys.stdin.read()
c.execute("ROLLBACK")
"""


@contextmanager
def exclusive(sb: Sandbox, path: Path) -> Iterator[None]:
    """BEGIN EXCLUSIVE on the file (a migration's write lock) by a process inside the
    sandbox as www-data, until the block ends (the overlay keeps host-side locks apart)."""
    holder = subprocess.Popen(
        sb.nsenter_argv(["setpriv", f"--reuid={APP_USER}", f"--regid={APP_USER}",
                         "--clear-groups", "/usr/bin/python3", "-c", HOLD_LOCK, str(path)]),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        yield
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        try:
            holder.wait(timeout=10)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait()


def test_write_lock_held_is_a_migration_in_progress(
        sqlite_site: Callable[..., SqliteSite]) -> None:
    s = sqlite_site(files={"app.db": "r2"})
    with exclusive(s.sb, s.folder / "app.db"):
        code, unit = s.check()
    assert "migration_in_progress" in checks(unit), unit["findings"]
    assert unit["migrations"]["in_progress"] is True
    assert unit["migrations"]["current_readable"] is False
    assert "database_unreachable" not in checks(unit)
    assert "pending_migrations" not in checks(unit)
    assert unit["schema_drift"] is None


def test_workers_hold_another_db_file_than_the_environment_names(
        sqlite_site: Callable[..., SqliteSite]) -> None:
    s = sqlite_site(files={"app.db": "head", "new.db": "r1"})
    for _ in range(4):  # every worker opens app.db (the pool keeps it open)
        http_get(f"http://127.0.0.1:{s.port}/db")
    code, unit = s.check()
    assert "database_mismatch" not in checks(unit), unit["database_connections"]
    s.set_url(f"sqlite:///{s.folder}/new.db")
    code, unit = s.check()
    assert "database_mismatch" in checks(unit), unit["database_connections"]
    assert unit["database_mismatch"] is True
    assert f"sqlite:{s.folder}/app.db" in unit["database_connections"]
    assert unit["database"] == f"sqlite:{s.folder}/new.db"
