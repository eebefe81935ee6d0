"""agentctl status rows, whole, for each shape a unit's snapshot can take."""

from __future__ import annotations

import io
from typing import Any

import pytest

from agent.cli.render import format_age, render_status, status_rows, unit_state_word
from agent.snapshot import CheckRun, DriftItem, MigrationState, UnitSnapshot

NOW = 10000.0


def d(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = dict(unit="u", timestamp=NOW - 5, unit_up=True)
    base.update(kw)
    return UnitSnapshot(**base).as_dict()


ENV_OK = ("environment", "as the running processes have it")


@pytest.mark.parametrize(("unit", "rows"), [
    (d(unit_up=False, timestamp=0),
     [("state", "?"), ("revision", "unknown"), ("drift", "not compared"),
      ("venv", "none found"), ENV_OK, ("database", "unknown")]),
    (d(active_state="active", main_pid=7),
     [("state", "active (MainPID 7)"), ("revision", "unknown"), ("drift", "not compared"),
      ("venv", "none found"), ENV_OK, ("database", "unknown"), ("last check", "5s ago")]),
    (d(main_pid=7, started_at=NOW - 90000,
       migrations=MigrationState(True, current=("a", "b"), heads=("c",), pending=("c",),
                                 in_progress=True, multiple_heads=True)),
     [("state", "active (MainPID 7, up 1d 1h)"),
      ("revision", "a, b, head c: a migration is running now [multiple heads]"),
      ("drift", "held back while a migration runs"), ("venv", "none found"), ENV_OK, ("database", "unknown"),
      ("last check", "5s ago")]),
    (d(migrations=MigrationState(False), schema_drift=(), needs_daemon_reload=True, db_up=True,
       database="h:1/d"),
     [("state", "active"),
      ("revision", "(none), head (none): up to date [no alembic_version table]"),
      ("drift", "none (schema matches the models)"), ("venv", "none found"),
      ("environment", "as the running processes have it; unit file changed on disk "
                      "(daemon-reload needed)"),
      ("database", "h:1/d, reachable"), ("last check", "5s ago")]),
    (d(migrations=MigrationState(True, current=("c",), heads=("c",)),
       schema_drift=tuple(DriftItem("extra_table", f"t{i}", f"t{i}") for i in range(5)),
       database_mismatch=True, database_connections="10.0.0.9:5432", db_up=False),
     [("state", "active"), ("revision", "c, head c: up to date"),
      ("drift", "5 difference(s): extra_table t0, extra_table t1, extra_table t2, ..."),
      ("venv", "none found"), ENV_OK,
      ("database", "unknown, UNREACHABLE; workers connected elsewhere: 10.0.0.9:5432"),
      ("last check", "5s ago")]),
    (d(schema_drift=tuple(DriftItem("extra_table", f"t{i}", f"t{i}") for i in range(3)),
       migrations=MigrationState(True, current=("a",), heads=("b",), pending=("b",))),
     [("state", "active"), ("revision", "a, head b: 1 pending (b)"),
      ("drift", "3 difference(s): extra_table t0, extra_table t1, extra_table t2"),
      ("venv", "none found"), ENV_OK, ("database", "unknown"), ("last check", "5s ago")]),
])
def test_status_rows(unit: dict[str, Any], rows: list[tuple[str, str]]) -> None:
    assert status_rows(unit, NOW) == rows


@pytest.mark.parametrize(("secs", "text"), [
    (0, "0s"), (59, "59s"), (60, "1m"), (61, "1m 1s"), (3599, "59m 59s"), (3600, "1h"),
    (3660, "1h 1m"), (86399, "23h 59m"), (86400, "1d"), (90000, "1d 1h"), (-3, "0s")])
def test_format_age_boundaries(secs: int, text: str) -> None:
    assert format_age(secs) == text


def test_state_words() -> None:
    assert unit_state_word(d()) == "ok"
    assert unit_state_word(d(checks=(CheckRun("app_load", False, 1.0, "x"),))) == \
        "cannot inspect"


@pytest.mark.parametrize(("data", "first"), [
    ({"units": []}, "from the driftwatch agent on 127.0.0.1:9410\n"),
    ({"units": [], "agent": {"version": "1.2"}, "taken_at": NOW - 61},
     "from the driftwatch agent 1.2 on 127.0.0.1:9410, snapshot taken 1m 1s ago\n"),
])
def test_status_header(data: dict[str, Any], first: str) -> None:
    out = io.StringIO()
    render_status(data, {"kind": "agent", "address": "127.0.0.1:9410"}, out, now=NOW)
    assert out.getvalue() == first


def test_status_errors_and_blocks() -> None:
    out = io.StringIO()
    render_status({"units": [d(checks=(CheckRun("database", False, 1.0, "refused"),))],
                   "errors": ["discovery failed"]},
                  {"kind": "local", "address": "", "reason": "--local given"}, out, now=NOW)
    assert out.getvalue() == (
        "--local given; checked locally\n"
        "error: discovery failed\n"
        "? u - cannot inspect\n"
        "        state: active\n"
        "     revision: unknown\n"
        "        drift: not compared\n"
        "         venv: none found\n"
        "  environment: as the running processes have it\n"
        "     database: unknown\n"
        "   last check: 5s ago\n"
        "               could not run check database: refused\n"
        "     findings: none\n")
