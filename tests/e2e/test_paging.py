"""Pages an on-call engineer trusts, end to end on real parts: the agent as its systemd unit
beside a real gunicorn.service, a real PostgreSQL, a real Prometheus evaluating the shipped
rules (only `for:` and the journal window shortened, by the shipped renderer), a real
Alertmanager with the shipped inhibit rules, and a webhook receiver.

Each situation asserts exactly which notifications arrive (status, alert, unit), then waits a
quiet period longer than the relevant `for:` to prove that nothing else does. Set
DRIFTWATCH_PAGES_OUT=FILE to keep every received notification (the README shows them).
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import skip_or_fail
from tests.harness.agent import agentctl, deploy_app_and_agent
from tests.harness.alertmanager import (
    AlertmanagerServer,
    WebhookReceiver,
    alertmanager_unavailable_reason,
    config_text,
    pages,
)
from tests.harness.apps import (
    AppDir,
    db_upgrade,
)
from tests.harness.postgres import PgDatabase, PostgresCluster, postgres_unavailable_reason
from tests.harness.prometheus import (
    RULES,
    PrometheusServer,
    prometheus_unavailable_reason,
    rules_configure,
)
from tests.harness.sandbox import Sandbox

pytestmark = [pytest.mark.systemd, pytest.mark.postgres]

APP = "gunicorn.service"
AGENT = "driftwatch-agent.service"
ENV_FILE = "/etc/site/env"
# The shipped for: durations scaled from minutes to seconds; the order between alerts (a
# cause before its consequences) is the shipped one. Only these and the journal window change.
# The long ones are shorter than they were (a cause 5 s before its consequence, DatabaseDown
# before CheckFailing, is ample at 1 s scrape and evaluation intervals); "*" stays 5 s (at 3 s
# DriftwatchMigrationRunningTooLong once paged after the agent's restart in situation 6) and
# AgentDown 12 s, so that a restart of the agent under load never looks like an outage.
FOR = {"*": "5s", "DriftwatchPendingMigrations": "6s", "DriftwatchDatabaseDown": "5s",
       "DriftwatchCheckFailing": "10s", "DriftwatchAgentDown": "12s",
       "DriftwatchAgentAbsent": "12s", "DriftwatchJournalSchemaErrors": "14s",
       "DriftwatchNeedsDaemonReload": "6s", "DriftwatchStaleEnvironment": "6s",
       "DriftwatchNeedsRestart": "6s", "DriftwatchAppliedMigrationModified": "5s"}
CONFIG = {"journal_window": "10s"}
# Longer than the shortened for: of every consequence that could follow (5-6 s), counted from
# the expected pages' arrival; the situations with a longer one (CheckFailing, AgentDown, the
# journal's) wait longer where they are asserted.
QUIET = 8.0


@pytest.fixture
def cluster() -> Iterator[PostgresCluster]:
    """A cluster of our own: this test stops and restarts it."""
    reason = postgres_unavailable_reason()
    if reason:
        skip_or_fail(reason)
    pg = PostgresCluster().start()
    try:
        yield pg
    finally:
        pg.stop()


def stop_postgres(pg: PostgresCluster) -> None:
    """pg_ctl stop -m fast, keeping the data directory."""
    pg._run_as_server_user([str(pg.bin_dir / "pg_ctl"), "stop", "-D", str(pg.datadir),
                            "-m", "fast", "-w", "-t", "30"])


def start_postgres(pg: PostgresCluster) -> None:
    """Start it again on the same port."""
    pg._pg_ctl_start(pg.port, 60)
    pg.pid = pg._postmaster_pid()


@dataclass
class Chain:
    """The agent, Prometheus, Alertmanager and the webhook, watching one app."""

    sb: Sandbox
    app: AppDir
    db: PgDatabase
    app_port: int
    agent_port: int
    prom: PrometheusServer
    am: AlertmanagerServer
    hook: WebhookReceiver
    received: list[dict[str, Any]]

    def value(self, query: str) -> float | None:
        """One number from Prometheus (None when the query returns nothing)."""
        result = self.prom.api("query", query=query)["result"]
        return float(result[0]["value"][1]) if result else None

    def expect(self, what: str, expected: list[tuple[str, str, str]],
               action: Callable[[], object] = lambda: None, timeout: float = 90,
               quiet: float = QUIET) -> list[dict[str, Any]]:
        """Do action, then wait for exactly these notifications (status, alertname, unit), then
        a quiet period in which nothing else arrives; return the notifications received."""
        mark = self.hook.mark()  # before the action: a fast page must not slip past
        started = time.monotonic()
        action()
        deadline = time.monotonic() + timeout
        got: list[tuple[str, str, str]] = []
        while time.monotonic() < deadline:
            got = pages(self.hook.since(mark))
            unexpected = [a for n in self.hook.since(mark) for a in n["alerts"]
                          if (a["status"], a["labels"]["alertname"], a["labels"].get("unit", ""))
                          not in expected]
            assert not unexpected, f"{what}: unexpected {unexpected} (expected {expected})"
            if sorted(set(got)) == sorted(set(expected)):
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"{what}: got {got}, expected {expected}; "
                                 f"Prometheus fires {self.firing()}; AM: {self.am.log_tail()}")
        arrived = time.monotonic() - started
        time.sleep(quiet)
        print(f"{what}: pages after {arrived:.1f} s, then {quiet:g} s quiet")  # pacing, with -s
        notes = self.hook.since(mark)
        self.received.append({"situation": what, "notifications": notes})
        assert sorted(pages(notes)) == sorted(expected), \
            f"{what}: then {[(a['status'], a['labels']) for n in notes for a in n['alerts']]}"
        return notes

    def firing(self) -> list[str]:
        return [a["labels"]["alertname"] for a in self.prom.firing()]


@pytest.fixture
def chain(make_sandbox: Callable[[], Sandbox], make_app: Callable[..., AppDir],
          flask_venv: Path, cluster: PostgresCluster) -> Iterator[Chain]:
    for reason in (prometheus_unavailable_reason(), alertmanager_unavailable_reason()):
        if reason:
            skip_or_fail(reason)
    db = cluster.new_database()
    app = make_app()
    db_upgrade(app, flask_venv, db.url, "r2")  # r3 deployed, not applied
    sb = make_sandbox()
    app_port, agent_port = deploy_app_and_agent(
        sb, app=app, venv=flask_venv, env={"DATABASE_URL": db.url}, app_unit=APP,
        env_file=ENV_FILE,
        agent_settings={"min_interval_seconds": 1, "journal_window_seconds": 600})
    hook = WebhookReceiver()
    am = AlertmanagerServer(config_text(hook.url)).start()
    rules = rules_configure().render(RULES.read_text(), CONFIG, FOR)
    prom = PrometheusServer([f"127.0.0.1:{agent_port}"], rules=rules, alertmanager=am.url)
    prom.start()
    received: list[dict[str, Any]] = []
    try:
        yield Chain(sb, app, db, app_port, agent_port, prom, am, hook, received)
    finally:
        prom.stop()
        am.stop()
        hook.stop()
        out = os.environ.get("DRIFTWATCH_PAGES_OUT")
        if out:
            Path(out).write_text(json.dumps(received, indent=1))


class Traffic:
    """Requests to the app's /db, two a second, in a thread (bounded by stop())."""

    def __init__(self, url: str) -> None:
        self.url, self.codes = url, []  # type: ignore[var-annotated]
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            try:
                with urllib.request.urlopen(self.url, timeout=5) as resp:
                    self.codes.append(resp.status)
            except urllib.error.HTTPError as exc:
                self.codes.append(exc.code)
            except OSError:
                self.codes.append(0)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(10)


def test_one_page_per_cause_and_no_false_resolved(chain: Chain) -> None:
    c = chain
    traffic = Traffic(f"http://127.0.0.1:{c.app_port}/db")
    try:
        # 1. A pending migration under traffic: one page, the pending one (no journal page).
        notes = c.expect("pending migration under traffic",
                         [("firing", "DriftwatchPendingMigrations", APP)])
        alert = notes[0]["alerts"][0]
        assert alert["labels"]["severity"] == "critical"
        assert alert["labels"]["instance"] == f"127.0.0.1:{c.agent_port}"
        db_label = f"127.0.0.1:{c.db.cluster.port}/{c.db.name}"
        assert f"database {db_label} (postgresql) (at r2, code head r3)" in alert["annotations"]["description"]
        assert f"`agentctl upgrade {APP} --restart`" in alert["annotations"]["description"]
        assert alert["annotations"]["runbook_url"].endswith("#finding-pending_migrations")
        assert 500 in traffic.codes
        # The 500s reach the journal, the agent and then Prometheus (a wait, not a bound).
        deadline = time.monotonic() + 60
        while (time.monotonic() < deadline and not
               (c.value(f'sum(driftwatch_journal_schema_errors_total{{unit="{APP}"}})') or 0)):
            time.sleep(1)
        assert (c.value(f'sum(driftwatch_journal_schema_errors_total{{unit="{APP}"}})')
                or 0) > 0
        assert "DriftwatchJournalSchemaErrors" not in c.firing()  # held back by its cause

        # 2. The database stops: one page (database down), no "resolved" for the pending one,
        # the failing checks it causes are inhibited.
        c.expect("database stopped", [("firing", "DriftwatchDatabaseDown", APP)],
                 lambda: stop_postgres(c.db.cluster), quiet=12)
        assert c.value(f'driftwatch_pending_revisions{{unit="{APP}"}}') == 1  # last known
        assert (c.value(f'driftwatch_check_staleness_seconds{{unit="{APP}",check="migrations"}}')
                or 0) > 5
        # Firing in Prometheus and held in Alertmanager (a wait, not a bound: under load the
        # last evaluation may need a moment more after the quiet period).
        c.prom.wait_for(lambda: "DriftwatchCheckFailing" in c.firing() and any(
            a["status"]["inhibitedBy"] for a in c.am.alerts()), 60,
            "DriftwatchCheckFailing firing and inhibited")
        inhibited = [a for a in c.am.alerts() if a["status"]["inhibitedBy"]]
        assert {a["labels"]["alertname"] for a in inhibited} == {"DriftwatchCheckFailing"}

        # 3. It comes back: only the database page resolves; the pending alert fires on,
        # without a second page (its for: did not restart).
        c.expect("database restarted", [("resolved", "DriftwatchDatabaseDown", APP)],
                 lambda: start_postgres(c.db.cluster))
        assert "DriftwatchPendingMigrations" in c.firing()

        # 4. The agent stops: one page (agent down), no "resolved" for the pending alert
        # (its last known state holds); back, only the agent's page resolves, and the pending
        # alert fires on without a second page.
        c.expect("agent stopped", [("firing", "DriftwatchAgentDown", "")],
                 lambda: c.sb.systemctl("stop", AGENT))
        assert "DriftwatchPendingMigrations" in c.firing()
        c.expect("agent started again", [("resolved", "DriftwatchAgentDown", "")],
                 lambda: c.sb.systemctl("start", AGENT))
        assert "DriftwatchPendingMigrations" in c.firing()

        # 5. The README's fix: upgrade in the unit's context, restart. One "resolved".
        done: list[Any] = []
        c.expect("the README's fix (agentctl upgrade --restart)",
                 [("resolved", "DriftwatchPendingMigrations", APP)],
                 lambda: done.append(agentctl(c.sb, "upgrade", "gunicorn", "--restart",
                                              "--yes")), quiet=18)  # > the journal's for:
        assert done[0].returncode == 0, done[0].stdout + done[0].stderr
        assert traffic.codes[-1] == 200
    finally:
        traffic.stop()

    # 6. The agent restarts with the app healthy: no page, no "resolved", and the journal
    # counter neither re-counts the errors it already counted nor loses the window.
    c.expect("agent restarted, app healthy", [], lambda: c.sb.systemctl("restart", AGENT),
             quiet=16)  # > AgentDown's for:
    assert c.value(f'sum(driftwatch_journal_schema_errors_total{{unit="{APP}"}})') == 0
    assert (c.value(f'sum(driftwatch_journal_schema_errors_recent{{unit="{APP}"}})') or 0) > 0

    # 7. An applied migration edited: one page, and no restart page (workers never load it).
    r2 = str(c.app.revision_file("r2"))
    original = c.sb.path(r2).read_text()
    notes = c.expect("applied migration edited",
                     [("firing", "DriftwatchAppliedMigrationModified", APP)],
                     lambda: c.sb.write_file(r2, original + "\n# edited after it was applied\n"))
    assert f": {Path(r2).name} (r2). The database will never" in \
        notes[0]["alerts"][0]["annotations"]["description"]
    c.expect("edit reverted", [("resolved", "DriftwatchAppliedMigrationModified", APP)],
             lambda: c.sb.write_file(r2, original))

    # 8. The unit edited: daemon-reload first (one page), then after the reload the restart
    # its new environment needs (one page), then the restart resolves it.
    unit_path = f"/etc/systemd/system/{APP}"
    text = c.sb.path(unit_path).read_text()
    edited = text.replace("[Service]\n", "[Service]\nEnvironment=FEATURE_FLAG=on\n")
    notes = c.expect("unit edited", [("firing", "DriftwatchNeedsDaemonReload", APP)],
                     lambda: c.sb.write_file(unit_path, edited))
    assert f"The unit file {unit_path} or a drop-in" in \
        notes[0]["alerts"][0]["annotations"]["description"]
    notes = c.expect("daemon-reload", [("resolved", "DriftwatchNeedsDaemonReload", APP),
                                       ("firing", "DriftwatchStaleEnvironment", APP)],
                     lambda: c.sb.systemctl("daemon-reload"))
    stale = next(a for n in notes for a in n["alerts"]
                 if a["labels"]["alertname"] == "DriftwatchStaleEnvironment")
    assert "now gives: FEATURE_FLAG (`agentctl env" in stale["annotations"]["description"]
    c.expect("unit restarted", [("resolved", "DriftwatchStaleEnvironment", APP)],
             lambda: c.sb.systemctl("restart", APP), quiet=5)
