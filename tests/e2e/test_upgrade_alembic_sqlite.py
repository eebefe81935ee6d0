"""agentctl upgrade beyond Flask-Migrate on PostgreSQL, on real units in the sandbox: a plain
Alembic app (FastAPI under gunicorn with uvicorn workers) gets `alembic upgrade <pinned
head>` as the unit's user, serialised by the advisory lock; a SQLite app is serialised by
flock on its database file."""

from __future__ import annotations

import re

import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from agent.cli.upgrade import UPGRADE_LOCK_KEY
from tests.e2e.test_fastapi_alembic import alembic, check, fastapi_venv, run_site  # noqa: F401
from tests.e2e.test_sqlite_check import SqliteSite, sqlite_site  # noqa: F401
from tests.harness.agent import AGENTCTL, agentctl
from tests.harness.app_fixtures import new_workspace
from tests.harness.apps import APP_USER, AppSpec, Revision
from tests.harness.fastapi_app import write_fastapi_app
from tests.harness.postgres import PgDatabase
from tests.harness.sandbox import Sandbox

UNIT = "gunicorn.service"


@pytest.mark.postgres
@pytest.mark.systemd
def test_plain_alembic_app_upgrades_with_alembic_to_the_pinned_head(
        make_sandbox: Callable[[], Sandbox], fastapi_venv: Path,  # noqa: F811
        pg_database: PgDatabase) -> None:
    root = write_fastapi_app(new_workspace() / "shop")
    assert alembic(fastapi_venv, root, pg_database.url, "upgrade", "a1").returncode == 0
    sb = run_site(make_sandbox, fastapi_venv, root, pg_database.url)

    # Another upgrader (a deploy script) holds the same advisory lock: refused, unchanged.
    other = pg_database.cluster.connect(pg_database.name, pg_database.owner,
                                        pg_database.password)
    try:
        cur = other.cursor()
        cur.execute("SET application_name = 'deploy-script'")
        cur.execute("SELECT pg_advisory_lock(%s), pg_backend_pid()", (UPGRADE_LOCK_KEY,))
        pid = cur.fetchone()[1]
        refused = agentctl(sb, "upgrade", "gunicorn", "--yes", "--probe-timeout", "30")
    finally:
        other.close()
    print(f"\n$ agentctl upgrade gunicorn --yes   # lock held\n{refused.stdout}{refused.stderr}")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "pinned: alembic upgrade a2" in refused.stdout
    # The preflight reads a plain Alembic app too (it failed on FastAPI's missing app_context).
    assert "app_context" not in refused.stdout + refused.stderr
    assert re.search(r"^  1\. a2  \[(low|medium|high|critical)\]", refused.stdout, re.M), \
        refused.stdout
    assert f"(held by pid {pid} (application_name 'deploy-script'" in refused.stderr
    assert pg_database.alembic_versions() == ["a1"]

    old_pid = sb.main_pid(UNIT)
    proc = agentctl(sb, "upgrade", "gunicorn", "--yes", "--restart", "--probe-timeout", "30")
    print(f"\n$ agentctl upgrade gunicorn --yes --restart\n{proc.stdout}{proc.stderr}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"Running alembic upgrade a2 as {APP_USER} in {root} (" in proc.stdout
    assert "holding the upgrade lock pg_advisory_lock(7239384051653697892)" in proc.stdout
    assert "now at head a2" in proc.stdout
    assert pg_database.password not in proc.stdout + proc.stderr
    assert pg_database.alembic_versions() == ["a2"]
    assert sb.main_pid(UNIT) not in (0, old_pid)
    code, unit = check(sb)
    assert code == 0 and unit["migrations"]["pending"] == [], unit["findings"]


HOLD = """
import fcntl, sys
fd = open(sys.argv[1])
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
"""


@contextmanager
def flocked(sb: Sandbox, path: Path) -> Iterator[int]:
    """flock(path) held by a process inside the sandbox as the app's user (what
    `flock app.db flask db upgrade` in a deploy script does); yields its pid."""
    holder = subprocess.Popen(
        sb.nsenter_argv(["setpriv", f"--reuid={APP_USER}", f"--regid={APP_USER}",
                         "--clear-groups", "/usr/bin/python3", "-c", HOLD, str(path)]),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        pids = sb.run(["pgrep", "-f", "fcntl.LOCK_EX"], check=False).stdout.split()
        yield int(pids[0]) if pids else 0
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        try:
            holder.wait(timeout=10)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait()


READ_VERSIONS = """
import sqlite3, sys
conn = sqlite3.connect("file:%s?mode=ro" % sys.argv[1], uri=True)
print(" ".join(r[0] for r in conn.execute("SELECT version_num FROM alembic_version")))
"""


def versions(s: SqliteSite, name: str = "app.db") -> list[str]:
    """alembic_version of the file, read-only, by a process inside the sandbox."""
    proc = s.sb.run(["/usr/bin/python3", "-c", READ_VERSIONS, str(s.folder / name)])
    return proc.stdout.split()


@pytest.mark.systemd
def test_sqlite_upgrade_is_serialised_by_flock_on_the_database_file(
        sqlite_site: Callable[..., SqliteSite]) -> None:  # noqa: F811
    s = sqlite_site(files={"app.db": "r2"})
    with flocked(s.sb, s.folder / "app.db") as pid:
        refused = agentctl(s.sb, "upgrade", "gunicorn", "--yes", "--probe-timeout", "30")
    print(f"\n$ agentctl upgrade gunicorn --yes   # flock held\n{refused.stdout}"
          f"{refused.stderr}")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert (f"refusing to upgrade gunicorn.service: another upgrade holds the upgrade lock "
            f"on sqlite:{s.folder}/app.db (held by ") in refused.stderr
    if pid:
        assert f"held by pid {pid} (python3)" in refused.stderr
    assert "Running upgrade r2 -> r3" not in refused.stdout
    assert versions(s) == ["r2"]

    proc = agentctl(s.sb, "upgrade", "gunicorn", "--yes", "--probe-timeout", "30")
    print(f"\n$ agentctl upgrade gunicorn --yes\n{proc.stdout}{proc.stderr}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"holding the upgrade lock flock({s.folder}/app.db)" in proc.stdout
    assert "Running upgrade r2 -> r3" in proc.stdout
    assert versions(s) == ["r3"]


GO = "/run/dw-test-go-r4"  # inside the sandbox: root writes it, www-data sees it
STARTED = "/tmp/dw-test-r4-started"  # inside the sandbox: r4 (as www-data) says it runs


@pytest.mark.systemd
def test_two_sqlite_upgrades_at_once_one_is_refused(
        sqlite_site: Callable[..., SqliteSite]) -> None:  # noqa: F811
    # r4 works until the test says go, outside any SQLite transaction (Alembic's SQLite DDL
    # is not transactional): SQLite's own write lock does not keep a second upgrade out then.
    # Online only: the preflight renders r4 offline (upgrade() runs with as_sql), and waiting
    # there made the preflight's probe time out after 30 s on every run.
    slow = Revision("r4", "r3", upgrade=(
        "if not op.get_context().as_sql:\n"
        f"    open({STARTED!r}, 'w').close()\n"
        "    [__import__('time').sleep(0.1) for _ in "
        f"iter(lambda: __import__('os').path.exists({GO!r}), True)]"))
    s = sqlite_site(AppSpec().with_revisions(slow), files={"app.db": "r3"})
    db = str(s.folder / "app.db")
    argv = s.sb.nsenter_argv([AGENTCTL, "upgrade", "gunicorn", "--yes", "--probe-timeout",
                              "30"])
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env)
    try:
        deadline = time.monotonic() + 150  # its checks and preflight come first
        held = False
        # r4 runs only once the upgrade holds the flock: wait for it to say so (polling with
        # `flock -n` took the lock for an instant and once made the first upgrade refuse).
        while time.monotonic() < deadline and not held and first.poll() is None:
            held = s.sb.run(["test", "-e", STARTED], check=False).returncode == 0
            time.sleep(0.1)
        if not held:
            out, err = first.communicate(timeout=120)
            raise AssertionError(f"the first upgrade never reached r4: {out}{err}")
        # flock(1), as a deploy script would use it: refused while the upgrade holds it.
        assert s.sb.run(["flock", "-n", db, "true"], check=False).returncode == 1
        second = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    finally:
        s.sb.write_file(GO, "go\n")
        out, err = first.communicate(timeout=120)
    print(f"\nfirst: exit {first.returncode}; second: exit {second.returncode}: "
          f"{second.stderr.strip()}")
    assert first.returncode == 0, out + err
    assert second.returncode == 1, second.stdout + second.stderr
    assert (f"another upgrade holds the upgrade lock on sqlite:{db} (held by pid "
            in second.stderr)
    assert "Running upgrade r3 -> r4" not in second.stdout
    assert versions(s) == ["r4"]
