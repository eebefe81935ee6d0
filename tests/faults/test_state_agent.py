"""agentctl check with its state directory read-only or full, inside a real sandbox (its own
mount namespace, so the mounts never touch the host): a finding and a check at 0, no file
moved, and the other checks unaffected."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.harness.apps import AppDir
from tests.harness.postgres import PgDatabase
from tests.harness.sandbox import Sandbox
from tests.harness.site import UNIT, Site, SiteFactory, site_factory

pytestmark = [pytest.mark.systemd, pytest.mark.postgres]


@pytest.fixture
def site(make_sandbox: Callable[[], Sandbox], make_app: Callable[..., AppDir],
         flask_venv: Path, pg_database: PgDatabase) -> SiteFactory:
    """site(...) -> a running Site."""
    return site_factory(make_sandbox, make_app, flask_venv, pg_database)


def check(s: Site, state_dir: str) -> tuple[int, dict[str, Any]]:
    proc = s.agentctl("check", UNIT, "--json", "--probe-timeout", "30", "--state-dir",
                      state_dir)
    assert proc.returncode in (0, 1, 2), proc.stderr
    assert "Traceback" not in proc.stderr
    return proc.returncode, json.loads(proc.stdout)["units"][0]


def listing(s: Site, directory: str) -> str:
    return s.sb.run(["sh", "-c", f"cd {directory} && ls -la --time-style=+ . && "
                                 "sha256sum state.db"]).stdout


def test_read_only_and_full_state_directory(site: SiteFactory) -> None:
    s = site()
    code, unit = check(s, "/var/lib/dw-ro")  # first run records the applied revisions
    assert code == 0, unit["findings"]

    s.sb.run(["sh", "-c", "mount --bind /var/lib/dw-ro /var/lib/dw-ro && "
                          "mount -o remount,ro,bind /var/lib/dw-ro"])
    before = listing(s, "/var/lib/dw-ro")
    code, unit = check(s, "/var/lib/dw-ro")
    integrity = next(c for c in unit["checks"] if c["name"] == "integrity")
    found = [f for f in unit["findings"] if f["check"].startswith("state_store")]
    print(f"\nread-only state dir: exit {code}; integrity {integrity}; findings "
          f"{[f['check'] for f in found]}")
    assert [f["check"] for f in found] == ["state_store_read_only"]
    assert found[0]["severity"] == "warning" and "is read-only" in found[0]["message"]
    assert integrity["success"] is False and "read-only" in integrity["error"]
    assert unit["db_up"] is True and unit["migrations"]["pending"] == []  # the rest still ran
    assert listing(s, "/var/lib/dw-ro") == before  # nothing moved, nothing written

    s.sb.run(["sh", "-c", "mkdir -p /var/lib/dw-full && "
                          "mount -t tmpfs -o size=64k tmpfs /var/lib/dw-full && "
                          "dd if=/dev/zero of=/var/lib/dw-full/filler bs=4k 2>/dev/null; true"])
    code, unit = check(s, "/var/lib/dw-full")
    found = [f["check"] for f in unit["findings"] if f["check"].startswith("state_store")]
    print(f"full state dir: exit {code}; findings {found}")
    assert found == ["state_store_full"]
