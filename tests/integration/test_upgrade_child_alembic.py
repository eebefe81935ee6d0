"""The upgrade child (agent/asuser/upgrade_child.py) in plain-Alembic mode on real SQLite files:
Alembic's own `alembic upgrade TARGET`, the flock taken on the file env.py's engine opens
before any revision runs, busy_timeout bounding the wait for SQLite's own lock."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli.upgrade import CHILD_SOURCE, LOCKED_EXIT, UPGRADE_LOCK_KEY, child_event
from tests.harness.fastapi_app import FASTAPI_REQUIREMENTS, write_fastapi_app
from tests.harness.postgres import PgDatabase


def run_child(root: Path, url: str, target: str, lock_ms: int = 500,
              python: str = sys.executable) -> subprocess.CompletedProcess[str]:
    """The child as agentctl runs it (python -c SOURCE ...), in the project directory."""
    pytest.importorskip("alembic")
    return subprocess.run(
        [python, "-c", CHILD_SOURCE.read_text(), target, str(lock_ms), "2", "0.1",
         str(UPGRADE_LOCK_KEY), "driftwatch upgrade test", "alembic"],
        cwd=root, capture_output=True, text=True, timeout=120,
        env={"DATABASE_URL": url, "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
             "PYTHONDONTWRITEBYTECODE": "1"})


def events(stdout: str) -> list[dict[str, object]]:
    return [e for e in map(child_event, stdout.splitlines()) if e is not None]


def versions(db: Path) -> list[str]:
    with sqlite3.connect(db) as conn:
        return [r[0] for r in conn.execute("SELECT version_num FROM alembic_version")]


def test_alembic_upgrade_to_the_pinned_revision_under_flock(tmp_path: Path) -> None:
    root = write_fastapi_app(tmp_path / "shop")
    db = root / "app.db"
    first = run_child(root, "sqlite:///app.db", "a1")  # relative: against the app directory
    assert first.returncode == 0, first.stderr
    assert versions(db) == ["a1"]  # pinned: a1, not the head a2
    # The lock is taken when env.py's engine has connected: SQLite has made the file then.
    assert events(first.stdout)[0]["kind"] == "locked_by_us"

    # Someone else (a deploy script's `flock app.db ...`) holds the file: refused, unchanged.
    fd = os.open(db, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        refused = run_child(root, "sqlite:///app.db", "a2")
    finally:
        os.close(fd)
    assert refused.returncode == LOCKED_EXIT, refused.stderr
    locked = events(refused.stdout)[-1]
    assert locked["kind"] == "locked" and locked["path"] == str(db)
    assert [h["pid"] for h in locked["holders"]] == [os.getpid()]  # type: ignore[union-attr]
    assert versions(db) == ["a1"]

    done = run_child(root, "sqlite:///app.db", "a2")
    assert done.returncode == 0, done.stderr
    assert events(done.stdout)[0] == {"kind": "locked_by_us", "path": str(db),
                                      "pid": events(done.stdout)[0]["pid"]}
    assert versions(db) == ["a2"]


HOLD_WRITE_LOCK = """
import sqlite3, sys
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.read()
c.execute("ROLLBACK")
"""


def test_sqlite_write_lock_is_waited_for_at_most_busy_timeout_and_not_retried(
        tmp_path: Path) -> None:
    root = write_fastapi_app(tmp_path / "shop")
    db = root / "app.db"
    assert run_child(root, "sqlite:///app.db", "a1").returncode == 0
    holder = subprocess.Popen([sys.executable, "-c", HOLD_WRITE_LOCK, str(db)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        blocked = run_child(root, "sqlite:///app.db", "a2", lock_ms=300)
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=10)
    assert blocked.returncode != 0
    assert "database is locked" in blocked.stderr
    kinds = [e["kind"] for e in events(blocked.stdout)]
    assert kinds == ["locked_by_us", "sqlite_locked"], blocked.stdout  # once, no retry
    assert versions(db) == ["a1"]


LOCKING_REVISION = """from alembic import op

revision = "a3"
down_revision = "a2"
branch_labels = None
depends_on = None


def upgrade():
    print("lock_timeout=" + op.get_bind().exec_driver_sql("SHOW lock_timeout").scalar(),
          flush=True)
    op.execute("LOCK TABLE items IN ACCESS EXCLUSIVE MODE")


def downgrade():
    pass
"""


@pytest.mark.postgres
def test_plain_alembic_on_postgresql_lock_waits_bounded_and_retried(
        tmp_path: Path, make_venv: object, pg_database: PgDatabase) -> None:
    python = str(make_venv(FASTAPI_REQUIREMENTS) / "bin" / "python")  # type: ignore[operator]
    root = write_fastapi_app(tmp_path / "shop")
    (root / "migrations" / "versions" / "a3_lock.py").write_text(LOCKING_REVISION)
    # options= in the URL replaces PGOPTIONS entirely: the child SETs lock_timeout itself.
    # (no "%" in it: env.py puts it in alembic.ini's ConfigParser, which interpolates "%")
    url = f"{pg_database.url}?options=-csearch_path=public"
    assert run_child(root, url, "a2", python=python).returncode == 0
    assert pg_database.alembic_versions() == ["a2"]

    blocker = pg_database.cluster.connect(pg_database.name, pg_database.owner,
                                          pg_database.password, autocommit=False)
    try:
        blocker.cursor().execute("LOCK TABLE items IN ACCESS SHARE MODE")
        blocked = run_child(root, url, "a3", lock_ms=300, python=python)
    finally:
        blocker.rollback()
        blocker.close()
    print(blocked.stdout)
    assert blocked.returncode != 0
    assert blocked.stdout.count("lock_timeout=300ms") == 3, blocked.stdout  # 1 + 2 retries
    kinds = [e["kind"] for e in events(blocked.stdout)]
    assert kinds == ["locked_by_us", "lock_timeout", "lock_timeout"], kinds
    assert pg_database.alembic_versions() == ["a2"]  # each attempt rolled back whole

    # The same advisory lock as the Flask path: a holder keeps the plain-Alembic upgrade out.
    other = pg_database.cluster.connect(pg_database.name, pg_database.owner,
                                        pg_database.password)
    try:
        other.cursor().execute("SELECT pg_advisory_lock(%s)", (UPGRADE_LOCK_KEY,))
        refused = run_child(root, url, "a3", python=python)
    finally:
        other.close()
    assert refused.returncode == LOCKED_EXIT, refused.stderr
    assert "lock_timeout=" not in refused.stdout  # no revision ran
    assert run_child(root, url, "a3", python=python).returncode == 0
    assert pg_database.alembic_versions() == ["a3"]
