"""A crash-looping unit and a missing ExecStart program, on a real systemd: each named for
what it is (#8 point 8), not as "not active" or "unknown interpreter"."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.harness.agent import agentctl, agentctl_json
from tests.harness.apps import AppDir, gunicorn_unit
from tests.harness.postgres import free_port
from tests.harness.sandbox import Sandbox

pytestmark = pytest.mark.systemd

UNIT = "gunicorn.service"


def checks(report: dict[str, Any]) -> list[str]:
    return [f["check"] for f in report["findings"]]


def sub_state(sb: Sandbox) -> str:
    return sb.systemctl("show", "-p", "SubState", "--value", UNIT).stdout.strip()


def restarts(sb: Sandbox) -> int:
    return int(sb.systemctl("show", "-p", "NRestarts", "--value", UNIT).stdout.strip() or 0)


def test_crash_loop_is_named(make_sandbox: Callable[[], Sandbox],
                             make_app: Callable[..., AppDir], flask_venv: Path) -> None:
    app = make_app()
    (app.root / "wsgi.py").write_text("import os\nos.environ['MISSING_SETTING']\n")
    sb = make_sandbox()
    # Restart=always, no start limit: it loops for ever. RestartSec=4 (over the harness's 1):
    # a one-shot agentctl sees the loop in the auto-restart pause, so make the pause most of
    # each cycle (with 1 s the app's own start time dominated on a loaded machine).
    sb.add_unit(UNIT, gunicorn_unit(venv=flask_venv, app_dir=app, port=free_port(),
                                    restart="always",
                                    service="StartLimitIntervalSec=0\nRestartSec=4"))
    sb.boot()
    sb.systemctl("start", UNIT, check=False)
    deadline = time.monotonic() + 60  # a bound for the loop to show, not a timing assertion
    seen: list[list[str]] = []
    proc = None
    while time.monotonic() < deadline:
        # Sample in the auto-restart pause, where a one-shot run (no memory of NRestarts) sees
        # the loop: polled, agentctl's own duration could lock onto the "up" phase of the
        # cycle (every sample of a full CI run once showed a healthy unit).
        if sub_state(sb) == "auto-restart" and restarts(sb) >= 2:
            report = agentctl_json(sb, "context", UNIT)
            seen.append(checks(report))
            proc = agentctl(sb, "context", UNIT)
            if "unit_crash_loop" in seen[-1] and "unit_crash_loop" in proc.stdout:
                break
        time.sleep(0.1)
    assert seen and "unit_crash_loop" in seen[-1], seen
    (finding,) = [f for f in report["findings"] if f["check"] == "unit_crash_loop"]
    assert finding["severity"] == "critical"
    assert "is crash-looping" in finding["message"]
    assert "unit_not_active" not in seen[-1]
    # The text form exits 1 when it sees the loop.
    assert proc is not None and proc.returncode == 1, proc


def test_missing_exec_start_program_is_named(make_sandbox: Callable[[], Sandbox],
                                             make_app: Callable[..., AppDir]) -> None:
    app = make_app()
    sb = make_sandbox()
    sb.add_unit(UNIT, gunicorn_unit(venv=Path("/srv/removed-venv"), app_dir=app,
                                    port=free_port()))
    sb.boot()
    sb.systemctl("start", UNIT, check=False)
    report = agentctl_json(sb, "context", UNIT)
    assert "exec_start_missing" in checks(report)
    (finding,) = [f for f in report["findings"] if f["check"] == "exec_start_missing"]
    assert finding["severity"] == "critical"
    assert finding["message"].startswith("ExecStart program /srv/removed-venv/bin/gunicorn")
    # agentctl check names the missing program, not an "unknown interpreter".
    proc = agentctl(sb, "check", UNIT, "--json")
    assert proc.returncode in (1, 2), proc.stderr
    assert "exec_start_missing" in proc.stdout
    assert "interpreter is unknown" not in proc.stdout
