"""The watched unit going away or failing under a real sandbox systemd: a clear answer,
never a traceback, and the other units unaffected."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness.apps import AppDir
from tests.harness.postgres import PgDatabase
from tests.harness.sandbox import Sandbox
from tests.harness.site import UNIT, SiteFactory, site_factory

pytestmark = [pytest.mark.systemd, pytest.mark.postgres]


@pytest.fixture
def site(make_sandbox: Callable[[], Sandbox], make_app: Callable[..., AppDir],
         flask_venv: Path, pg_database: PgDatabase) -> SiteFactory:
    """site(...) -> a running Site."""
    return site_factory(make_sandbox, make_app, flask_venv, pg_database)


def test_unit_removed_then_failing(site: SiteFactory) -> None:
    s = site()
    unit_file = s.sb.run(["systemctl", "show", "-P", "FragmentPath", UNIT]).stdout.strip()
    figures = []

    # Failing: the main process killed (no Restart=): the unit ends up failed.
    s.sb.systemctl("kill", "-s", "KILL", UNIT)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and s.sb.systemctl(
            "is-failed", UNIT, check=False).stdout.strip() != "failed":
        time.sleep(0.1)
    started = time.monotonic()
    proc = s.agentctl("check", UNIT, "--json", "--probe-timeout", "30")
    figures.append(f"failing: exit {proc.returncode} in {time.monotonic() - started:.1f} s")
    unit = json.loads(proc.stdout)["units"][0]
    assert proc.returncode in (1, 2) and unit["active_state"] == "failed", unit
    assert "Traceback" not in proc.stderr

    # Removed: unit file gone and systemd reloaded.
    s.sb.systemctl("stop", UNIT, check=False)
    s.sb.run(["rm", "-f", unit_file])
    s.sb.systemctl("daemon-reload")
    started = time.monotonic()
    proc = s.agentctl("check", UNIT, "--json")
    figures.append(f"removed: exit {proc.returncode} in {time.monotonic() - started:.1f} s")
    print("\n" + "; ".join(figures) + f"; {proc.stdout.strip()[:300]}")
    assert proc.returncode == 2
    assert "not found" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    exec_proc = s.agentctl("exec", "gunicorn", "--", "true")
    assert exec_proc.returncode == 125
    assert exec_proc.stderr.strip().startswith("agentctl: ") and "not found" in exec_proc.stderr
