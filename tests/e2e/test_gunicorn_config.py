"""A real gunicorn.service whose app, chdir and DATABASE_URL live only in a gunicorn.conf.py."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness.agent import agent_python, agentctl
from tests.harness.apps import (
    AppDir,
    db_upgrade,
    gunicorn_pids,
    gunicorn_unit,
    http_get,
    unit_diagnostics,
)
from tests.harness.postgres import PgDatabase, free_port
from tests.harness.sandbox import Sandbox

pytestmark = [pytest.mark.systemd, pytest.mark.postgres]

UNIT = "gunicorn.service"
CONF = "/etc/site/gunicorn.conf.py"

PROBE = """
import json
from agent.privileged.inspection import inspect_unit
from agent.privileged.probe_runner import ProbeRequest, run_probe
from agent.privileged.sources.systemd import SystemdSource
ctx = inspect_unit(SystemdSource(), "gunicorn.service").context
print(json.dumps(run_probe(ctx, ProbeRequest(), 30).as_dict()))
"""


def test_app_and_database_only_in_a_gunicorn_config_file(
        make_sandbox: Callable[[], Sandbox], make_app: Callable[..., AppDir],
        flask_venv: Path, pg_database: PgDatabase) -> None:
    app = make_app()
    db_upgrade(app, flask_venv, pg_database.url, "r2")  # r3 is pending
    port = free_port()
    sb = make_sandbox()
    sb.add_file(CONF, (f"wsgi_app = 'wsgi:app'\n"
                       f"chdir = {str(app.root)!r}\n"
                       f"raw_env = ['DATABASE_URL={pg_database.url}']\n"))
    # No WorkingDirectory=, no Environment=, no EnvironmentFile=, no app on the command
    # line: ExecStart=<venv>/bin/gunicorn --workers 2 --bind ... -c /etc/site/gunicorn.conf.py
    sb.add_unit(UNIT, gunicorn_unit(venv=flask_venv, app_dir=app, port=port,
                                    working_directory=False, environment={},
                                    extra_args=["-c"], app_spec=CONF))
    sb.boot()
    sb.systemctl("start", UNIT)
    # The real gunicorn starts with that config: the file is valid and complete.
    assert http_get(f"http://127.0.0.1:{port}/healthz",
                    describe=lambda: unit_diagnostics(sb, UNIT))[0] == 200
    gunicorn_pids(sb, UNIT)
    assert "DATABASE_URL" not in sb.systemctl("show", UNIT, "-p", "Environment").stdout

    proc = agentctl(sb, "check", "gunicorn", "--json", "--probe-timeout", "30")
    assert proc.returncode == 1, proc.stderr
    unit = json.loads(proc.stdout)["units"][0]
    assert unit["database"] == f"127.0.0.1:{pg_database.cluster.port}/{pg_database.name}"
    assert unit["migrations"]["current"] == ["r2"]
    assert unit["migrations"]["pending"] == ["r3"]
    findings = {f["check"] for f in unit["findings"]}
    assert "pending_migrations" in findings and "app_load_failed" not in findings
    # The workers run in the config file's chdir, which is where gunicorn was told to go.
    assert "cwd_stale" not in findings, unit["findings"]
    assert pg_database.password not in proc.stdout

    result = agent_python(sb, PROBE)
    assert (result["config_source"], result["gunicorn_config"], result["app_chdir"],
            result["app_uri"], result["raw_env_names"]) == (
        "gunicorn config", CONF, str(app.root), "wsgi:app", ["DATABASE_URL"])
    assert pg_database.password not in json.dumps(result)

    # agentctl exec applies the config file too: its chdir, its raw_env.
    proc = agentctl(sb, "exec", "gunicorn", "--", "sh", "-c",
                    'pwd; test -n "$DATABASE_URL" && echo has-url')
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"{app.root}\nhas-url\n", "")

    # agentctl upgrade runs flask db upgrade there, against the config file's database.
    old_pid = sb.main_pid(UNIT)
    proc = agentctl(sb, "upgrade", "gunicorn", "--yes", "--restart", "--probe-timeout", "30")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert pg_database.alembic_versions() == ["r3"]
    assert f"Running flask db upgrade r3 as www-data in {app.root} (" in proc.stdout
    assert "Running upgrade r2 -> r3" in proc.stdout
    new_pid = sb.main_pid(UNIT)
    assert new_pid not in (0, old_pid)
    assert f"restarted, active with MainPID {new_pid} (was {old_pid})" in proc.stdout
    assert pg_database.password not in proc.stdout + proc.stderr
    sb.wait_active(UNIT)

    # A config file that no longer loads: a one-line error, exit 125, nothing run.
    sb.run(["sh", "-c", f"printf 'workers = undefined_name\\n' >> {CONF}"])
    proc = agentctl(sb, "exec", "gunicorn", "--", "sh", "-c", "echo ran")
    assert (proc.returncode, proc.stdout) == (125, "")
    assert proc.stderr.strip() == (
        f"agentctl: gunicorn.service: gunicorn config {CONF} failed: NameError: name "
        f"'undefined_name' is not defined (at {CONF} line 4)")
