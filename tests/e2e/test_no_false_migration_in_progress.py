"""No migration is reported running when none runs, on real parts (sandbox systemd, real
PostgreSQL, the real gunicorn app, the agent's unit): another agent session reading the
version table (what the previous agent's session child does while it finishes its batch
after `systemctl restart driftwatch-agent`, ACCESS SHARE on alembic_version until the
batch's rollback) is not a migration."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness.agent import agentctl, agentctl_json, deploy_app_and_agent, wait_first_snapshot
from tests.harness.apps import AppDir, db_upgrade
from tests.harness.postgres import PgDatabase
from tests.harness.sandbox import Sandbox

pytestmark = [pytest.mark.systemd, pytest.mark.postgres]

APP = "gunicorn.service"
AGENT = "driftwatch-agent.service"
GAUGE = f'driftwatch_migration_in_progress{{unit="{APP}"}}'


def gauge(port: int) -> float:
    """The unit's driftwatch_migration_in_progress (one scrape: one inspection at most)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as resp:
        body = resp.read().decode()
    return next(float(line.split()[-1]) for line in body.splitlines()
                if line.startswith(GAUGE + " "))


def test_another_agent_session_mid_batch_is_not_a_migration(
        make_sandbox: Callable[[], Sandbox], make_app: Callable[..., AppDir],
        flask_venv: Path, pg_database: PgDatabase) -> None:
    db = pg_database
    app = make_app()
    db_upgrade(app, flask_venv, db.url, "r3")  # at head: nothing pending, nothing running
    sb = make_sandbox()
    _app_port, agent_port = deploy_app_and_agent(
        sb, app=app, venv=flask_venv, env={"DATABASE_URL": db.url}, app_unit=APP,
        agent_settings={"min_interval_seconds": 1})
    assert gauge(agent_port) == 0
    # The previous agent's session, in the middle of its batch: a read-only transaction that
    # has read the version table, under the agent's application_name.
    other = db.cluster.connect(db.name, db.owner, db.password, autocommit=False)
    try:
        cur = other.cursor()
        cur.execute("SELECT set_config('application_name', 'driftwatch', false)")
        cur.execute("SET TRANSACTION READ ONLY")
        cur.execute("SELECT version_num FROM alembic_version")
        sb.systemctl("restart", AGENT)
        wait_first_snapshot(agent_port, APP)
        readings = []
        for _ in range(3):  # the first inspection after the restart, and the next ones
            readings.append(gauge(agent_port))
            time.sleep(1.1)  # > min_interval_seconds: each scrape inspects again
        status = agentctl_json(sb, "status")
        held = db.execute("SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a "
                          "ON a.pid = l.pid WHERE a.application_name = 'driftwatch' "
                          "AND l.relation = 'alembic_version'::regclass AND l.granted")
        assert held[0][0] >= 1  # the read lock was there all along
    finally:
        other.rollback()
        other.close()
    assert readings == [0, 0, 0]
    unit = next(u for u in status["units"] if u["unit"] == APP)
    assert unit["migrations"]["in_progress"] is False
    assert "migration_in_progress" not in [f["check"] for f in unit["findings"]]


def test_two_real_agent_sessions_never_see_each_other_as_a_migration(
        make_sandbox: Callable[[], Sandbox], make_app: Callable[..., AppDir],
        flask_venv: Path, pg_database: PgDatabase) -> None:
    """Nothing imitated: the daemon inspecting on every scrape and `agentctl check` beside it,
    each with its own session on the same database. Before the fix, 3 of 15 checks said
    "pid N holds AccessShareLock on alembic_version" (the daemon's batch) and the gauge read 1."""
    db = pg_database
    app = make_app()
    db_upgrade(app, flask_venv, db.url, "r3")
    sb = make_sandbox()
    _app_port, agent_port = deploy_app_and_agent(
        sb, app=app, venv=flask_venv, env={"DATABASE_URL": db.url}, app_unit=APP,
        agent_settings={"min_interval_seconds": 0})
    stop, readings = threading.Event(), []

    def scrape() -> None:  # bounded: until the checks below are done
        while not stop.is_set():
            readings.append(gauge(agent_port))

    scraper = threading.Thread(target=scrape, daemon=True)
    scraper.start()
    try:
        said = []
        for _ in range(15):
            proc = agentctl(sb, "check", "gunicorn", "--json")
            said.append(proc.stdout)
    finally:
        stop.set()
        scraper.join(60)
    assert readings and set(readings) == {0.0}, f"{readings.count(1.0)} of {len(readings)}"
    running = [out for out in said if "migration_in_progress" in out]
    assert not running, running[0][-3000:]
