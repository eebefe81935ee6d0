"""A unit whose ExecStart runs uvicorn directly (a FastAPI app with plain Alembic), real
systemd and a real PostgreSQL: found without being named, inspected like a gunicorn unit,
and upgraded with `alembic upgrade <pinned head>`."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.test_fastapi_alembic import alembic, fastapi_venv  # noqa: F401
from tests.harness.agent import agentctl
from tests.harness.app_fixtures import new_workspace
from tests.harness.apps import (
    APP_USER,
    env_file_text,
    gunicorn_unit,
    http_get,
    unit_diagnostics,
    writable_dir,
)
from tests.harness.fastapi_app import write_fastapi_app
from tests.harness.postgres import PgDatabase, free_port
from tests.harness.sandbox import Sandbox

pytestmark = [pytest.mark.systemd, pytest.mark.postgres]

UNIT = "shop.service"
ENV_FILE = "/etc/shop/env"


def uvicorn_unit(venv: Path, root: Path, port: int) -> str:
    """A realistic shop.service: <venv>/bin/uvicorn shop.main:app, as www-data."""
    text = gunicorn_unit(venv=venv, app_dir=root, port=port, environment={},
                         environment_files=[ENV_FILE], description="FastAPI shop")
    exec_start = (f"ExecStart={venv}/bin/uvicorn shop.main:app --host 127.0.0.1 "
                  f"--port {port} --workers 2 --no-access-log")
    return re.sub(r"^ExecStart=.*$", exec_start, text, flags=re.M)


def test_uvicorn_unit_is_found_checked_and_upgraded_with_alembic(
        make_sandbox: Callable[[], Sandbox], fastapi_venv: Path,  # noqa: F811
        pg_database: PgDatabase) -> None:
    root = write_fastapi_app(new_workspace() / "shop")
    assert alembic(fastapi_venv, root, pg_database.url, "upgrade", "a1").returncode == 0
    port = free_port()
    sb = make_sandbox()
    sb.add_file(ENV_FILE, env_file_text({"DATABASE_URL": pg_database.url}))
    sb.add_unit(UNIT, uvicorn_unit(fastapi_venv, root, port))
    sb.boot()
    sb.systemctl("start", UNIT)
    http_get(f"http://127.0.0.1:{port}/healthz", describe=lambda: unit_diagnostics(sb, UNIT))

    # Not named: found because its ExecStart runs uvicorn.
    proc = agentctl(sb, "check", "--json", "--probe-timeout", "30")
    units = {u["unit"]: u for u in json.loads(proc.stdout)["units"]}
    assert UNIT in units, (list(units), proc.stderr)
    unit = units[UNIT]
    assert unit["app_loaded"] is True and unit["db_up"] is True, unit["findings"]
    assert unit["backend"] == "postgresql"
    assert unit["database"] == f"127.0.0.1:{pg_database.cluster.port}/{pg_database.name}"
    assert unit["migrations"]["current"] == ["a1"] and unit["migrations"]["pending"] == ["a2"]
    assert [(i["kind"], i["table"], i["name"]) for i in unit["schema_drift"]["items"]] == \
        [("missing_column", "items", "price")]
    names = {f["check"] for f in unit["findings"]}
    assert "pending_migrations" in names and "app_load_failed" not in names, unit["findings"]
    assert pg_database.password not in proc.stdout + proc.stderr

    ctx = json.loads(agentctl(sb, "context", UNIT, "--json").stdout)
    assert ctx["app"] == "shop.main:app" and ctx["venv"] == str(fastapi_venv)
    assert len(ctx["processes"]) >= 3, ctx["processes"]  # uvicorn's supervisor + 2 workers

    old_pid = sb.main_pid(UNIT)
    up = agentctl(sb, "upgrade", "shop", "--yes", "--restart", "--probe-timeout", "30")
    print(f"\n$ agentctl upgrade shop --yes --restart\n{up.stdout}{up.stderr}")
    assert up.returncode == 0, up.stdout + up.stderr
    assert "pinned: alembic upgrade a2" in up.stdout
    assert f"Running alembic upgrade a2 as {APP_USER} in {root} (" in up.stdout
    assert pg_database.alembic_versions() == ["a2"]
    assert sb.main_pid(UNIT) not in (0, old_pid)
    proc = agentctl(sb, "check", UNIT, "--json", "--probe-timeout", "30")
    unit = json.loads(proc.stdout)["units"][0]
    assert proc.returncode == 0, unit["findings"]
    assert unit["migrations"]["pending"] == [] and unit["schema_drift"]["count"] == 0


@pytest.mark.systemd
def test_uvicorn_unit_on_sqlite_upgraded_with_alembic_under_flock(
        make_sandbox: Callable[[], Sandbox], fastapi_venv: Path,  # noqa: F811
        ) -> None:
    import os
    import pwd

    root = write_fastapi_app(new_workspace() / "shop")
    data = writable_dir(root / "data")
    db = data / "app.db"
    url = f"sqlite:///{db}"
    assert alembic(fastapi_venv, root, url, "upgrade", "a1").returncode == 0
    www = pwd.getpwnam(APP_USER)
    os.chown(db, www.pw_uid, www.pw_gid)
    port = free_port()
    sb = make_sandbox()
    sb.add_file(ENV_FILE, env_file_text({"DATABASE_URL": url}))
    sb.add_unit(UNIT, uvicorn_unit(fastapi_venv, root, port))
    sb.boot()
    sb.systemctl("start", UNIT)
    http_get(f"http://127.0.0.1:{port}/healthz", describe=lambda: unit_diagnostics(sb, UNIT))

    proc = agentctl(sb, "check", UNIT, "--json", "--probe-timeout", "30")
    unit = json.loads(proc.stdout)["units"][0]
    assert unit["backend"] == "sqlite" and unit["database"] == f"sqlite:{db}", unit
    assert unit["migrations"]["current"] == ["a1"] and unit["migrations"]["pending"] == ["a2"]

    up = agentctl(sb, "upgrade", "shop", "--yes", "--probe-timeout", "30")
    print(f"\n$ agentctl upgrade shop --yes\n{up.stdout}{up.stderr}")
    assert up.returncode == 0, up.stdout + up.stderr
    assert "pinned: alembic upgrade a2" in up.stdout
    assert f"holding the upgrade lock flock({db}) in pid " in up.stdout
    assert f"sqlite:{db} is now at head a2" in up.stdout
    proc = agentctl(sb, "check", UNIT, "--json", "--probe-timeout", "30")
    unit = json.loads(proc.stdout)["units"][0]
    assert unit["migrations"]["pending"] == [] and unit["schema_drift"]["count"] == 0, unit
