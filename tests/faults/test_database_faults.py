"""PostgreSQL stopped, frozen (SIGSTOP) and restarted under a real app and a real agentctl:
each check answers within its bounds with a clear reason, and recovers."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.apps import AppDir
from tests.harness.postgres import PgDatabase, PostgresCluster
from tests.harness.sandbox import Sandbox
from tests.harness.site import Site, site_factory

pytestmark = [pytest.mark.systemd, pytest.mark.postgres]

DB_TIMEOUT = 2.0


@pytest.fixture
def own_cluster(pg: PostgresCluster) -> Iterator[PostgresCluster]:
    """A cluster of this test's own, to stop, freeze and restart (the session's is shared)."""
    cluster = PostgresCluster().start()
    try:
        yield cluster
    finally:
        if cluster.pid:
            try:
                os.kill(cluster.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        cluster.stop()


def timed_check(s: Site) -> tuple[int, dict[str, Any], float]:
    """agentctl check --json with a short database timeout: (exit, unit, seconds)."""
    started = time.monotonic()
    code, unit = s.check("--db-timeout", str(DB_TIMEOUT))
    return code, unit, time.monotonic() - started


def pg_ctl(cluster: PostgresCluster, *args: str) -> None:
    """pg_ctl as the server's user, on the cluster's data directory."""
    cluster._run_as_server_user([str(cluster.bin_dir / "pg_ctl"), *args, "-D",
                                 str(cluster.datadir), "-w", "-t", "30"])


def test_postgres_stopped_frozen_and_restarted(
        own_cluster: PostgresCluster, make_sandbox: Callable[[], Sandbox],
        make_app: Callable[..., AppDir], flask_venv: Path) -> None:
    db: PgDatabase = own_cluster.new_database()
    s = site_factory(make_sandbox, make_app, flask_venv, db)()
    figures = []

    code, unit, took = timed_check(s)
    figures.append(f"healthy: exit {code} in {took:.1f} s")
    assert code == 0 and unit["db_up"] is True, unit["findings"]
    healthy = took

    # Frozen: the kernel still accepts connections, nobody answers them.
    os.kill(own_cluster.pid or 0, signal.SIGSTOP)
    try:
        code, unit, took = timed_check(s)
    finally:
        os.kill(own_cluster.pid or 0, signal.SIGCONT)
    figures.append(f"frozen (SIGSTOP): exit {code} in {took:.1f} s")
    assert code == 2 and unit["db_up"] is False
    down = next(f for f in unit["findings"] if f["check"] == "database_unreachable")
    assert "timed out" in down["message"] and db.password not in down["message"]
    # Bounded by the database timeout, not by how long the server stays frozen.
    assert took < healthy + 4 * DB_TIMEOUT + 10

    pg_ctl(own_cluster, "stop", "-m", "fast")
    code, unit, took = timed_check(s)
    figures.append(f"stopped: exit {code} in {took:.1f} s")
    assert code == 2 and unit["db_up"] is False
    down = next(f for f in unit["findings"] if f["check"] == "database_unreachable")
    assert "refused" in down["message"]

    pg_ctl(own_cluster, "start", "-l", str(own_cluster.logfile), "-o", f"-p {own_cluster.port}")
    own_cluster.pid = own_cluster._postmaster_pid()
    code, unit, took = timed_check(s)
    figures.append(f"restarted: exit {code} in {took:.1f} s")
    print("\n" + "; ".join(figures))
    assert code == 0 and unit["db_up"] is True, unit["findings"]
