"""Every exit code of agentctl check, status and context, for every class of finding, run
through agentctl's own main() with literal snapshots and reports (no systemd, no database)."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from agent.cli import main as cli
from agent.checks.unit import UnitFacts, unit_findings
from agent.context import ContextInputs, build_context
from agent.privileged.inspection import UnitReport
from agent.model import ExecCommand, Finding, UnitProperties
from agent.cli.render import ESSENTIAL_CHECKS, exit_code, exit_code_of_dicts, has_problems
from agent.snapshot import CheckRun, Snapshot, UnitSnapshot

UNIT = "gunicorn.service"
ALL_CHECKS = ("unit", "app_load", "connections", "database", "migrations", "schema",
              "privileges", "integrity", "journal")
CRIT = Finding("pending_migrations", "critical", "1 pending", "upgrade")
WARN = Finding("needs_daemon_reload", "warning", "reload", "systemctl daemon-reload")
INFO = Finding("migration_in_progress", "info", "running", "wait")


class NoSystemd:
    """Stands in for the D-Bus source: agentctl only closes it in these tests."""

    def close(self) -> None:
        """Nothing to release."""


def snap(findings: tuple[Finding, ...] = (), failed: tuple[str, ...] = ()) -> UnitSnapshot:
    checks = tuple(CheckRun(name, name not in failed, 0.01, "boom" if name in failed else "")
                   for name in ALL_CHECKS)
    return UnitSnapshot(unit=UNIT, timestamp=1000.0, unit_up=True, checks=checks,
                        findings=findings)


CLASSES: list[tuple[str, tuple[Finding, ...], tuple[str, ...], int]] = [
    ("healthy", (), (), 0),
    ("info only", (INFO,), (), 0),
    ("warning only", (WARN,), (), 1),
    ("critical", (CRIT,), (), 1),
    ("warning and info", (WARN, INFO), (), 1),
    *[(f"{name} could not inspect", (), (name,), 2) for name in ESSENTIAL_CHECKS],
    *[(f"{name} could not inspect, with a critical", (CRIT,), (name,), 2)
      for name in ESSENTIAL_CHECKS],
    # Checks that add detail but without which the unit can still be judged.
    *[(f"{name} failed (non-essential)", (), (name,), 0)
      for name in ALL_CHECKS if name not in ESSENTIAL_CHECKS],
    *[(f"{name} failed (non-essential), with a warning", (WARN,), (name,), 1)
      for name in ALL_CHECKS if name not in ESSENTIAL_CHECKS],
]
IDS = [c[0] for c in CLASSES]


def test_essential_checks_are_the_documented_ones() -> None:
    # README: 2 = the unit, the app, the database or the migration scripts could not be
    # looked at.
    assert set(ESSENTIAL_CHECKS) == {"unit", "app_load", "database", "migrations"}


@pytest.mark.parametrize(("label", "findings", "failed", "code"), CLASSES, ids=IDS)
def test_check_exit_code(monkeypatch: pytest.MonkeyPatch, label: str,
                         findings: tuple[Finding, ...], failed: tuple[str, ...],
                         code: int) -> None:
    monkeypatch.setattr(cli, "local_snapshot",
                        lambda args, systemd, units: Snapshot((snap(findings, failed),)))
    for extra in ([], ["--json"]):
        out = io.StringIO()
        assert cli.main(["check", UNIT, *extra], out=out, systemd=NoSystemd()) == code  # type: ignore[arg-type]
    assert json.loads(out.getvalue())["units"][0]["unit"] == UNIT


@pytest.mark.parametrize(("label", "findings", "failed", "code"), CLASSES, ids=IDS)
def test_status_exit_code(monkeypatch: pytest.MonkeyPatch, label: str,
                          findings: tuple[Finding, ...], failed: tuple[str, ...],
                          code: int) -> None:
    monkeypatch.setattr(cli, "local_snapshot",
                        lambda args, systemd, units: Snapshot((snap(findings, failed),)))
    for extra in ([], ["--json"]):
        out = io.StringIO()
        assert cli.main(["status", UNIT, "--local", *extra], out=out,
                        systemd=NoSystemd()) == code  # type: ignore[arg-type]


@pytest.mark.parametrize(("label", "findings", "failed", "code"), CLASSES, ids=IDS)
def test_status_exit_code_from_the_agent(monkeypatch: pytest.MonkeyPatch, label: str,
                                         findings: tuple[Finding, ...],
                                         failed: tuple[str, ...], code: int) -> None:
    from agent.cli import statusclient

    data = Snapshot((snap(findings, failed),)).as_dict()

    class Reply:
        ok, address, reason = True, "127.0.0.1:9410", ""

    Reply.data = data  # type: ignore[attr-defined]
    monkeypatch.setattr(statusclient, "fetch_status", lambda *a, **k: Reply())
    monkeypatch.setattr(cli, "local_snapshot", lambda *a: pytest.fail("asked locally"))
    out = io.StringIO()
    assert cli.main(["status", UNIT], out=out, systemd=NoSystemd()) == code  # type: ignore[arg-type]
    assert out.getvalue().startswith("from the driftwatch agent")


def test_check_exit_code_is_the_worst_unit(monkeypatch: pytest.MonkeyPatch) -> None:
    units = (snap(), snap((INFO,)), snap((WARN,)), snap((), ("database",)))
    for n, code in ((1, 0), (2, 0), (3, 1), (4, 2)):
        monkeypatch.setattr(cli, "local_snapshot",
                            lambda args, systemd, u, n=n: Snapshot(units[:n]))
        assert cli.main(["check"], out=io.StringIO(), systemd=NoSystemd()) == code  # type: ignore[arg-type]


def test_check_with_only_errors_is_exit_2(monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli, "local_snapshot",
                        lambda args, systemd, units: Snapshot((), errors=("no D-Bus",)))
    assert cli.main(["check"], out=io.StringIO(), systemd=NoSystemd()) == 2  # type: ignore[arg-type]
    assert capsys.readouterr().err == "agentctl: no D-Bus\n"


def test_exit_code_of_snapshots_and_dicts_agree() -> None:
    for _label, findings, failed, code in CLASSES:
        unit = snap(findings, failed)
        assert exit_code([unit]) == code
        assert exit_code_of_dicts([unit.as_dict()]) == code
    assert exit_code([]) == 0


# -- context: the unit findings decide ---------------------------------------------------
def report_with(findings: list[Finding]) -> UnitReport:
    p = UnitProperties(name=UNIT, load_state="loaded", active_state="active",
                       sub_state="running", exec_start=(ExecCommand(
                           "/srv/venv/bin/gunicorn", ("/srv/venv/bin/gunicorn", "wsgi:app")),))
    ctx = build_context(p, ContextInputs(venvs={"/srv/venv": True}))
    return UnitReport(p, ctx, [], findings=findings)


@pytest.mark.parametrize(("findings", "code"), [
    ([], 0), ([INFO], 0), ([WARN], 1), ([CRIT], 1), ([INFO, WARN], 1)])
def test_context_exit_code(monkeypatch: pytest.MonkeyPatch, findings: list[Finding],
                           code: int) -> None:
    monkeypatch.setattr(cli, "inspect_unit", lambda systemd, name: report_with(findings))
    for extra in ([], ["--json"]):
        out = io.StringIO()
        assert cli.main(["context", UNIT, *extra], out=out, systemd=NoSystemd()) == code  # type: ignore[arg-type]
    data: dict[str, Any] = json.loads(out.getvalue())
    assert [f["check"] for f in data["findings"]] == [f.check for f in findings]
    assert has_problems(report_with(findings)) is (code == 1)


def test_context_exit_code_from_real_unit_findings(monkeypatch: pytest.MonkeyPatch) -> None:
    p = UnitProperties(name=UNIT, load_state="loaded", active_state="failed",
                       sub_state="failed", result="exit-code")
    ctx = build_context(p, ContextInputs())
    found = unit_findings(p, ctx, [], UnitFacts(now=0.0))
    monkeypatch.setattr(cli, "inspect_unit",
                        lambda systemd, name: UnitReport(p, ctx, [], findings=found))
    assert cli.main(["context", UNIT], out=io.StringIO(), systemd=NoSystemd()) == 1  # type: ignore[arg-type]
