"""End to end: the agent as the unit from systemd/, beside gunicorn.service, scraped by a real
Prometheus whose alert rules are the shipped ones."""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import skip_or_fail
from tests.harness.agent import agentctl, deploy_app_and_agent
from tests.harness.apps import (
    AppDir,
    db_upgrade,
)
from tests.harness.postgres import PgDatabase
from tests.harness.prometheus import PROMTOOL, PrometheusServer, prometheus_unavailable_reason
from tests.harness.sandbox import Sandbox

pytestmark = [pytest.mark.systemd, pytest.mark.postgres]

APP_UNIT = "gunicorn.service"
AGENT_UNIT = "driftwatch-agent.service"
ENV_FILE = "/etc/site/env"


@dataclass
class Deployment:
    """A sandbox with the app (one migration pending) and the agent, both as systemd units."""

    sb: Sandbox
    app: AppDir
    db: PgDatabase
    agent_port: int

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.agent_port}/metrics"

    def metrics_text(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=30) as resp:
            return resp.read().decode()

    def sample(self, name: str, **labels: str) -> float | None:
        for family in text_string_to_metric_families(self.metrics_text()):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return s.value
        return None


@pytest.fixture
def deployment(request: pytest.FixtureRequest, make_sandbox: Callable[[], Sandbox],
               make_app: Callable[..., AppDir], flask_venv: Path,
               pg_database: PgDatabase) -> Iterator[Deployment]:
    """The agent with min_interval_seconds 3, or the value given by indirect parametrisation."""
    min_interval = getattr(request, "param", 3)
    app = make_app()
    db_upgrade(app, flask_venv, pg_database.url, "r2")  # r3 is deployed but not applied
    sb = make_sandbox()
    _, agent_port = deploy_app_and_agent(
        sb, app=app, venv=flask_venv, env={"DATABASE_URL": pg_database.url},
        app_unit=APP_UNIT, env_file=ENV_FILE,
        agent_settings={"min_interval_seconds": min_interval})
    yield Deployment(sb, app, pg_database, agent_port)


def test_prometheus_alert_fires_then_resolves_after_agentctl_upgrade(
        deployment: Deployment) -> None:
    reason = prometheus_unavailable_reason()
    if reason:
        skip_or_fail(reason)
    prom = PrometheusServer([f"127.0.0.1:{deployment.agent_port}"]).start()
    try:
        def pending_alert() -> list[dict[str, object]]:
            return [a for a in prom.firing() if a["labels"]["alertname"] ==
                    "DriftwatchPendingMigrations" and a["labels"]["unit"] == APP_UNIT]

        fired = prom.wait_for(pending_alert, timeout=60, what="DriftwatchPendingMigrations")
        assert "agentctl upgrade gunicorn.service --restart" in \
            fired[0]["annotations"]["description"]
        upgrade = agentctl(deployment.sb, "upgrade", "gunicorn", "--restart", "--yes")
        assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
        assert deployment.db.alembic_versions() == ["r3"]
        prom.wait_for(lambda: not pending_alert(), timeout=60,
                      what="DriftwatchPendingMigrations to resolve")
        # The running agent compares the schema again once it changed: no stale drift.
        assert deployment.sample("driftwatch_schema_drift_objects", unit=APP_UNIT,
                                 kind="missing_table") == 0
        up = prom.api("query", query='up{job="driftwatch"}')["result"]
        assert up and up[0]["value"][1] == "1"
    finally:
        prom.stop()


def test_live_exposition_passes_promtool(deployment: Deployment) -> None:
    if not PROMTOOL.exists():
        skip_or_fail(f"{PROMTOOL} missing: run .ci/setup")
    text = deployment.metrics_text()
    assert 'driftwatch_pending_revisions{unit="gunicorn.service"} 1.0' in text
    # No DSN anywhere: the backend is a label value (backend="postgresql"), never a URL.
    assert deployment.db.password not in text and "postgresql:" not in text \
        and "postgresql+" not in text and deployment.db.owner not in text
    # Under the unit's hardening every check still manages to look (journal, /proc, sockets).
    checks = {s.labels["check"]: s.value for f in text_string_to_metric_families(text)
              for s in f.samples if s.name == "driftwatch_check_success"}
    assert set(checks) >= {"unit", "app_load", "database", "migrations", "schema", "privileges",
                           "connections", "integrity", "journal"}, checks
    assert all(v == 1.0 for v in checks.values()), checks
    proc = subprocess.run([str(PROMTOOL), "check", "metrics"], input=text, text=True,
                          capture_output=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "" and proc.stderr.strip() == "", \
        proc.stdout + proc.stderr


def test_no_secret_in_status_metrics_or_the_agents_journal(deployment: Deployment) -> None:
    metrics = deployment.metrics_text()
    with urllib.request.urlopen(f"http://127.0.0.1:{deployment.agent_port}/status",
                                timeout=30) as resp:
        status = resp.read().decode()
    journal = deployment.sb.run(["journalctl", "-u", AGENT_UNIT, "--no-pager", "-o", "cat"],
                                check=False).stdout
    text = agentctl(deployment.sb, "status").stdout
    unit = json.loads(status)["units"][0]
    assert unit["migrations"]["pending"] == ["r3"]  # the status really carries the state
    for where, body in (("metrics", metrics), ("/status", status), ("journal", journal),
                        ("agentctl status", text)):
        assert deployment.db.password not in body, where


def test_fifty_concurrent_scrapes_cause_one_inspection(deployment: Deployment) -> None:
    deployment.metrics_text()
    before = deployment.sample("driftwatch_inspections_total")
    deployment.db.cluster.reset_statements()
    time.sleep(3.5)  # let the cached snapshot age past min_interval_seconds

    with ThreadPoolExecutor(max_workers=50) as pool:
        bodies = list(pool.map(lambda _: deployment.metrics_text(), range(50)))
    assert all("driftwatch_pending_revisions" in b for b in bodies)
    # A scrape waits at most scrape_wait_seconds: the inspection may still be finishing in
    # the background; wait for it (scrapes meanwhile join it, never start another).
    after = deployment.sample("driftwatch_inspections_total")
    deadline = time.monotonic() + 30
    while before is not None and after == before and time.monotonic() < deadline:
        time.sleep(0.2)
        after = deployment.sample("driftwatch_inspections_total")
    assert before is not None and after == before + 1
    # ...and the database saw exactly one read of its version table from the agent.
    reads = [calls for query, calls in deployment.db.cluster.statements(db=deployment.db.name)
             if "alembic_version" in query and "driftwatch" not in query.lower()
             and query.lstrip().upper().startswith("SELECT")]
    assert sum(reads) == 1, deployment.db.cluster.statements(db=deployment.db.name)


def test_manual_schema_change_reaches_the_running_agent(deployment: Deployment) -> None:
    deployment.metrics_text()
    deployment.db.execute("ALTER TABLE users ADD COLUMN nickname text", as_owner=True)
    time.sleep(3.5)  # past min_interval_seconds: the next scrape inspects again
    assert deployment.sample("driftwatch_schema_drift_objects", unit=APP_UNIT,
                             kind="extra_column") == 1


def test_a_second_change_keeps_the_first_changes_drift(deployment: Deployment) -> None:
    """After the second change the probe compares only the new table (users' catalog
    fingerprint is the previous check's): users' extra column is that check's entry, reused."""
    def drift_becomes(kind: str, count: int) -> float | None:
        deadline = time.monotonic() + 30
        value = None
        while time.monotonic() < deadline:
            value = deployment.sample("driftwatch_schema_drift_objects", unit=APP_UNIT,
                                      kind=kind)
            if value == count:
                break
            time.sleep(0.5)
        return value

    deployment.metrics_text()
    deployment.db.execute("ALTER TABLE users ADD COLUMN nickname text", as_owner=True)
    time.sleep(3.5)  # past min_interval_seconds: the next scrape inspects again
    assert drift_becomes("extra_column", 1) == 1
    deployment.db.execute("CREATE TABLE legacy_reports (id int)", as_owner=True)
    time.sleep(3.5)
    assert drift_becomes("extra_table", 1) == 1
    assert drift_becomes("extra_column", 1) == 1


# An hour-long interval: the cached snapshot could only show the restart because systemd's
# signal invalidated it, never because it aged out (no elapsed-time assertion needed).
@pytest.mark.parametrize("deployment", [3600], indirect=True)
def test_restart_reaches_the_agent_through_systemds_signal(deployment: Deployment) -> None:
    # The first scrape starts the first inspection; on a loaded machine it can outlast the
    # scrape's wait (scrape_wait_seconds), so wait for the first snapshot.
    deadline = time.monotonic() + 60
    old = None
    while old is None and time.monotonic() < deadline:
        old = deployment.sample("driftwatch_unit_start_timestamp_seconds", unit=APP_UNIT)
        if old is None:
            time.sleep(0.2)
    assert old is not None
    inspections = deployment.sample("driftwatch_inspections_total")
    assert deployment.sample("driftwatch_inspections_total") == inspections   # cached
    time.sleep(1.1)  # start timestamps have microsecond resolution; make the change visible
    deployment.sb.systemctl("restart", APP_UNIT)
    restarted = time.monotonic()
    new = old
    # A wait, not a bound: without the signal nothing changes for an hour.
    while time.monotonic() - restarted < 60:
        new = deployment.sample("driftwatch_unit_start_timestamp_seconds", unit=APP_UNIT)
        if new is not None and new != old and \
                deployment.sample("driftwatch_unit_up", unit=APP_UNIT) == 1.0:
            break
        time.sleep(0.05)
    elapsed = time.monotonic() - restarted
    assert new is not None and new != old, "the restart never showed in /metrics"
    print(f"restart visible in /metrics after {elapsed:.2f}s (min_interval_seconds 3600)")


def test_agent_unit_is_hardened_and_talks_to_systemd(deployment: Deployment) -> None:
    sb = deployment.sb
    deployment.metrics_text()  # the first scrape runs the first inspection
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status = sb.systemctl("show", "-p", "StatusText", "--value", AGENT_UNIT).stdout.strip()
        if status.startswith("watching 1 unit"):
            break
        time.sleep(0.2)
    assert status.startswith("watching 1 unit") and "pending" in status, status
    proc = sb.run(["systemd-analyze", "security", "--no-pager", AGENT_UNIT], check=False)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    exposure = float(match.group(1))
    print(f"systemd-analyze security exposure: {exposure} {match.group(2)}")
    assert exposure <= 4.5, proc.stdout
    unit_text = sb.systemctl("cat", AGENT_UNIT).stdout
    assert "SecureBits" not in unit_text   # it did nothing for a root service with a bounding set
    # The root-only socket: RuntimeDirectory 0700, socket 0600, owned by root.
    listing = sb.run(["stat", "-c", "%a %U %F", "/run/driftwatch",
                      "/run/driftwatch/agent.sock"]).stdout.split("\n")
    assert listing[0] == "700 root directory" and listing[1] == "600 root socket", listing
    as_root = agentctl(sb, "status")
    assert as_root.stdout.startswith("from the driftwatch agent 0.1.0 on "
                                     "/run/driftwatch/agent.sock"), as_root.stdout
    as_app = agentctl(sb, "status", "--config.file", "/etc/driftwatch/agent.toml",
                      user="www-data")
    assert as_app.stdout.startswith(
        f"from the driftwatch agent 0.1.0 on 127.0.0.1:{deployment.agent_port} over TCP "
        "(unix socket /run/driftwatch/agent.sock: Permission denied; detail redacted"), \
        as_app.stdout + as_app.stderr
    sb.systemctl("reload", AGENT_UNIT)  # SIGHUP: re-read the config, keep serving
    time.sleep(0.5)
    assert sb.systemctl("is-active", AGENT_UNIT, check=False).stdout.strip() == "active"
    assert deployment.sample("driftwatch_unit_up", unit=APP_UNIT) == 1.0
