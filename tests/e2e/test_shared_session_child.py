"""Two real gunicorn units of the same user and venv, their environment files differing only
in DATABASE_URL: the agent's Inspector holds one session child (a transient unit as
www-data) with a connection per database, and each unit's answers are its own database's."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness.agent import agent_python
from tests.harness.app_fixtures import AppDir
from tests.harness.apps import db_upgrade, env_file_text, gunicorn_pids, gunicorn_unit, \
    http_get, unit_diagnostics
from tests.harness.postgres import PgDatabase, PostgresCluster, free_port
from tests.harness.sandbox import Sandbox
from tests.harness.throwaway import fresh_database

pytestmark = [pytest.mark.systemd, pytest.mark.postgres]

UNITS = ("site-a.service", "site-b.service")

INSPECT = """
import json, subprocess, tempfile
from agent.privileged.inspector import Inspector, InspectorSettings
U = %r
insp = Inspector(InspectorSettings(units=U, discover_gunicorn=False,
                                   state_path=tempfile.mkdtemp() + "/state.db"))
def run():
    snaps = insp.inspect(list(U)).units
    return {s.unit: {"current": list(s.migrations.current),
                     "failed": sorted(c.name for c in s.checks if not c.success)}
            for s in snaps}
def children():
    out = subprocess.run(["systemctl", "list-units", "--no-legend", "--plain",
                          "driftwatch-session-*"], capture_output=True, text=True).stdout
    return len([line for line in out.splitlines() if line.strip()])
out = {"first": run(), "second": run()}
out["counters"] = [insp._sessions.started, insp._sessions.children_started]
out["children_alive"] = children()
insp.close()
print(json.dumps(out))
""" % (UNITS,)


@pytest.fixture
def other_database(pg: PostgresCluster) -> Iterator[PgDatabase]:
    yield from fresh_database(pg)


def test_two_units_one_session_child_each_its_own_answers(
        make_sandbox: Callable[[], Sandbox], make_app: Callable[..., AppDir],
        flask_venv: Path, pg_database: PgDatabase, other_database: PgDatabase) -> None:
    app = make_app(None)
    db_upgrade(app, flask_venv, pg_database.url, "head")
    db_upgrade(app, flask_venv, other_database.url, "r1")
    sb = make_sandbox()
    ports = {}
    for unit, db in zip(UNITS, (pg_database, other_database)):
        env_file = f"/etc/{unit}.env"
        sb.add_file(env_file, env_file_text({"DATABASE_URL": db.url}))
        ports[unit] = free_port()
        sb.add_unit(unit, gunicorn_unit(venv=flask_venv, app_dir=app, port=ports[unit],
                                        environment={"FLASK_APP": "wsgi.py"},
                                        environment_files=[env_file]))
    sb.boot()
    for unit in UNITS:
        sb.systemctl("start", unit)
        http_get(f"http://127.0.0.1:{ports[unit]}/healthz",
                 describe=lambda u=unit: unit_diagnostics(sb, u))  # type: ignore[misc]
        gunicorn_pids(sb, unit)
    out = agent_python(sb, INSPECT)
    first = out["first"]
    assert first["site-a.service"]["current"] == ["r3"], first
    assert first["site-b.service"]["current"] == ["r1"], first
    assert out["second"] == first
    # Two sessions (a connection each) in one child, kept across both runs.
    assert out["counters"] == [2, 1]
    assert out["children_alive"] == 1
