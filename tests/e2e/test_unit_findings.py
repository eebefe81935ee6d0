"""Each unit finding on a real gunicorn.service running a real Flask app in a real systemd."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.harness.agent import agentctl, agentctl_json
from tests.harness.apps import (
    AppDir,
    env_file_text,
    gunicorn_pids,
    gunicorn_unit,
    http_get,
    unit_diagnostics,
)
from tests.harness.postgres import free_port
from tests.harness.sandbox import Sandbox

pytestmark = pytest.mark.systemd

UNIT = "gunicorn.service"
ENV_FILE = "/etc/site/env"
# Never reached: these tests are about the unit, not the database.
DB_URL = "postgresql://site:hunter2@127.0.0.1:1/site"


def findings(report: dict[str, Any]) -> list[str]:
    return [f["check"] for f in report["findings"]]


class Running:
    """A booted sandbox running the test app under gunicorn.service."""

    def __init__(self, sb: Sandbox, app: AppDir, venv: Path, port: int) -> None:
        self.sb, self.app, self.venv, self.port = sb, app, venv, port

    def context(self) -> dict[str, Any]:
        return agentctl_json(self.sb, "context", UNIT)

    def wait_serving(self) -> None:
        http_get(f"http://127.0.0.1:{self.port}/healthz",
                 describe=lambda: unit_diagnostics(self.sb, UNIT))
        gunicorn_pids(self.sb, UNIT, workers=2)


@pytest.fixture
def start_app(make_sandbox: Callable[[], Sandbox], make_app: Callable[..., AppDir],
              flask_venv: Path) -> Callable[..., Running]:
    """start_app(**unit_options) boots a sandbox with the app's gunicorn.service running."""

    def start(working_directory: Path | str | bool = True, app: AppDir | None = None,
              **options: Any) -> Running:
        app = app or make_app()
        port = free_port()
        sb = make_sandbox()
        sb.add_file(ENV_FILE, env_file_text({"DATABASE_URL": DB_URL, "GREETING": "hello"}))
        sb.add_unit(UNIT, gunicorn_unit(venv=flask_venv, app_dir=app, port=port,
                                        environment={"FLASK_APP": "wsgi.py"},
                                        environment_files=[ENV_FILE],
                                        working_directory=working_directory, **options))
        sb.boot()
        sb.systemctl("start", UNIT)
        running = Running(sb, app, flask_venv, port)
        running.wait_serving()
        return running

    return start


def test_healthy_unit_has_no_findings(start_app: Callable[..., Running]) -> None:
    run = start_app()
    report = run.context()
    assert findings(report) == []
    assert report["venv"] == str(run.venv)
    assert report["user"] == "www-data"
    assert report["working_directory"] == str(run.app.root)
    assert [p["role"] for p in report["processes"]].count("worker") == 2
    assert {p["venv"] for p in report["processes"]} == {str(run.venv)}
    assert {p["cwd"] for p in report["processes"]} == {str(run.app.root)}
    assert agentctl(run.sb, "context", UNIT).returncode == 0


def test_env_file_edited_after_start_is_a_stale_environment(
        start_app: Callable[..., Running]) -> None:
    run = start_app()
    run.sb.write_file(ENV_FILE, env_file_text(
        {"DATABASE_URL": "postgresql://site:newsecret@127.0.0.1:2/other", "GREETING": "hello",
         "FEATURE_X": "on"}))
    report = run.context()
    assert findings(report) == ["environment_stale"]
    message = report["findings"][0]["message"]
    assert "changed: DATABASE_URL" in message and "new in the unit: FEATURE_X" in message
    assert "newsecret" not in str(report) and "hunter2" not in str(report)
    run.sb.systemctl("restart", UNIT)
    run.wait_serving()
    assert findings(run.context()) == []


def test_exec_start_edited_and_reloaded_without_restart_is_a_venv_mismatch(
        start_app: Callable[..., Running]) -> None:
    run = start_app()
    # A second venv at a new path: what a deploy that builds a fresh venv per release does.
    new_venv = run.app.root / "venv-next"
    shutil.copytree(run.venv, run.sb.path(str(new_venv)), symlinks=True)
    unit_path = f"/etc/systemd/system/{UNIT}"
    text = run.sb.path(unit_path).read_text().replace(f"{run.venv}/bin/gunicorn",
                                                      f"{new_venv}/bin/gunicorn")
    run.sb.write_file(unit_path, text)
    assert "needs_daemon_reload" in findings(run.context())
    run.sb.systemctl("daemon-reload")
    report = run.context()
    assert findings(report) == ["venv_mismatch"]
    assert report["venv"] == str(new_venv)
    assert str(run.venv) in report["findings"][0]["message"]


def test_switched_current_symlink_is_a_stale_cwd(start_app: Callable[..., Running],
                                                 make_app: Callable[..., AppDir]) -> None:
    first = make_app(name="releases/1")
    second = make_app(name="releases/2")
    current = first.root.parent.parent / "current"
    current.symlink_to(first.root)
    run = start_app(working_directory=str(current), app=first)
    assert findings(run.context()) == []
    # Switch inside the sandbox's overlay (the host's lower layer must not change under it).
    switched = run.sb.path(str(current.with_name("current.new")))
    switched.symlink_to(second.root)
    os.replace(switched, run.sb.path(str(current)))  # atomic switch, as deploy tools do it
    report = run.context()
    assert findings(report) == ["cwd_stale"]
    assert str(first.root) in report["findings"][0]["message"]
    assert str(second.root) in report["findings"][0]["message"]


def test_migration_touched_after_start_means_old_code(start_app: Callable[..., Running]) -> None:
    run = start_app()
    time.sleep(1.2)  # mtime resolution vs the process start time
    newest = run.app.revision_file("r3")
    now = time.time() + 2
    os.utime(run.sb.path(str(newest)), (now, now))
    report = run.context()
    assert findings(report) == ["code_newer_than_process"]
    assert newest.name in report["findings"][0]["message"]


def test_unit_file_edited_without_daemon_reload(start_app: Callable[..., Running]) -> None:
    run = start_app()
    unit_path = f"/etc/systemd/system/{UNIT}"
    run.sb.write_file(unit_path, run.sb.path(unit_path).read_text() + "# edited\n")
    assert findings(run.context()) == ["needs_daemon_reload"]


def test_removed_env_file_will_break_the_next_start(start_app: Callable[..., Running]) -> None:
    run = start_app()
    run.sb.path(ENV_FILE).unlink()
    report = run.context()
    assert "env_file_missing" in findings(report)
    assert "environment_stale" in findings(report)  # DATABASE_URL is gone from the unit


def test_failing_and_stopped_units(start_app: Callable[..., Running],
                                   make_app: Callable[..., AppDir]) -> None:
    run = start_app()
    run.sb.systemctl("stop", UNIT)
    assert findings(run.context()) == ["unit_not_active"]
    # Break the app: gunicorn exits at boot because the module cannot be imported.
    run.sb.write_file(str(run.app.root / "wsgi.py"), "import os\nos.environ['MISSING_SETTING']\n")
    run.sb.systemctl("start", UNIT, check=False)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if run.sb.systemctl("is-failed", UNIT, check=False).stdout.strip() == "failed":
            break
        time.sleep(0.1)
    report = run.context()
    assert findings(report) == ["unit_failed"]
    assert agentctl(run.sb, "context", UNIT).returncode == 1


@pytest.mark.parametrize("launcher,chdir,app_spec", [
    ("python-m", False, "wsgi:app"),
    ("sh-c", True, "wsgi:app"),
    ("sh-activate", False, "app:create_app()"),
])
def test_every_launcher_resolves_the_same_venv(start_app: Callable[..., Running], launcher: str,
                                               chdir: bool, app_spec: str) -> None:
    run = start_app(launcher=launcher, chdir=chdir, app_spec=app_spec,
                    working_directory=not chdir)
    report = run.context()
    assert findings(report) == [], report["findings"]
    assert report["venv"] == str(run.venv)
    assert report["app"] == app_spec
    assert {p["venv"] for p in report["processes"]} == {str(run.venv)}
    if chdir:
        assert report["chdir"] == str(run.app.root)
