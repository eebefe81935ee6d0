"""agentctl's text and JSON forms, whole, for literal reports and snapshots (golden output)."""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator

import pytest

from agent.context import ContextInputs, build_context
from agent.privileged.inspection import UnitReport
from agent.model import ExecCommand, Finding, ProcessInfo, UnitProperties
from agent.cli.render import check_json, not_inspectable, render_check, render_context
from agent.snapshot import CheckRun, DriftItem, MigrationState, UnitSnapshot


@pytest.fixture(autouse=True)
def utc() -> Iterator[None]:
    """render_context shows local time: pin the zone."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    yield
    if old is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = old
    time.tzset()


def full_report() -> UnitReport:
    p = UnitProperties(
        name="gunicorn.service", load_state="loaded", active_state="active",
        sub_state="running", fragment_path="/etc/systemd/system/gunicorn.service",
        drop_in_paths=("/etc/systemd/system/gunicorn.service.d/a.conf", "/run/x.conf"),
        working_directory="!/srv/app", user="www-data", group="web",
        supplementary_groups=("ssl-cert", "adm"), environment=("FLASK_APP=wsgi.py",),
        environment_files=(("/etc/app.env", False), ("/etc/missing.env", True)),
        exec_start=(ExecCommand("/srv/venv/bin/gunicorn",
                                ("/srv/venv/bin/gunicorn", "-w", "2", "wsgi:app")),),
        main_pid=42, exec_main_start_timestamp=86400.0)
    ctx = build_context(p, ContextInputs(
        env_files={"/etc/app.env": b"DATABASE_URL=postgresql://a:pw@h/d\nX=1\n",
                   "/etc/missing.env": None}, venvs={"/srv/venv": True}))
    procs = [ProcessInfo(pid=42, ppid=1, role="master", argv=(), exe="", cwd="/srv/app",
                         create_time=0, username="www-data", venv="/srv/venv"),
             ProcessInfo(pid=43, ppid=42, role="worker", argv=(), exe="", cwd="",
                         create_time=0, username="www-data", venv=None, error="access denied")]
    return UnitReport(p, ctx, procs,
                      findings=[Finding("needs_daemon_reload", "warning", "msg", "fix it")])


def test_context_text_in_full() -> None:
    out = io.StringIO()
    render_context(full_report(), out)
    assert out.getvalue() == """\
● gunicorn.service
         state: active (running) since 1970-01-02 00:00:00
     unit file: /etc/systemd/system/gunicorn.service
                + /etc/systemd/system/gunicorn.service.d/a.conf
                + /run/x.conf
          user: www-data, group web, groups ssl-cert adm
   working dir: /srv/app (optional)
    exec start: /srv/venv/bin/gunicorn -w 2 wsgi:app
           app: wsgi:app
          venv: /srv/venv (ExecStart program path)
        python: /srv/venv/bin/python3
      env file: /etc/app.env: present, 2 variables
      env file: -/etc/missing.env: no such file
   environment: FLASK_APP, DATABASE_URL, X
      main pid: 42
       process: master 42: venv /srv/venv, cwd /srv/app
       process: worker 43: venv ?, cwd ? (access denied)
  findings:
    ! [warning] needs_daemon_reload: msg
        fix: fix it
"""


def test_context_text_of_a_bare_failed_unit() -> None:
    p = UnitProperties(name="g2.service", load_state="loaded", active_state="failed",
                       sub_state="failed", exec_main_start_timestamp=86400.0)
    out = io.StringIO()
    render_context(UnitReport(p, build_context(p, ContextInputs()), []), out)
    assert out.getvalue() == """\
● g2.service
         state: failed (failed)
     unit file: \n          user: root
   working dir: /
    exec start: \n           app: ?
          venv: none found
        python: ?
   environment: (none)
      main pid: -
  findings: none
"""


def units() -> list[UnitSnapshot]:
    return [
        UnitSnapshot(unit="a.service", timestamp=1, unit_up=True, database="h:5432/d",
                     migrations=MigrationState(True, current=("r2",), heads=("r3",),
                                               pending=("r3",)),
                     schema_drift=(DriftItem("missing_table", "t", "t"),), needs_restart=True,
                     checks=(CheckRun("unit", True, 0.5),),
                     findings=(Finding("pending_migrations", "critical", "m", "r"),)),
        UnitSnapshot(unit="bb.service", timestamp=1, unit_up=True,
                     migrations=MigrationState(True, current=("zz",), heads=("r3", "r4"),
                                               unknown=("zz",), multiple_heads=True),
                     schema_drift=(), checks=(CheckRun("database", False, 1.0, "refused"),)),
        UnitSnapshot(unit="c.service", timestamp=1, unit_up=False,
                     migrations=MigrationState(False),
                     checks=(CheckRun("journal", False, 0.1, "no journal"),)),
        UnitSnapshot(unit="d.service", timestamp=1, unit_up=True),
    ]


def test_check_text_in_full() -> None:
    out = io.StringIO()
    render_check(units(), out)
    assert out.getvalue() == """\
UNIT        BACKEND  DATABASE  CURRENT  HEAD   PENDING  DRIFT  RESTART  STATE
a.service   -        h:5432/d  r2       r3     1        1      yes      problems
bb.service  -        -         zz       r3,r4  unknown  0      no       cannot inspect
c.service   -        -         (none)   -      0        ?      no       ok
d.service   -        -         ?        ?      ?        ?      no       ok
a.service: ✗ [critical] pending_migrations: m
    fix: r
bb.service: could not run check database: refused
c.service: could not run check journal: no journal
"""


def test_not_inspectable() -> None:
    assert [not_inspectable(u) for u in units()] == [False, True, False, False]


def test_check_json_in_full() -> None:
    a, _, _, d = units()
    assert check_json(a) == {
        "unit": "a.service", "active_state": "", "database": "h:5432/d", "backend": "",
        "notes": [], "app_loaded": None, "db_up": None,
        "migrations": {"current": ["r2"], "heads": ["r3"], "pending": ["r3"],
                       "multiple_heads": False, "unknown": [], "version_table": True,
                       "in_progress": False, "current_readable": True},
        "schema_drift": {"count": 1, "items": [{"kind": "missing_table", "table": "t",
                                                "name": "t"}]},
        "needs_restart": True, "database_mismatch": None, "database_connections": "",
        "migration_privileges_ok": None,
        "checks": [{"name": "unit", "success": True, "seconds": 0.5, "error": ""}],
        "findings": [{"check": "pending_migrations", "severity": "critical", "message": "m",
                      "remedy": "r"}]}
    assert check_json(d) == {
        "unit": "d.service", "active_state": "", "database": "", "backend": "", "notes": [],
        "app_loaded": None, "db_up": None, "migrations": None, "schema_drift": None, "needs_restart": False,
        "database_mismatch": None, "database_connections": "",
        "migration_privileges_ok": None, "checks": [], "findings": []}
