"""agentctl exec and upgrade on a real app under gunicorn.service with a real PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

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
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert s.db.alembic_versions() == ["r3"]
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
