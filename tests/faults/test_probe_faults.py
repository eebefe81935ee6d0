"""The app misbehaving while the probe loads it (real app, real sandbox systemd, real
PostgreSQL): hanging, printing megabytes, leaving a daemon, SIGTERM to agentctl mid-probe."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.harness.agent import AGENTCTL
from tests.harness.apps import AppDir, AppSpec, db_upgrade
from tests.harness.postgres import PgDatabase
from tests.harness.sandbox import Sandbox
from tests.harness.site import UNIT, Site, SiteFactory, site_factory

pytestmark = [pytest.mark.systemd, pytest.mark.postgres]

PROBE_TIMEOUT = 4


@pytest.fixture
def site(make_sandbox: Callable[[], Sandbox], make_app: Callable[..., AppDir],
         flask_venv: Path, pg_database: PgDatabase) -> SiteFactory:
    """site(spec, upgrade_to=..., start_unit=...) -> a Site."""
    return site_factory(make_sandbox, make_app, flask_venv, pg_database)


def app_processes(sb: Sandbox) -> list[str]:
    """Processes of the app's user (www-data) inside the sandbox."""
    return sb.run(["pgrep", "-l", "-u", "www-data"], check=False).stdout.splitlines()


def timed_check(s: Site, *extra: str) -> tuple[int, dict[str, Any], float]:
    started = time.monotonic()
    proc = s.agentctl("check", UNIT, "--json", "--probe-timeout", str(PROBE_TIMEOUT), *extra)
    took = time.monotonic() - started
    import json
    assert proc.returncode in (0, 1, 2), proc.stderr
    return proc.returncode, json.loads(proc.stdout)["units"][0], took


def hanging_site(site: SiteFactory, make_app: Callable[..., AppDir], flask_venv: Path,
                 pg_database: PgDatabase) -> Site:
    """The unit's app hangs on import; its database was migrated by a sane copy."""
    db_upgrade(make_app(AppSpec(), name="sane"), flask_venv, pg_database.url, "head")
    return site(AppSpec(on_import="import time\ntime.sleep(3600)"), upgrade_to=None,
                start_unit=False)


def test_probe_hanging_is_stopped_at_its_timeout(
        site: SiteFactory, make_app: Callable[..., AppDir], flask_venv: Path,
        pg_database: PgDatabase) -> None:
    s = hanging_site(site, make_app, flask_venv, pg_database)
    code, unit, took = timed_check(s)
    left = app_processes(s.sb)
    load = next(c for c in unit["checks"] if c["name"] == "app_load")
    print(f"\nhanging import: exit {code} in {took:.1f} s (probe timeout {PROBE_TIMEOUT} s); "
          f"app_load: {load['error']!r}; app processes left: {left}")
    assert code == 2 and unit["app_loaded"] is False
    assert load["success"] is False and "timed out" in load["error"]
    assert took < PROBE_TIMEOUT + 20
    assert left == []


def test_probe_printing_megabytes_still_answers(site: SiteFactory) -> None:
    # 20 MB on stdout and stderr: the answer travels on its own pipe, never on stdout.
    s = site(AppSpec(on_import="import sys\nsys.stdout.write('x' * 20_000_000)\n"
                               "sys.stderr.write('y' * 20_000_000)\nsys.stdout.flush()"),
             upgrade_to="head", start_unit=False)
    code, unit, took = timed_check(s)
    print(f"\n40 MB printed on import: exit {code} in {took:.1f} s, app_loaded "
          f"{unit['app_loaded']}")
    assert unit["app_loaded"] is True, unit["findings"]
    assert unit["migrations"]["pending"] == []


def test_sigterm_to_agentctl_during_a_probe(
        site: SiteFactory, make_app: Callable[..., AppDir], flask_venv: Path,
        pg_database: PgDatabase) -> None:
    s = hanging_site(site, make_app, flask_venv, pg_database)
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    proc = subprocess.Popen(s.sb.nsenter_argv([AGENTCTL, "check", UNIT, "--probe-timeout",
                                               "60"]),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not app_processes(s.sb):
            time.sleep(0.1)
        assert app_processes(s.sb), "the probe never started"
        pid = s.sb.run(["pgrep", "-o", "-f", "bin/agentctl check"]).stdout.split()[0]
        started = time.monotonic()
        s.sb.run(["kill", "-TERM", pid])
        proc.wait(timeout=30)
        took = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and app_processes(s.sb):
        time.sleep(0.1)
    left = app_processes(s.sb)
    print(f"\nSIGTERM to agentctl mid-probe: it ended in {took:.2f} s (exit {proc.returncode});"
          f" probe processes left: {left}")
    assert took < 10 and proc.returncode == 128 + 15  # 143, as a shell reports SIGTERM
    assert left == []
