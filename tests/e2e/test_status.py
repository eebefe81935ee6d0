"""agentctl status: from a running driftwatch-agent, or one local check when none answers."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness.agent import VENV_BIN, agent_config
from tests.harness.apps import AppDir, http_get
from tests.harness.postgres import PgDatabase, free_port
from tests.harness.sandbox import Sandbox
from tests.harness.site import UNIT, Site, SiteFactory, site_factory

pytestmark = [pytest.mark.systemd, pytest.mark.postgres]

CONFIG = "/etc/dw-test/agent.toml"


@pytest.fixture
def site(make_sandbox: Callable[[], Sandbox], make_app: Callable[..., AppDir],
         flask_venv: Path, pg_database: PgDatabase) -> SiteFactory:
    """site(spec, upgrade_to=..., **gunicorn_unit options) -> a running Site."""
    return site_factory(make_sandbox, make_app, flask_venv, pg_database)


def start_agent(s: Site, port: int) -> None:
    """driftwatch-agent as a transient unit inside the sandbox, answering on 127.0.0.1:PORT."""
    s.sb.write_file(CONFIG, agent_config(f"127.0.0.1:{port}", min_interval_seconds=0))
    s.sb.run(["systemd-run", "--unit=dw-test", "--",
              str(VENV_BIN / "driftwatch-agent"), "--config.file", CONFIG])
    deadline = time.monotonic() + 60
    while True:  # until the first inspection is served (503 before)
        code, _ = http_get(f"http://127.0.0.1:{port}/status", timeout=30)
        if code == 200:
            return
        assert time.monotonic() < deadline, s.sb.run(
            ["journalctl", "-u", "dw-test", "--no-pager", "-n", "40"], check=False).stdout
        time.sleep(0.2)


def test_without_an_agent_checks_locally_and_says_so(site: SiteFactory) -> None:
    s = site(upgrade_to="r2")
    port = free_port()  # nothing listens there
    proc = s.agentctl("status", "--web.listen-address", f"127.0.0.1:{port}")
    assert proc.returncode == 1, proc.stderr
    out = proc.stdout
    assert out.startswith(f"no agent answers on 127.0.0.1:{port} (")
    assert "; checked locally\n" in out
    assert "✗ gunicorn.service - problems" in out
    assert "revision: r2, head r3: 1 pending (r3)" in out
    assert f"database: 127.0.0.1:{s.db.cluster.port}/{s.db.name}, reachable" in out
    assert "pending_migrations" in out and "fix: " in out
    assert s.db.password not in out
    data = json.loads(s.agentctl("status", "gunicorn", "--json", "--web.listen-address",
                                 f"127.0.0.1:{port}").stdout)
    assert data["source"]["kind"] == "local"
    assert [u["unit"] for u in data["units"]] == [UNIT]
    assert data["units"][0]["migrations"]["pending"] == ["r3"]


def test_with_an_agent_shows_its_snapshot(site: SiteFactory) -> None:
    s = site(upgrade_to="r2")
    port = free_port()
    start_agent(s, port)
    proc = s.agentctl("status", "--web.listen-address", f"127.0.0.1:{port}")
    assert proc.returncode == 1, proc.stderr
    out = proc.stdout
    assert out.startswith(f"from the driftwatch agent 0.1.0 on 127.0.0.1:{port}, snapshot taken")
    assert "revision: r2, head r3: 1 pending (r3)" in out
    assert "checked locally" not in out
    # The address can come from the agent's config file too; --json filters by unit.
    proc = s.agentctl("status", "gunicorn", "--json", "--config.file", CONFIG)
    data = json.loads(proc.stdout)
    assert proc.returncode == 1
    assert data["source"] == {"kind": "agent", "address": f"127.0.0.1:{port}"}
    assert data["agent"]["config_file"] == CONFIG
    assert [u["unit"] for u in data["units"]] == [UNIT]
    assert data["units"][0]["migrations"]["pending"] == ["r3"]
    # A unit the agent does not watch: checked locally, and said why.
    proc = s.agentctl("status", "dw-test", "--web.listen-address", f"127.0.0.1:{port}")
    assert proc.stdout.startswith(f"the agent on 127.0.0.1:{port} does not watch "
                                  "dw-test.service; checked locally"), proc.stdout

