"""A plain Alembic app (FastAPI, alembic.ini + env.py with target_metadata, no Flask) under
gunicorn with uvicorn workers, real systemd and a real PostgreSQL: agentctl check."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.harness.agent import agentctl
from tests.harness.app_fixtures import new_workspace
from tests.harness.apps import (
    APP_USER,
    env_file_text,
    gunicorn_pids,
    gunicorn_unit,
    http_get,
    unit_diagnostics,
)
from tests.harness.fastapi_app import (
    APP_SPEC,
    FASTAPI_REQUIREMENTS,
    WORKER_ARGS,
    write_fastapi_app,
)
from tests.harness.postgres import PgDatabase, free_port
from tests.harness.sandbox import Sandbox

pytestmark = [pytest.mark.systemd, pytest.mark.postgres]

UNIT = "gunicorn.service"
ENV_FILE = "/etc/site/env"


def alembic(venv: Path, root: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The app's own `alembic` CLI in its project directory."""
    proc = subprocess.run([str(venv / "bin" / "alembic"), *args], cwd=root, text=True,
                          capture_output=True, timeout=120,
                          env={"DATABASE_URL": url, "PATH": f"{venv}/bin:/usr/bin:/bin",
                               "PYTHONDONTWRITEBYTECODE": "1", "HOME": str(root)})
    return proc


def run_site(make_sandbox: Callable[[], Sandbox], venv: Path, root: Path,
             url: str, port: int | None = None) -> Sandbox:
    port = port or free_port()
    sb = make_sandbox()
    sb.add_file(ENV_FILE, env_file_text({"DATABASE_URL": url}))
    sb.add_unit(UNIT, gunicorn_unit(venv=venv, app_dir=root, port=port, app_spec=APP_SPEC,
                                    extra_args=WORKER_ARGS, environment={},
                                    environment_files=[ENV_FILE]))
    sb.boot()
    sb.systemctl("start", UNIT)
    http_get(f"http://127.0.0.1:{port}/healthz", describe=lambda: unit_diagnostics(sb, UNIT))
    gunicorn_pids(sb, UNIT)
    return sb


def check(sb: Sandbox) -> tuple[int, dict[str, Any]]:
    proc = agentctl(sb, "check", UNIT, "--json", "--probe-timeout", "30")
    return proc.returncode, json.loads(proc.stdout)["units"][0]


@pytest.fixture
def fastapi_venv(make_venv: Callable[[tuple[str, ...]], Path]) -> Path:
    return make_venv(FASTAPI_REQUIREMENTS)


def test_fastapi_under_uvicorn_workers_pending_and_drift_agree_with_alembic_check(
        make_sandbox: Callable[[], Sandbox], fastapi_venv: Path,
        pg_database: PgDatabase) -> None:
    root = write_fastapi_app(new_workspace() / "shop")
    done = alembic(fastapi_venv, root, pg_database.url, "upgrade", "a1")
    assert done.returncode == 0, done.stderr
    sb = run_site(make_sandbox, fastapi_venv, root, pg_database.url)
    code, unit = check(sb)
    assert code == 1, unit["findings"]
    assert unit["backend"] == "postgresql"
    assert unit["database"] == f"127.0.0.1:{pg_database.cluster.port}/{pg_database.name}"
    assert unit["app_loaded"] is True and unit["db_up"] is True
    assert unit["migrations"]["current"] == ["a1"] and unit["migrations"]["pending"] == ["a2"]
    names = {f["check"] for f in unit["findings"]}
    assert "pending_migrations" in names and "app_load_failed" not in names, unit["findings"]
    # The models are at a2: items.price is missing, as `alembic check` sees it.
    assert [(i["kind"], i["table"], i["name"]) for i in unit["schema_drift"]["items"]] == \
        [("missing_column", "items", "price")]
    assert pg_database.password not in json.dumps(unit)
    said = alembic(fastapi_venv, root, pg_database.url, "check")
    assert said.returncode != 0 and "Target database is not up to date" in said.stdout + said.stderr

    # At head, with a model change no migration carries: both see the same drift.
    assert alembic(fastapi_venv, root, pg_database.url, "upgrade", "head").returncode == 0
    (root / "shop" / "models.py").write_text(
        (root / "shop" / "models.py").read_text().replace(
            "    price = sa.Column(sa.Integer, nullable=True)\n",
            "    price = sa.Column(sa.Integer, nullable=True)\n"
            "    sku = sa.Column(sa.String(20), nullable=True)\n"))
    sb.write_file(str(root / "shop" / "models.py"), (root / "shop" / "models.py").read_text())
    code, unit = check(sb)
    assert unit["migrations"]["pending"] == [], unit["migrations"]
    assert [(i["kind"], i["table"], i["name"]) for i in unit["schema_drift"]["items"]] == \
        [("missing_column", "items", "sku")]
    said = alembic(fastapi_venv, root, pg_database.url, "check")
    assert said.returncode != 0 and "add_column" in said.stderr + said.stdout \
        and "sku" in said.stderr + said.stdout, said.stderr

    # Stamped to base with its tables in place: the remedy names `alembic stamp`, the
    # command this app's admin has (no `flask db` exists here).
    assert alembic(fastapi_venv, root, pg_database.url, "stamp", "base").returncode == 0
    code, unit = check(sb)
    empty = [f for f in unit["findings"] if f["check"] == "version_table_empty"]
    assert len(empty) == 1, unit["findings"]
    assert "`alembic stamp` it (in the app's directory, where alembic.ini is)" in \
        empty[0]["remedy"], empty[0]
    assert not [f for f in unit["findings"] if "flask db" in f["message"] + f["remedy"]], \
        unit["findings"]
    assert APP_USER  # the unit runs as www-data (gunicorn_unit's default)
