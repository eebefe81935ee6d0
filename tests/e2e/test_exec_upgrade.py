"""agentctl exec and upgrade on a real app under gunicorn.service with a real PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.cli.upgrade import UPGRADE_LOCK_KEY
from tests.faults.terminal import INJECTOR, first_line_after
from tests.harness.agent import AGENTCTL
from tests.harness.apps import AppDir, AppSpec, Revision, db_upgrade, two_heads_spec
from tests.harness.postgres import PgDatabase
from tests.harness.sandbox import Sandbox
from tests.harness.site import UNIT, Site, SiteFactory, site_factory

pytestmark = [pytest.mark.systemd, pytest.mark.postgres]


@pytest.fixture
def site(make_sandbox: Callable[[], Sandbox], make_app: Callable[..., AppDir],
         flask_venv: Path, pg_database: PgDatabase) -> SiteFactory:
    """site(spec, upgrade_to=..., **gunicorn_unit options) -> a running Site."""
    return site_factory(make_sandbox, make_app, flask_venv, pg_database)


def run_exec(s: Site, *cmd: str, stdin: str = "") -> tuple[int, str, str]:
    """agentctl exec gunicorn -- CMD inside the sandbox: (exit code, stdout, stderr)."""
    proc = s.sb.run([AGENTCTL, "exec", "gunicorn", "--", *cmd], check=False, input=stdin)
    return proc.returncode, proc.stdout, proc.stderr


# -- exec ---------------------------------------------------------------------------------

def test_exec_runs_in_the_units_exact_context(site: SiteFactory) -> None:
    # No WorkingDirectory=: the app dir comes from gunicorn --chdir alone.
    s = site(chdir=True, working_directory=False)
    assert run_exec(s, "id", "-u") == (0, "33\n", "")
    code, out, _ = run_exec(s, "id", "-G")
    assert code == 0 and "33" in out.split()
    assert run_exec(s, "pwd")[1].strip() == str(s.app.root)
    assert run_exec(s, "which", "python")[1].strip() == f"{s.venv}/bin/python"
    code, out, err = run_exec(s, "env")
    assert code == 0, err
    env = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert env["PATH"].startswith(f"{s.venv}/bin:")
    assert env["DATABASE_URL"] == s.db.url  # the command is the admin's: nothing masked
    assert env["FLASK_APP"] == "wsgi.py" and env["USER"] == "www-data"
    assert "PGOPTIONS" not in env  # exec is the write path: no read-only session
    assert err == ""  # agentctl itself prints nothing, and so no secret


def test_exec_passes_stdin_and_exit_code_through(site: SiteFactory) -> None:
    s = site()
    assert run_exec(s, "cat", stdin="hello\n")[:2] == (0, "hello\n")
    assert run_exec(s, "sh", "-c", "echo oops >&2; exit 7")[0::2] == (7, "oops\n")
    code, out, err = run_exec(s, "no-such-command")
    assert code == 127 and "command not found on the unit's PATH" in err
    code, _, err = run_exec(s, "python", "-c",
                            "import os, sqlalchemy as sa\n"
                            "with sa.create_engine(os.environ['DATABASE_URL']).begin() as c:\n"
                            "    c.execute(sa.text('CREATE TABLE exec_wrote (i int)'))")
    assert code == 0, err  # a write succeeds: no default_transaction_read_only here
    assert s.db.execute("SELECT count(*) FROM exec_wrote")[0][0] == 0


def test_exec_as_non_root_for_another_users_unit(site: SiteFactory) -> None:
    s = site()
    proc = s.agentctl("exec", "gunicorn", "--", "id", "-u", user="nobody", group="nogroup")
    assert proc.returncode == 125
    assert proc.stdout == ""
    assert proc.stderr.strip() == (
        "agentctl: gunicorn.service runs as User=www-data (uid 33) and you are uid 65534: "
        "run agentctl as root (sudo agentctl ...)")


# -- upgrade ------------------------------------------------------------------------------

def test_upgrade_one_pending_with_restart(site: SiteFactory) -> None:
    s = site(upgrade_to="r2")
    old_pid = s.sb.main_pid(UNIT)
    proc = s.agentctl("upgrade", "gunicorn", "--yes", "--restart")
    print(f"\n$ agentctl upgrade gunicorn --yes --restart\n{proc.stdout}{proc.stderr}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert s.db.alembic_versions() == ["r3"]
    assert "holding the upgrade lock pg_advisory_lock(7239384051653697892)" in proc.stdout
    new_pid = s.sb.main_pid(UNIT)
    assert new_pid not in (0, old_pid)
    s.sb.wait_active(UNIT)
    out = proc.stdout
    assert "1. r3" in out and f"database:  127.0.0.1:{s.db.cluster.port}/{s.db.name}" in out
    assert "Running upgrade r2 -> r3" in out
    assert f"restarted, active with MainPID {new_pid} (was {old_pid})" in out
    assert s.db.password not in out + proc.stderr
    code, unit = s.check()
    assert code == 0, unit["findings"]
    # Nothing left: says so, exits 0, restarts nothing.
    again = s.agentctl("upgrade", "gunicorn", "--yes", "--restart")
    assert again.returncode == 0, again.stderr
    assert "nothing to upgrade" in again.stdout and "restarted" not in again.stdout
    assert s.sb.main_pid(UNIT) == new_pid


def test_upgrade_without_yes_and_without_tty_changes_nothing(site: SiteFactory) -> None:
    s = site(upgrade_to="r2")
    old_pid = s.sb.main_pid(UNIT)
    # A "y" on a pipe is not a confirmation: only a terminal is.
    proc = s.sb.run([AGENTCTL, "upgrade", "gunicorn", "--restart"], check=False, input="y\n")
    assert proc.returncode == 2
    assert "1. r3" in proc.stdout  # the plan is still shown
    assert proc.stderr.strip() == ("agentctl: not confirmed: no terminal to ask on; pass --yes "
                                   "to upgrade without asking")
    assert s.db.alembic_versions() == ["r2"]
    assert s.sb.main_pid(UNIT) == old_pid


def test_upgrade_refuses_multiple_heads(site: SiteFactory) -> None:
    s = site(two_heads_spec(), upgrade_to="r3")
    proc = s.agentctl("upgrade", "gunicorn", "--yes")
    assert proc.returncode == 1
    assert "refusing to upgrade gunicorn.service: the deployed code has 2 migration heads " \
           "(r3, r3b)" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert s.db.alembic_versions() == ["r3"]


def test_upgrade_refuses_unknown_revision(site: SiteFactory, make_app: Callable[..., AppDir],
                                          flask_venv: Path, pg_database: PgDatabase) -> None:
    newer = make_app(AppSpec(models_at=4, revisions=AppSpec(models_at=4).revisions + (
        Revision("r4", "r3", upgrade="op.add_column('posts', sa.Column('created_at', "
                                     "sa.DateTime(), nullable=True))"),)), name="newer")
    db_upgrade(newer, flask_venv, pg_database.url, "head")
    s = site(upgrade_to=None)  # the deployed code knows r1..r3; the database is at r4
    proc = s.agentctl("upgrade", "gunicorn", "--yes")
    assert proc.returncode == 1
    assert "is at revision r4, which the deployed code does not know" in proc.stderr
    assert s.db.alembic_versions() == ["r4"]


def test_upgrade_refuses_while_a_migration_runs(site: SiteFactory) -> None:
    s = site(upgrade_to="r2")
    conn = s.db.cluster.connect(s.db.name, s.db.owner, s.db.password, autocommit=False)
    try:
        conn.cursor().execute("LOCK TABLE alembic_version IN ACCESS EXCLUSIVE MODE")
        proc = s.agentctl("upgrade", "gunicorn", "--yes", "--probe-timeout", "30")
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "a migration is already running" in proc.stderr
    finally:
        conn.rollback()
        conn.close()
    assert s.db.alembic_versions() == ["r2"]


def test_failing_migration_stops_with_masked_tail(site: SiteFactory) -> None:
    # r4 prints the URL (with its password) and then fails: the tail is shown, masked.
    failing = Revision("r4", "r3", upgrade="import os\nprint('url', os.environ['DATABASE_URL'])"
                                           "\nop.execute('SELECT 1/0')")
    s = site(AppSpec().with_revisions(failing), upgrade_to="r3")
    old_pid = s.sb.main_pid(UNIT)
    proc = s.agentctl("upgrade", "gunicorn", "--yes", "--restart")
    assert proc.returncode == 2
    assert "agentctl: flask db upgrade exited with status 1" in proc.stderr
    assert "was not restarted" in proc.stderr and "division by zero" in proc.stderr
    assert f"{s.db.owner}:****@127.0.0.1" in proc.stdout + proc.stderr
    assert s.db.password not in proc.stdout + proc.stderr
    assert s.db.alembic_versions() == ["r3"]
    assert s.sb.main_pid(UNIT) == old_pid


def test_upgrade_derives_flask_app_from_the_app_spec(site: SiteFactory) -> None:
    # No FLASK_APP in the unit: flask db upgrade gets the gunicorn spec, wsgi:app.
    s = site(upgrade_to="r2", environment={})
    proc = s.agentctl("upgrade", "gunicorn", "--yes")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert s.db.alembic_versions() == ["r3"]
    assert json.loads(s.agentctl("check", UNIT, "--json").stdout)["units"][0][
        "migrations"]["pending"] == []


# -- never root's terminal (TIOCSTI), under a real pty -------------------------------------

def test_exec_under_a_terminal_injection_reaches_nothing(site: SiteFactory) -> None:
    s = site()
    # The shell on a real pty runs agentctl exec; the command (as www-data) pushes keys.
    first, transcript = first_line_after(s.sb.nsenter_argv(
        [AGENTCTL, "exec", "gunicorn", "--", "python", "-c", INJECTOR]))
    print(f"\nagentctl exec under a pty: the shell's next line was {first!r}\n{transcript}")
    assert "injector 33 " in transcript, transcript  # it ran, as www-data, in a new session
    assert "COMMAND-DONE:0" in transcript
    assert first == "clean", transcript


def test_upgrade_migration_injection_reaches_nothing(site: SiteFactory) -> None:
    s = site(AppSpec().with_revisions(Revision("r4", "r3", upgrade=INJECTOR)), upgrade_to="r3")
    first, transcript = first_line_after(s.sb.nsenter_argv(
        [AGENTCTL, "upgrade", "gunicorn", "--yes", "--probe-timeout", "30"]))
    print(f"\nagentctl upgrade under a pty: the shell's next line was {first!r}\n{transcript}")
    assert "injector 33 " in transcript and "COMMAND-DONE:0" in transcript, transcript
    assert first == "clean", transcript
    assert s.db.alembic_versions() == ["r4"]


# -- upgrades that cannot race ---------------------------------------------------------------

def test_upgrade_to_the_revision_given_only(site: SiteFactory) -> None:
    s = site(upgrade_to="r1")
    proc = s.agentctl("upgrade", "gunicorn", "r2", "--yes")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "target:    r2 (pinned: flask db upgrade r2" in proc.stdout
    assert s.db.alembic_versions() == ["r2"]  # not r3, the head
    proc = s.agentctl("upgrade", "gunicorn", "r9", "--yes")
    assert proc.returncode == 1
    assert "r9 is not a pending revision of gunicorn.service (pending: r3; head r3)" \
        in proc.stderr


def test_upgrade_refused_while_another_holds_the_lock(site: SiteFactory) -> None:
    s = site(upgrade_to="r2")
    other = s.db.cluster.connect(s.db.name, s.db.owner, s.db.password)
    try:
        cur = other.cursor()
        cur.execute("SET application_name = 'deploy-script'")
        cur.execute("SELECT pg_advisory_lock(%s), pg_backend_pid()", (UPGRADE_LOCK_KEY,))
        pid = cur.fetchone()[1]
        proc = s.agentctl("upgrade", "gunicorn", "--yes", "--probe-timeout", "30")
        print(f"\nsecond upgrade: exit {proc.returncode}: {proc.stderr.strip()}")
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert ("refusing to upgrade gunicorn.service: another upgrade holds the upgrade "
                f"lock on 127.0.0.1:{s.db.cluster.port}/{s.db.name} (held by pid {pid} "
                f"(application_name 'deploy-script', user {s.db.owner}, since ") in proc.stderr
        assert s.db.alembic_versions() == ["r2"]
    finally:
        other.close()


def test_two_upgrades_at_once_one_is_refused(site: SiteFactory) -> None:
    # r4 runs until the test releases it (a schema appears; at most 2 min), so the second
    # upgrade surely comes while the first holds the lock, however loaded the machine is.
    slow = Revision("r4", "r3", upgrade=(
        "op.execute(\"DO $$ BEGIN FOR i IN 1..1200 LOOP EXIT WHEN EXISTS (SELECT "
        "FROM pg_namespace WHERE nspname = 'release_r4'); PERFORM pg_sleep(0.1); END LOOP; END $$\")"))
    s = site(AppSpec().with_revisions(slow), upgrade_to="r3")
    argv = s.sb.nsenter_argv([AGENTCTL, "upgrade", "gunicorn", "--yes", "--probe-timeout", "30"])
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env)
    try:
        deadline = time.monotonic() + 60
        holder: list[tuple[Any, ...]] = []
        while time.monotonic() < deadline and not holder:
            holder = s.db.execute("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND "
                                  "granted AND objsubid = 1 AND objid::bigint = %s",
                                  (UPGRADE_LOCK_KEY & 0xFFFFFFFF,))
            time.sleep(0.1)
        assert holder, "the first upgrade never took the lock"
        second = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    finally:
        s.db.execute("CREATE SCHEMA release_r4")
        out, err = first.communicate(timeout=120)
    print(f"\nfirst: exit {first.returncode}; second: exit {second.returncode}: "
          f"{second.stderr.strip()}")
    assert first.returncode == 0, out + err
    assert second.returncode == 1, second.stdout + second.stderr
    assert "refusing to upgrade gunicorn.service" in second.stderr
    assert "Running upgrade r3 -> r4" not in second.stdout
    assert s.db.alembic_versions() == ["r4"]


def test_lock_timeout_reaches_the_migration_despite_options_in_the_url(
        site: SiteFactory, pg_database: PgDatabase) -> None:
    # The app's URL carries options=, which replaces PGOPTIONS entirely in libpq.
    url = f"{pg_database.url}?options=-c%20search_path%3Dpublic"
    waits = Revision("r4", "r3", upgrade=(
        "print('lock_timeout=' + op.get_bind().exec_driver_sql('SHOW lock_timeout').scalar())"
        "\nop.execute('LOCK TABLE posts IN ACCESS EXCLUSIVE MODE')"))
    s = site(AppSpec().with_revisions(waits), upgrade_to="r3", url=url)
    blocker = s.db.cluster.connect(s.db.name, s.db.owner, s.db.password, autocommit=False)
    try:
        blocker.cursor().execute("LOCK TABLE posts IN ACCESS SHARE MODE")
        started = time.monotonic()
        # The bounds from agent.toml this time (the flags override them; unit-tested).
        s.sb.write_file("/etc/dw-test/agent.toml", "[agent]\nupgrade_lock_timeout_seconds = "
                                                   "0.5\nupgrade_lock_retries = 2\n")
        proc = s.agentctl("upgrade", "gunicorn", "--yes", "--probe-timeout", "30",
                          "--config.file", "/etc/dw-test/agent.toml")
        took = time.monotonic() - started
    finally:
        blocker.rollback()
        blocker.close()
    print(proc.stdout)
    print(f"\nlock_timeout 0.5 s x 3 attempts behind a held lock: exit {proc.returncode} "
          f"after {took:.1f} s")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout.count("  | lock_timeout=500ms") == 3, proc.stdout
    assert "attempt 1 of 3 rolled back, retrying in 1.0 s" in proc.stdout
    assert "attempt 2 of 3 rolled back, retrying in 2.0 s" in proc.stdout
    assert "flask db upgrade exited with status 1" in proc.stderr
    assert s.db.alembic_versions() == ["r3"]


def test_upgrade_stopped_at_the_overall_timeout(site: SiteFactory) -> None:
    hangs = Revision("r4", "r3", upgrade="op.execute('SELECT pg_sleep(120)')")
    s = site(AppSpec().with_revisions(hangs), upgrade_to="r3")
    started = time.monotonic()
    proc = s.agentctl("upgrade", "gunicorn", "--yes", "--restart", "--probe-timeout", "30",
                      "--timeout", "4")
    took = time.monotonic() - started
    print(f"\n--timeout 4 on a 120 s migration: exit {proc.returncode} after {took:.1f} s")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "did not finish within 4 s and was stopped" in proc.stderr
    assert took < 60
    assert s.db.alembic_versions() == ["r3"]
    # The migration's backend is gone with it (PostgreSQL rolled it back).
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and s.db.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(120)%' "
            "AND pid <> pg_backend_pid()")[0][0]:
        time.sleep(0.2)
    assert s.db.execute("SELECT count(*) FROM pg_stat_activity WHERE query LIKE "
                        "'%pg_sleep(120)%' AND pid <> pg_backend_pid()")[0][0] == 0
