"""The agent's real unit keeps its heavy libraries out of its own processes (issue #9's RSS).

The daemon serving HTTP and the inspection worker (root) parse URLs with agent/dburl.py, name
SQL with agent/dbsql.py and call systemd without pystemd's introspection: after a steady
inspection of a real gunicorn unit on PostgreSQL, neither has SQLAlchemy, psycopg2 or lxml
loaded. Each of the three maps a compiled extension of its own the moment it is imported
(sqlalchemy/*_cy*.so, psycopg2/_psycopg*.so, lxml/etree*.so), so /proc/PID/maps shows the
import; pystemd and psutil in the worker show that the same look sees a library that is there.
The worker also leaves OpenSSL's libcrypto out (hashlib's built-in SHA-256).
"""

from __future__ import annotations

import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.bench.agent_rss import agent_processes
from tests.harness.agent import deploy_app_and_agent
from tests.harness.apps import AppDir, db_upgrade
from tests.harness.postgres import PgDatabase
from tests.harness.sandbox import Sandbox

pytestmark = [pytest.mark.systemd, pytest.mark.postgres]

FORBIDDEN = {"sqlalchemy", "psycopg2", "lxml"}


def test_daemon_and_worker_load_no_sqlalchemy_psycopg2_or_lxml(
        make_sandbox: Callable[[], Sandbox], make_app: Callable[..., AppDir], flask_venv: Path,
        pg_database: PgDatabase) -> None:
    app = make_app()
    db_upgrade(app, flask_venv, pg_database.url, "r2")   # r3 pending: the preflight runs too
    sb = make_sandbox()
    _, port = deploy_app_and_agent(
        sb, app=app, venv=flask_venv, env={"DATABASE_URL": pg_database.url},
        app_unit="gunicorn.service", agent_settings={"min_interval_seconds": 0})
    for _ in range(3):   # the first inspection, then steady ones (kept session, probe memo)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as resp:
            body = resp.read().decode()
    assert 'driftwatch_pending_revisions{unit="gunicorn.service"} 1.0' in body
    procs = agent_processes(sb)
    workers = [p for p in procs if "agent.daemon.worker" in p[1]]
    daemons = [p for p in procs if "driftwatch-agent" in p[1]]
    assert len(workers) == 1 and len(daemons) == 1, procs
    for pid, cmd, mib, libs in procs:
        assert not FORBIDDEN & set(libs), f"{cmd} ({mib:.1f} MiB) has {libs} loaded"
    assert {"pystemd", "psutil"} <= set(workers[0][3]), workers
    # The worker hashes with Python's built-in SHA-256: OpenSSL's libcrypto is the daemon's
    # (TLS, http.client) only.
    assert "libcrypto" not in workers[0][3] and "libcrypto" in daemons[0][3], procs

