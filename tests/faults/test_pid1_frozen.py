"""PID 1 (and with it systemd's D-Bus API) frozen under the running agent: the scrape is still
answered within its bound, from the last snapshot with the stuck check marked 0, and the
agent recovers by itself once systemd runs again (real sandbox systemd, real agent unit)."""

from __future__ import annotations

import os
import signal
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness.agent import deploy_app_and_agent
from tests.harness.apps import (
    AppDir,
    db_upgrade,
)
from tests.harness.postgres import PgDatabase
from tests.harness.sandbox import Sandbox

pytestmark = [pytest.mark.systemd, pytest.mark.postgres]

APP_UNIT = "gunicorn.service"
AGENT_UNIT = "driftwatch-agent.service"
SCRAPE_WAIT = 2.0     # the agent's scrape_wait_seconds in this test
BUS_TIMEOUT = 5.0     # the agent's D-Bus call timeout (its default)


def samples(port: int, timeout: float = 30) -> tuple[dict[tuple[str, tuple], float], float]:
    """One scrape: {(name, sorted labels): value} and how long it took."""
    started = time.monotonic()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as resp:
        body = resp.read().decode()
    took = time.monotonic() - started
    out = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out, took


def check_success(values: dict[tuple[str, tuple], float], check: str) -> float | None:
    return values.get(("driftwatch_check_success", (("check", check), ("unit", APP_UNIT))))


@pytest.fixture
def agent_port(make_sandbox: Callable[[], Sandbox], make_app: Callable[..., AppDir],
               flask_venv: Path, pg_database: PgDatabase) -> Iterator[tuple[Sandbox, int]]:
    app = make_app()
    db_upgrade(app, flask_venv, pg_database.url, "head")
    sb = make_sandbox()
    _, port = deploy_app_and_agent(
        sb, app=app, venv=flask_venv, env={"DATABASE_URL": pg_database.url},
        app_unit=APP_UNIT, agent_settings={
            "min_interval_seconds": 1, "scrape_wait_seconds": SCRAPE_WAIT,
            "request_timeout_seconds": 10, "log_level": "debug"})
    yield sb, port


def test_pid1_frozen_scrape_answers_within_its_bound_and_recovers(
        agent_port: tuple[Sandbox, int]) -> None:
    sb, port = agent_port
    # Precondition, not the point: a healthy snapshot (the first inspection loads the app in a
    # probe and may outlast scrape_wait_seconds on a loaded machine).
    deadline = time.monotonic() + 60
    healthy, _ = samples(port)
    while check_success(healthy, "unit") != 1.0 and time.monotonic() < deadline:
        time.sleep(0.5)
        healthy, _ = samples(port)
    assert check_success(healthy, "unit") == 1.0, healthy
    assert sb.pid is not None
    time.sleep(1.2)  # the snapshot ages past min_interval: the next scrape inspects again
    os.kill(sb.pid, signal.SIGSTOP)  # systemd, and with it its D-Bus API, stops answering
    try:
        during, took = samples(port)
        # A second scrape while the inspection is still stuck: never a second inspection.
        again, took_again = samples(port)
    except Exception:
        os.kill(sb.pid, signal.SIGCONT)
        print(sb.run(["journalctl", "--no-pager", "-n", "60", "-u", AGENT_UNIT],
                     check=False).stdout)
        raise
    finally:
        os.kill(sb.pid, signal.SIGCONT)
    print(f"\nPID 1 frozen: scrapes answered in {took:.2f} s and {took_again:.2f} s "
          f"(scrape_wait_seconds {SCRAPE_WAIT}, bus timeout {BUS_TIMEOUT}); "
          f"check unit: {check_success(during, 'unit')}")
    assert took < SCRAPE_WAIT + 2.0 and took_again < SCRAPE_WAIT + 2.0
    # The stuck check is marked failed; the last known migration state is still exported.
    assert check_success(during, "unit") == 0.0, during
    assert ("driftwatch_pending_revisions", (("unit", APP_UNIT),)) in during
    assert again[("driftwatch_inspections_total", ())] <= during[
        ("driftwatch_inspections_total", ())] + 1

    started = time.monotonic()
    deadline = started + 60
    while time.monotonic() < deadline:
        after, _ = samples(port)
        if check_success(after, "unit") == 1.0:
            break
        time.sleep(0.5)
    recovered = time.monotonic() - started
    print(f"recovered {recovered:.1f} s after SIGCONT")
    assert check_success(after, "unit") == 1.0, after
    assert sb.systemctl("is-active", AGENT_UNIT, check=False).stdout.strip() == "active"
