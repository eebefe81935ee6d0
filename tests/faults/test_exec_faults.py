"""Faults around agentctl exec/upgrade on a real sandbox systemd: what a command leaves
behind is stopped, with its whole process tree (its own transient scope)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness.agent import AGENTCTL
from tests.harness.apps import AppDir, AppSpec, Revision, broken_revision, db_upgrade
from tests.harness.postgres import PgDatabase
from tests.harness.sandbox import Sandbox
from tests.harness.site import SiteFactory, site_factory

pytestmark = [pytest.mark.systemd, pytest.mark.postgres]

# A daemon that leaves its session and process group (double fork + setsid): only a
# cgroup (the scope) still holds it.
DAEMON = ("import os, time\n"
          "if os.fork() == 0:\n"
          "    os.setsid()\n"
          "    if os.fork() == 0:\n"
          "        os.execvp('sleep', ['sleep', '{marker}'])\n"
          "    os._exit(0)\n"
          "os.wait()\n"
          "print('daemon started', flush=True)\n")


@pytest.fixture
def site(make_sandbox: Callable[[], Sandbox], make_app: Callable[..., AppDir],
         flask_venv: Path, pg_database: PgDatabase) -> SiteFactory:
    """site(spec, upgrade_to=..., **gunicorn_unit options) -> a running Site."""
    return site_factory(make_sandbox, make_app, flask_venv, pg_database)


def sleepers(sb: Sandbox, marker: str) -> list[str]:
    """PIDs of 'sleep MARKER' processes inside the sandbox."""
    proc = sb.run(["pgrep", "-f", f"^sleep {marker}$"], check=False)
    return proc.stdout.split()


def test_exec_daemon_left_behind_is_stopped(site: SiteFactory) -> None:
    s = site()
    marker = "7301"
    started = time.monotonic()
    proc = s.sb.run([AGENTCTL, "exec", "gunicorn", "--", "python", "-c",
                     DAEMON.format(marker=marker)], check=False)
    took = time.monotonic() - started
    left = sleepers(s.sb, marker)
    print(f"\nexec forking a daemon: exit {proc.returncode} in {took:.2f} s; "
          f"{proc.stderr.strip()!r}; sleepers left: {len(left)}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "daemon started\n"
    assert proc.stderr.strip() == "agentctl: stopped 1 process(es) the command left behind"
    assert left == []


def test_exec_tree_and_fds(site: SiteFactory) -> None:
    # The command runs in a session of its own, in its own scope, with fds 0-2 only.
    s = site()
    code = ("import os\n"
            "print(os.getsid(0) == os.getpid(), sorted(int(f) for f in os.listdir("
            "'/proc/self/fd')))\n"
            "print(open('/proc/self/cgroup').read().strip().splitlines()[-1])\n")
    proc = s.sb.run([AGENTCTL, "exec", "gunicorn", "--", "python", "-c", code], check=False)
    print(f"\nexec session/fds/cgroup: {proc.stdout!r}")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "True [0, 1, 2, 3]"  # 3: listdir's own descriptor
    assert "/driftwatch-exec-" in lines[1] and lines[1].endswith(".scope")


def test_upgrade_migration_forking_a_daemon_is_stopped(site: SiteFactory) -> None:
    marker = "7302"
    s = site(AppSpec().with_revisions(Revision("r4", "r3", upgrade=DAEMON.format(
        marker=marker))), upgrade_to="r3")
    proc = s.agentctl("upgrade", "gunicorn", "--yes", "--probe-timeout", "30")
    left = sleepers(s.sb, marker)
    print(f"\nmigration forking a daemon: exit {proc.returncode}; sleepers left: {len(left)}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert left == []
    assert s.db.alembic_versions() == ["r4"]


def test_upgrade_with_a_broken_migration_file_changes_nothing(
        site: SiteFactory, make_app: Callable[..., AppDir], flask_venv: Path,
        pg_database: PgDatabase) -> None:
    # r4 deployed with a syntax error after r3 was applied: nobody can say what the
    # upgrade would do.
    app = make_app()
    db_upgrade(app, flask_venv, pg_database.url, "head")
    broken = broken_revision("r4", "r3")
    app.write(f"migrations/versions/{broken.file_name}", broken.render())
    s = site(upgrade_to=None, app=app)
    started = time.monotonic()
    proc = s.agentctl("upgrade", "gunicorn", "--yes", "--restart", "--probe-timeout", "30")
    took = time.monotonic() - started
    print(f"\nupgrade with a broken migration file: exit {proc.returncode} in {took:.1f} s: "
          f"{proc.stderr.strip()}")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("agentctl: refusing to upgrade gunicorn.service: cannot "
                                  "inspect gunicorn.service")
    assert "r4" in proc.stderr and "SyntaxError" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "Running flask db upgrade" not in proc.stdout
    assert s.db.alembic_versions() == ["r3"]
