"""A MySQL app whose server is down: it is tried, so "unreachable" with the right label and
the MySQL remedy, and no password anywhere (a real Flask app with PyMySQL under
gunicorn.service, real systemd). Backends driftwatch does not read keep one honest
`backend_not_inspected` finding (tests/unit/test_mysql_inspector.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness.agent import agentctl
from tests.harness.apps import (
    DEFAULT_REQUIREMENTS,
    AppDir,
    env_file_text,
    gunicorn_pids,
    gunicorn_unit,
    http_get,
    unit_diagnostics,
)
from tests.harness.postgres import free_port
from tests.harness.sandbox import Sandbox

pytestmark = [pytest.mark.systemd]

UNIT = "gunicorn.service"
ENV_FILE = "/etc/site/env"
PYMYSQL_REQUIREMENTS = (*DEFAULT_REQUIREMENTS, "pymysql==1.1.1")


def test_mysql_app_with_its_server_down_is_unreachable_with_the_right_label(
        make_sandbox: Callable[[], Sandbox], make_app: Callable[..., AppDir],
        make_venv: Callable[[tuple[str, ...]], Path]) -> None:
    venv = make_venv(PYMYSQL_REQUIREMENTS)
    app = make_app()
    db_port, port = free_port(), free_port()  # nothing listens on db_port
    url = f"mysql+pymysql://shop:s3cret-pw@127.0.0.1:{db_port}/shop"
    sb = make_sandbox()
    sb.add_file(ENV_FILE, env_file_text({"DATABASE_URL": url}))
    sb.add_unit(UNIT, gunicorn_unit(venv=venv, app_dir=app, port=port,
                                    environment={"FLASK_APP": "wsgi.py"},
                                    environment_files=[ENV_FILE]))
    sb.boot()
    sb.systemctl("start", UNIT)
    http_get(f"http://127.0.0.1:{port}/healthz", describe=lambda: unit_diagnostics(sb, UNIT))
    gunicorn_pids(sb, UNIT)
    proc = agentctl(sb, "check", UNIT, "--json", "--probe-timeout", "30")
    unit = json.loads(proc.stdout)["units"][0]
    found = {f["check"]: f for f in unit["findings"]}
    assert "backend_not_inspected" not in found, unit["findings"]
    assert "database_unreachable" in found, unit["findings"]
    message = found["database_unreachable"]["message"]
    assert f"127.0.0.1:{db_port}/shop" in message and "connection refused" in message.lower()
    assert "MySQL/MariaDB runs" in found["database_unreachable"]["remedy"]
    assert unit["database"] == f"127.0.0.1:{db_port}/shop" and unit["backend"] == "mysql"
    assert unit["db_up"] is False
    assert proc.returncode == 2
    assert "s3cret-pw" not in proc.stdout + proc.stderr
    metrics = agentctl(sb, "check", UNIT).stdout
    assert "mysql" in metrics and "s3cret-pw" not in metrics
