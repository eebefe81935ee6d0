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
    # The app fails at import, after 3 s: each start is up long enough for a one-shot run to
    # look at it between two automatic restarts (the up phase), as well as in the pause.
    (app.root / "wsgi.py").write_text(
        "import os\nimport time\ntime.sleep(3)\nos.environ['MISSING_SETTING']\n")
    sb = make_sandbox()
    # Restart=always, no start limit: it loops for ever. RestartSec=4 (over the harness's 1):
    # a one-shot agentctl sees the loop in the auto-restart pause, so make the pause most of
    # each cycle (with 1 s the app's own start time dominated on a loaded machine).
    sb.add_unit(UNIT, gunicorn_unit(venv=flask_venv, app_dir=app, port=free_port(),
                                    restart="always",
                                    service="StartLimitIntervalSec=0\nRestartSec=4"))
    sb.boot()
    sb.systemctl("start", UNIT, check=False)
    deadline = time.monotonic() + 90  # a bound for the loop to show, not a timing assertion
    seen: list[list[str]] = []
    up_seen: list[dict[str, Any]] = []
    proc = None
    while time.monotonic() < deadline:
        # Sample in the auto-restart pause, where a one-shot run (no memory of NRestarts) sees
        # the loop: polled, agentctl's own duration could lock onto the "up" phase of the
        # cycle (every sample of a full CI run once showed a healthy unit).
        state, count = sub_state(sb), restarts(sb)
        if state == "auto-restart" and count >= 2 and not (
                seen and "unit_crash_loop" in seen[-1] and proc is not None
                and "unit_crash_loop" in proc.stdout):
            report = agentctl_json(sb, "context", UNIT)
            seen.append(checks(report))
            proc = agentctl(sb, "context", UNIT)
        elif state == "running" and count >= 3 and not up_seen:
            # Up between two automatic restarts (it crashes again in a few seconds): a
            # one-shot run read NRestarts and a young start, and names the loop there too.
            up_report = agentctl_json(sb, "context", UNIT)
            if up_report["sub_state"] == "running":   # read before the next crash
                up_seen.append(up_report)
        if seen and "unit_crash_loop" in seen[-1] and proc is not None \
                and "unit_crash_loop" in proc.stdout and up_seen:
            break
        time.sleep(0.1)
    assert seen and "unit_crash_loop" in seen[-1], seen
    (finding,) = [f for f in report["findings"] if f["check"] == "unit_crash_loop"]
    assert finding["severity"] == "critical"
    assert "is crash-looping" in finding["message"]
    assert "unit_not_active" not in seen[-1]
    # The text form exits 1 when it sees the loop.
    assert proc is not None and proc.returncode == 1, proc
    # Up between two restarts: named as a loop (a one-shot run once saw a healthy unit here).
    assert up_seen, "never sampled the unit up between two automatic restarts"
    (up_finding,) = [f for f in up_seen[0]["findings"] if f["check"] == "unit_crash_loop"] \
        or [None]
    assert up_finding is not None, up_seen[0]["findings"]
    assert "since it was last started by hand" in up_finding["message"], up_finding
    assert "(up between two restarts)" in up_finding["message"], up_finding

    # Fixed and restarted by hand: systemd sets NRestarts to 0, so the young start is no loop.
    sb.write_file(str(app.root / "wsgi.py"),
                  "def app(environ, start_response):\n"
                  "    start_response('200 OK', [])\n    return [b'ok']\n")
    sb.systemctl("restart", UNIT)
    assert restarts(sb) == 0
    fixed = agentctl_json(sb, "context", UNIT)
    assert fixed["sub_state"] == "running", fixed
    assert "unit_crash_loop" not in checks(fixed), fixed["findings"]


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
