"""A sandbox running a real Flask app as gunicorn.service against a real PostgreSQL database."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.harness.agent import agentctl
from tests.harness.apps import (
    AppDir,
    AppSpec,
    check_ops,
    db_upgrade,
    flask_db_check,
    env_file_text,
    gunicorn_pids,
    gunicorn_unit,
    http_get,
    unit_diagnostics,
)
from tests.harness.postgres import PgDatabase, free_port
from tests.harness.sandbox import Sandbox

UNIT = "gunicorn.service"
ENV_FILE = "/etc/site/env"


class Site:
    """A booted sandbox with the app's unit, its venv, port and database."""

    def __init__(self, sb: Sandbox, app: AppDir, venv: Path, port: int, db: PgDatabase) -> None:
        self.sb, self.app, self.venv, self.port, self.db = sb, app, venv, port, db

    def agentctl(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        """agentctl inside the sandbox."""
        return agentctl(self.sb, *args, **kw)

    def check(self, *extra: str) -> tuple[int, dict[str, Any]]:
        """agentctl check --json of the unit: (exit code, the unit's JSON)."""
        proc = self.agentctl("check", UNIT, "--json", "--probe-timeout", "30", *extra)
        assert proc.returncode in (0, 1, 2), proc.stderr
        try:
            data = json.loads(proc.stdout)
        except json.JSONDecodeError:
            raise AssertionError(f"not JSON: {proc.stdout!r} {proc.stderr!r}") from None
        return proc.returncode, data["units"][0]

    def check_text(self) -> subprocess.CompletedProcess[str]:
        """agentctl check of the unit, human form."""
        return self.agentctl("check", UNIT)

    def assert_flask_db_check_agrees(self, unit: dict[str, Any]) -> None:
        """`flask db check` (as www-data, in the app's venv) says what driftwatch said: the
        same drift operations at head, "not up to date" exactly when revisions are pending."""
        from agent.checks.schema import KINDS

        check = flask_db_check(self.app, self.venv, self.db.url)
        pending = (unit["migrations"] or {}).get("pending")
        if check.not_up_to_date:
            assert pending, (check.output, unit["migrations"])
            return
        assert pending == [], (check.output, unit["migrations"])
        ops = {kind: op for op, kind in KINDS.items()}
        items = (unit["schema_drift"] or {}).get("items")
        assert items is not None, unit
        ours = check_ops([{"kind": ops.get(i["kind"], i["kind"]), "table": i["table"],
                           "name": i["name"]} for i in items])
        assert ours == check.ops, (check.output, items)
        assert check.clean is (items == [])

    def set_database_url(self, url: str) -> None:
        """Rewrite the unit's env file (inside the sandbox) to name another database."""
        self.sb.write_file(ENV_FILE, env_file_text({"DATABASE_URL": url}))


SiteFactory = Callable[..., Site]


def site_factory(make_sandbox: Callable[[], Sandbox], make_app: Callable[..., AppDir],
                 flask_venv: Path, pg_database: PgDatabase) -> SiteFactory:
    """start(spec, upgrade_to=..., url=..., start_unit=..., app=...) -> a running Site.

    upgrade_to=None leaves the database empty; url names another database for the unit than
    the one migrated; start_unit=False boots the sandbox without starting the app.
    """

    def start(spec: AppSpec | None = None, upgrade_to: str | None = "head",
              environment: dict[str, str] | None = None,
              extra_files: dict[str, str] | None = None, url: str | None = None,
              start_unit: bool = True, app: AppDir | None = None, **unit_kw: Any) -> Site:
        app = app or make_app(spec)
        if upgrade_to:
            db_upgrade(app, flask_venv, pg_database.url, upgrade_to)
        port = free_port()
        sb = make_sandbox()
        sb.add_file(ENV_FILE, env_file_text({"DATABASE_URL": url or pg_database.url}))
        for path, text in (extra_files or {}).items():
            sb.add_file(path, text)
        env = {"FLASK_APP": "wsgi.py"} if environment is None else environment
        sb.add_unit(UNIT, gunicorn_unit(venv=flask_venv, app_dir=app, port=port,
                                        environment=env, environment_files=[ENV_FILE],
                                        **unit_kw))
        sb.boot()
        if start_unit:
            sb.systemctl("start", UNIT)
            http_get(f"http://127.0.0.1:{port}/healthz",
                     describe=lambda: unit_diagnostics(sb, UNIT))
            gunicorn_pids(sb, UNIT)
        return Site(sb, app, flask_venv, port, pg_database)

    return start
