"""Pure parts of agentctl status: the agent's address, ages, exit codes and the rendering."""

from __future__ import annotations

import io
from typing import Any

import pytest

from agent.cli.render import exit_code_of_dicts, format_age, render_status
from agent.snapshot import CheckRun, DriftItem, MigrationState, Snapshot, UnitSnapshot
from agent.model import Finding
from agent.cli.statusclient import client_address, fetch_status, status_url

NOW = 1_700_000_100.0


@pytest.mark.parametrize("listen,expected", [
    (":9410", ("127.0.0.1", 9410)),
    ("0.0.0.0:9410", ("127.0.0.1", 9410)),
    ("[::]:9410", ("::1", 9410)),
    ("[::1]:9411", ("::1", 9411)),
    ("10.0.0.5:9410", ("10.0.0.5", 9410)),
    ("localhost:80", ("localhost", 80)),
])
def test_client_address(listen: str, expected: tuple[str, int]) -> None:
    assert client_address(listen) == expected


@pytest.mark.parametrize("bad", ["9410", "::1:9410", "host:", ":0", ":70000"])
def test_client_address_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        client_address(bad)


def test_status_url_quotes_the_unit() -> None:
    assert status_url("::1", 9410, "app@1.service") == "http://[::1]:9410/status?unit=app%401.service"
    assert status_url("127.0.0.1", 9410) == "http://127.0.0.1:9410/status"


def test_nobody_listening_is_a_reason_not_an_exception() -> None:
    import socket
    with socket.socket() as s:  # bound, never listening: connection refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        reply = fetch_status("127.0.0.1", port, timeout=0.5)
    assert not reply.ok and reply.reason.startswith(f"no agent answers on 127.0.0.1:{port} (")


@pytest.mark.parametrize("secs,text", [(0, "0s"), (59, "59s"), (60, "1m"), (125, "2m 5s"),
                                       (3 * 3600 + 600, "3h 10m"), (2 * 86400 + 4 * 3600, "2d 4h"),
                                       (-5, "0s")])
def test_format_age(secs: float, text: str) -> None:
    assert format_age(secs) == text


def unit_dict(**kw: Any) -> dict[str, Any]:
    fields: dict[str, Any] = dict(
        unit="gunicorn.service", timestamp=NOW - 12, unit_up=True, active_state="active",
        main_pid=4242, started_at=NOW - 3600, database="127.0.0.1:5432/app", db_up=True,
        venv="/srv/venv", checks=(CheckRun("unit", True, 0.01),),
        migrations=MigrationState(True, current=("r2",), heads=("r3",), pending=("r3",)),
        schema_drift=(DriftItem("missing_table", "posts", "posts"),),
        findings=(Finding("pending_migrations", "critical", "1 migration not applied",
                          "agentctl upgrade gunicorn.service --restart"),))
    fields.update(kw)
    return UnitSnapshot(**fields).as_dict()


def test_exit_codes_from_dicts() -> None:
    assert exit_code_of_dicts([unit_dict()]) == 1
    assert exit_code_of_dicts([unit_dict(findings=())]) == 0
    assert exit_code_of_dicts([unit_dict(findings=(Finding("x", "info", "m"),))]) == 0
    broken = unit_dict(checks=(CheckRun("database", False, 1.0, "refused"),))
    assert exit_code_of_dicts([unit_dict(findings=()), broken]) == 2
    # a failed non-essential check (journal) does not make it "could not inspect"
    assert exit_code_of_dicts([unit_dict(findings=(), checks=(
        CheckRun("journal", False, 0, "no journal"),))]) == 0


def test_render_from_the_agent() -> None:
    data = Snapshot((), taken_at=NOW - 3).as_dict()
    data["units"] = [unit_dict()]
    data["agent"] = {"version": "0.1.0"}
    out = io.StringIO()
    render_status(data, {"kind": "agent", "address": "127.0.0.1:9410"}, out, now=NOW)
    assert out.getvalue() == (
        "from the driftwatch agent 0.1.0 on 127.0.0.1:9410, snapshot taken 3s ago\n"
        "✗ gunicorn.service - problems\n"
        "        state: active (MainPID 4242, up 1h)\n"
        "     revision: r2, head r3: 1 pending (r3)\n"
        "        drift: 1 difference(s): missing_table posts\n"
        "         venv: /srv/venv\n"
        "  environment: as the running processes have it\n"
        "     database: 127.0.0.1:5432/app, reachable\n"
        "   last check: 12s ago\n"
        "     findings: 1\n"
        "    ✗ [critical] pending_migrations: 1 migration not applied\n"
        "        fix: agentctl upgrade gunicorn.service --restart\n")


def test_render_local_fallback_and_odd_states() -> None:
    unit = unit_dict(findings=(), schema_drift=None, stale_environment_variables=2,
                     needs_restart=True, db_up=False, venv_mismatch=True,
                     migrations=MigrationState(True, current=("r9",), heads=("r3",),
                                               unknown=("r9",)),
                     checks=(CheckRun("database", False, 1.0, "connection refused"),))
    out = io.StringIO()
    render_status({"units": [unit]}, {"kind": "local", "address": "127.0.0.1:9410",
                                      "reason": "no agent answers on 127.0.0.1:9410 (refused)"},
                  out, now=NOW)
    text = out.getvalue()
    assert text.startswith("no agent answers on 127.0.0.1:9410 (refused); checked locally\n"
                           "? gunicorn.service - cannot inspect\n")
    assert "revision: r9, head r3: unknown to the code: r9" in text
    assert "drift: not compared" in text
    assert "venv: /srv/venv (the running processes use another)" in text
    assert "environment: 2 variable(s) changed since the processes started; restart needed" \
        in text
    assert "database: 127.0.0.1:5432/app, UNREACHABLE" in text
    assert "could not run check database: connection refused" in text
    assert "findings: none" in text
