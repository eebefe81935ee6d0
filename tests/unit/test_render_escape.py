"""Text the app's user controls reaches root's terminal escaped, never as control sequences."""

from __future__ import annotations

import io
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.context import ContextInputs, build_context
from agent.privileged.inspection import UnitReport
from agent.model import ExecCommand, Finding, UnitProperties
from agent.cli.render import (
    escape_terminal,
    render_check,
    render_context,
    render_findings,
    render_status,
)
from agent.snapshot import CheckRun, DriftItem, MigrationState, Snapshot, UnitSnapshot

HOSTILE = "x\x1b[2J\x1b]0;pwned\x07\r\x08\x9b31m\u202eevil\x00\x7fy"
# Everything a terminal acts on: C0 except the structural newline, DEL, C1, bidi overrides.
RAW_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def assert_clean(text: str) -> None:
    assert not RAW_CONTROL.search(text), repr(text)
    assert "\\x1b[2J" in text  # escaped, still visible to the admin


@pytest.mark.parametrize(("raw", "shown"), [
    ("plain text, 100% fine: psql \\d users", "plain text, 100% fine: psql \\d users"),
    ("\x1b[31mred", "\\x1b[31mred"), ("a\rb", "a\\rb"), ("a\nb", "a\\nb"), ("t\tab", "t\\tab"),
    ("bell\x07", "bell\\a"), ("\x9b", "\\x9b"), ("\x7f", "\\x7f"), ("\u202e", "\\u202e"),
    ("caf\u00e9 \u2713 \u65e5\u672c", "caf\u00e9 \u2713 \u65e5\u672c"),
])
def test_escape_terminal(raw: str, shown: str) -> None:
    assert escape_terminal(raw) == shown


@given(st.text())
def test_escaped_text_has_no_control_characters(text: str) -> None:
    escaped = escape_terminal(text)
    assert not RAW_CONTROL.search(escaped) and "\n" not in escaped
    assert escaped.isprintable()


def test_findings() -> None:
    out = io.StringIO()
    render_findings([Finding("app_load_failed", "critical", HOSTILE, HOSTILE).as_dict()], out)
    assert_clean(out.getvalue())
    assert out.getvalue().count("\n") == 2


def test_context() -> None:
    p = UnitProperties(name="gunicorn.service", load_state="loaded", active_state="active",
                       sub_state="running", fragment_path="/etc/systemd/system/g.service",
                       drop_in_paths=(f"/etc/{HOSTILE}.conf",),
                       working_directory=f"/srv/{HOSTILE}",
                       environment=(f"{HOSTILE}=1",),
                       environment_files=((f"/etc/{HOSTILE}", True),),
                       exec_start=(ExecCommand("/srv/venv/bin/gunicorn", (
                           "/srv/venv/bin/gunicorn", f"{HOSTILE}:app")),))
    ctx = build_context(p, ContextInputs(venvs={"/srv/venv": True}))
    report = UnitReport(p, ctx, [], findings=[Finding("x", "warning", HOSTILE, HOSTILE)])
    out = io.StringIO()
    render_context(report, out)
    assert_clean(out.getvalue())
    assert "  unit file: /etc/systemd/system/g.service\n" in out.getvalue()
    assert "\n                + /etc/x\\x1b[2J" in out.getvalue()  # drop-ins still on own lines


def snapshot_unit() -> UnitSnapshot:
    return UnitSnapshot(
        unit=f"g{HOSTILE}.service", timestamp=1000.0, unit_up=True, database=HOSTILE,
        migrations=MigrationState(True, current=(HOSTILE,), heads=(HOSTILE,),
                                  pending=(HOSTILE,)),
        schema_drift=(DriftItem("missing_table", HOSTILE, HOSTILE),), venv=HOSTILE,
        database_connections=HOSTILE, database_mismatch=True,
        checks=(CheckRun("database", False, 1.0, HOSTILE),),
        findings=(Finding("pending_migrations", "critical", HOSTILE, HOSTILE),))


def test_check() -> None:
    out = io.StringIO()
    render_check([snapshot_unit()], out)
    assert_clean(out.getvalue())


@pytest.mark.parametrize("source", [
    {"kind": "agent", "address": "127.0.0.1:9410"},
    {"kind": "local", "address": "", "reason": HOSTILE}])
def test_status(source: dict[str, str]) -> None:
    data = Snapshot((snapshot_unit(),), taken_at=999.0, errors=(HOSTILE,)).as_dict()
    data["agent"] = {"version": HOSTILE}
    out = io.StringIO()
    render_status(data, source, out, now=1000.0)
    assert_clean(out.getvalue())


def test_agentctl_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.cli import main as cli

    p = UnitProperties(name="gunicorn.service", load_state="loaded", active_state="active",
                       sub_state="running", environment=(f"GREETING={HOSTILE}",),
                       environment_files=((f"/etc/{HOSTILE}", True),))
    ctx = build_context(p, ContextInputs(env_files={f"/etc/{HOSTILE}": b"A=\x1b[2J\n"}))
    report = UnitReport(p, ctx, [], findings=[Finding("env_file_malformed", "warning", HOSTILE)])
    monkeypatch.setattr(cli, "inspect_unit", lambda systemd, name: report)

    class NoSystemd:
        def close(self) -> None:
            """Nothing to release."""

    out = io.StringIO()
    assert cli.main(["env", "gunicorn"], out=out, systemd=NoSystemd()) == 0  # type: ignore[arg-type]
    assert_clean(out.getvalue())


@pytest.mark.parametrize(("raw", "shown"), [
    ("\U000e0001", "\\U000e0001"), ("\U000f0000", "\\U000f0000"), ("\ufeff", "\\ufeff"),
    ("\u00ad", "\\xad"), ("\x00", "\\x00")])
def test_escape_forms_by_code_point(raw: str, shown: str) -> None:
    assert escape_terminal(raw) == shown


def test_unknown_severity_is_marked() -> None:
    out = io.StringIO()
    render_findings([{"check": "x", "severity": "odd", "message": "m", "remedy": ""}], out)
    assert out.getvalue() == "    ? [odd] x: m\n"
