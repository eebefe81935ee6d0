"""agentctl upgrade for plain Alembic apps and SQLite: which tool runs, and the child's
SQLite lock (flock on the file, real /proc/locks, real sqlite3)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from agent.asuser import upgrade_child as child
from agent.snapshot import MigrationState, UnitSnapshot
from agent.cli.upgrade import (
    ALEMBIC_TOOL,
    CHILD_SOURCE,
    FLASK_TOOL,
    LOCKED_EXIT,
    decide,
    describe_event,
    describe_holders,
    render_plan,
    stopped_note,
    upgrade_tool,
)

AT_A1 = MigrationState(True, current=("a1",), heads=("a2",), pending=("a2",))


def test_plain_alembic_gets_alembic_upgrade_unless_flask_app_is_named() -> None:
    assert upgrade_tool(True, {}) == ALEMBIC_TOOL
    assert upgrade_tool(True, {"FLASK_APP": "wsgi.py"}) == FLASK_TOOL
    assert upgrade_tool(False, {}) == FLASK_TOOL
    assert upgrade_tool(False, {"FLASK_APP": ""}) == FLASK_TOOL


def test_plan_names_the_tool_and_the_pinned_target() -> None:
    unit = UnitSnapshot(unit="shop.service", timestamp=0.0, unit_up=True,
                        database="sqlite:/srv/shop/app.db", migrations=AT_A1)
    text = render_plan(unit, decide(unit), restart=False, tool=ALEMBIC_TOOL)
    assert "  target:    a2 (pinned: alembic upgrade a2; refused if the revisions change " \
           "before it runs)\n" in text


def test_sqlite_holders_and_events_read_plainly() -> None:
    assert describe_holders([{"pid": 42, "command": "flock"}]) == "held by pid 42 (flock)"
    assert describe_event({"kind": "locked_by_us", "path": "/srv/app.db", "pid": 7}) == \
        "holding the upgrade lock flock(/srv/app.db) in pid 7"
    assert "not retried" in describe_event({"kind": "sqlite_locked", "wait_ms": 500})
    assert "not undone" in stopped_note("sqlite")
    assert "rolls back" in stopped_note("postgresql")


def test_sqlite_file_as_sqlite3_resolves_it() -> None:
    assert child.sqlite_file(make_url("sqlite:////srv/a.db"), "/x") == "/srv/a.db"
    assert child.sqlite_file(make_url("sqlite:///rel/a.db"), "/srv/app") == "/srv/app/rel/a.db"
    assert child.sqlite_file(make_url("sqlite:///file:/srv/a.db?mode=ro&uri=true"), "/") == \
        "/srv/a.db"
    assert child.sqlite_file(make_url("sqlite://"), "/srv") == ""
    assert child.sqlite_file(make_url("sqlite:///:memory:"), "/srv") == ""


def test_busy_timeout_is_set_and_read_back() -> None:
    conn = sqlite3.connect(":memory:")
    child.bound_sqlite_waits(conn, 750)
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 750


def test_database_is_locked_is_recognised_through_wrappers() -> None:
    wrapped = RuntimeError("sqlalchemy said")
    wrapped.__cause__ = sqlite3.OperationalError("database is locked")
    assert child.is_sqlite_locked(wrapped)
    assert not child.is_sqlite_locked(sqlite3.OperationalError("no such table: x"))


HOLD = """
import fcntl, sys
fd = open(sys.argv[1])
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
"""


def test_a_second_upgrader_is_refused_and_told_who_holds_the_file(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    sqlite3.connect(db).execute("CREATE TABLE t (i int)")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(db)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        holders = child.flock_holders(os.stat(db))
        assert [h["pid"] for h in holders] == [holder.pid]
        assert str(holders[0]["command"]).startswith("python")
        # The child itself, as agentctl runs it: refused with the holder, exit EX_TEMPFAIL.
        code = ("import sys; sys.argv = ['x']\n" + CHILD_SOURCE.read_text().replace(
            'if __name__ == "__main__":\n    main(sys.argv[1:])', "") +
            f"\ntake_file_lock({str(db)!r})\n")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=30)
        assert done.returncode == LOCKED_EXIT, done.stderr
        event = child_events(done.stdout)[-1]
        assert event["kind"] == "locked" and event["path"] == str(db)
        assert event["holders"][0]["pid"] == holder.pid
        # Meanwhile SQLite in another process reads and writes the file: its fcntl locks
        # and the flock are separate on a local filesystem.
        with sqlite3.connect(db, timeout=0.1) as conn:
            conn.execute("INSERT INTO t VALUES (1)")
        assert sqlite3.connect(db).execute("SELECT count(*) FROM t").fetchone() == (1,)
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=10)


def child_events(stdout: str) -> list[dict[str, object]]:
    from agent.cli.upgrade import child_event
    return [e for e in map(child_event, stdout.splitlines()) if e is not None]


def test_missing_file_takes_no_lock(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert child.take_file_lock(str(tmp_path / "new.db")) is None
    assert "does not exist yet" in capsys.readouterr().out


def test_mysql_lock_holders_and_events_are_named() -> None:
    from agent.cli.upgrade import describe_event, describe_holders, stopped_note

    assert describe_holders([{"connection": 8, "user": "deploy", "host": "10.0.0.5:4242",
                              "seconds": 12}]) == \
        "held by connection 8 (user deploy, host 10.0.0.5:4242, for 12 s)"
    assert describe_holders([{"connection": 9}]) == \
        "held by connection 9 (another user's: its details need the PROCESS privilege)"
    assert describe_event({"kind": "locked_by_us", "lock": "GET_LOCK('driftwatch-upgrade')",
                           "pid": 31}) == \
        "holding the upgrade lock GET_LOCK('driftwatch-upgrade') in connection 31"
    assert "half_applied_revision" in stopped_note("mysql")
    assert stopped_note("postgresql") == "PostgreSQL rolls back its open transaction"
