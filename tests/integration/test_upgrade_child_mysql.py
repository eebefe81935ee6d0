"""The upgrade child (agent/asuser/upgrade_child.py) on a real MariaDB: `flask db upgrade`
serialised by GET_LOCK('driftwatch-upgrade'), the DDL's metadata-lock wait bounded by
lock_wait_timeout, and never retried (MySQL/MariaDB DDL commits as it goes)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from agent.cli.upgrade import CHILD_SOURCE, LOCKED_EXIT, UPGRADE_LOCK_KEY, child_event
from agent.cli.upgrade import describe_event, describe_holders
from tests.harness.apps import APP_USER, AppDir, AppSpec, Revision, db_upgrade
from tests.harness.mariadb import MariaDatabase

ALTER_USERS = Revision("r4", "r3", upgrade=(
    "op.add_column('users', sa.Column('nickname', sa.String(40)))"))


def run_child(app: AppDir, venv: Path, url: str, target: str,
              lock_ms: int = 1000) -> subprocess.CompletedProcess[str]:
    """The child as agentctl runs it (python -c SOURCE ... flask), in the app directory."""
    return subprocess.run(
        [str(venv / "bin" / "python"), "-c", CHILD_SOURCE.read_text(), target, str(lock_ms),
         "2", "0.1", str(UPGRADE_LOCK_KEY), "driftwatch upgrade test", "flask"],
        cwd=app.root, capture_output=True, text=True, timeout=180,
        env={"DATABASE_URL": url, "FLASK_APP": "wsgi.py", "PYTHONDONTWRITEBYTECODE": "1",
             "PATH": os.environ.get("PATH", "/usr/bin:/bin")})


def events(stdout: str) -> list[dict[str, object]]:
    return [e for e in map(child_event, stdout.splitlines()) if e is not None]


def test_mariadb_upgrade_serialised_by_get_lock_and_waits_bounded_without_retry(
        make_app: Callable[..., AppDir], pymysql_venv: Path,
        maria_database: MariaDatabase) -> None:
    app = make_app(AppSpec().with_revisions(ALTER_USERS))
    url = maria_database.url
    db_upgrade(app, pymysql_venv, url, "r2", user=APP_USER)
    server = maria_database.server

    # Another upgrader (a deploy script) holds the named lock: refused, nothing run.
    other = server.connect(maria_database.name)
    try:
        cur = other.cursor()
        cur.execute("SELECT GET_LOCK('driftwatch-upgrade', 0), CONNECTION_ID()")
        got, holder_id = cur.fetchone()
        assert got == 1
        refused = run_child(app, pymysql_venv, url, "r3")
    finally:
        other.close()
    assert refused.returncode == LOCKED_EXIT, refused.stdout + refused.stderr
    locked = events(refused.stdout)[-1]
    assert locked["kind"] == "locked" and locked["lock"] == "GET_LOCK('driftwatch-upgrade')"
    holders = locked["holders"]
    assert [h["connection"] for h in holders] == [holder_id]  # type: ignore[union-attr]
    assert describe_holders(holders).startswith(f"held by connection {holder_id} (")  # type: ignore[arg-type]
    assert maria_database.alembic_versions() == ["r2"]

    done = run_child(app, pymysql_venv, url, "r3")
    assert done.returncode == 0, done.stdout + done.stderr
    first = events(done.stdout)[0]
    assert first["kind"] == "locked_by_us"
    assert describe_event(first).startswith(
        "holding the upgrade lock GET_LOCK('driftwatch-upgrade') in connection ")
    assert maria_database.alembic_versions() == ["r3"]  # pinned: r3, not the head r4

    # An open transaction that read users holds a metadata lock: r4's ALTER waits at most
    # lock_wait_timeout (1 s, set and read back), fails with 1205, and is not retried.
    blocker = server.connect(maria_database.name)
    try:
        cur = blocker.cursor()
        cur.execute("START TRANSACTION")
        cur.execute("SELECT COUNT(*) FROM users")
        blocked = run_child(app, pymysql_venv, url, "r4", lock_ms=1000)
    finally:
        blocker.rollback()
        blocker.close()
    assert blocked.returncode not in (0, LOCKED_EXIT), blocked.stdout + blocked.stderr
    assert "1205" in blocked.stderr and "Lock wait timeout" in blocked.stderr, blocked.stderr
    assert [e["kind"] for e in events(blocked.stdout)] == ["locked_by_us"]  # no retry
    assert maria_database.alembic_versions() == ["r3"]

    again = run_child(app, pymysql_venv, url, "r4")
    assert again.returncode == 0, again.stdout + again.stderr
    assert maria_database.alembic_versions() == ["r4"]
