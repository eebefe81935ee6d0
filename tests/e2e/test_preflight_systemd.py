"""agentctl plan, status and upgrade's preflight on a real gunicorn.service in a real systemd."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness.agent import agent_config, agent_unit_dropins, agent_unit_text
from tests.harness.apps import AppDir, http_get
from tests.harness.postgres import PgDatabase, free_port
from tests.harness.preflight_apps import SAFE, UNSAFE, fill_items, preflight_spec
from tests.harness.sandbox import Sandbox
from tests.harness.site import SiteFactory, site_factory

pytestmark = [pytest.mark.systemd, pytest.mark.postgres]
AGENT = "driftwatch-agent.service"


@pytest.fixture
def site(make_sandbox: Callable[[], Sandbox], make_app: Callable[..., AppDir],
         flask_venv: Path, pg_database: PgDatabase) -> SiteFactory:
    return site_factory(make_sandbox, make_app, flask_venv, pg_database)


def steps(*ids: str) -> list[tuple[str, str]]:
    bodies = {rev: body for rev, _, body in (*UNSAFE, *SAFE)}
    return [(rev, bodies[rev]) for rev in ids]


def test_plan_status_and_upgrade_refusal(site: SiteFactory) -> None:
    s = site(preflight_spec(steps("s_add_col", "u_drop_col")), upgrade_to="p1")
    fill_items(s.db, 20_000)

    text = s.agentctl("plan", "gunicorn", "--probe-timeout", "30")
    assert text.returncode == 1, text.stdout + text.stderr
    assert "2 pending" in text.stdout
    assert "1. s_add_col  [low]" in text.stdout
    assert "2. u_drop_col  [critical]" in text.stdout
    assert "the code's models still map items.email" in text.stdout
    assert "rules:  ban-drop-column" in text.stdout
    assert s.db.password not in text.stdout + text.stderr

    doc = json.loads(s.agentctl("plan", "gunicorn", "--json").stdout)
    assert doc["risk"] == "critical" and doc["counts"] == {"low": 1, "high": 0, "critical": 1}
    assert [r["rules"] for r in doc["revisions"]] == [[], ["ban-drop-column"]]
    items = next(t for t in doc["tables"] if t["table"] == "items")
    assert items["rows"] == 20_000

    status = json.loads(s.agentctl("status", "gunicorn", "--local", "--json").stdout)
    pre = status["units"][0]["preflight"]
    assert pre["risk"] == "critical" and pre["counts"]["critical"] == 1
    assert any(f["check"] == "pending_migration_risk" for f in status["units"][0]["findings"])
    human = s.agentctl("status", "gunicorn", "--local").stdout
    assert "preflight: critical: u_drop_col: dropping items.email" in human

    refused = s.agentctl("upgrade", "gunicorn", "--yes")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "2. u_drop_col  [critical]" in refused.stdout  # the preflight, before confirming
    assert "refusing to upgrade gunicorn.service: 1 pending revision(s) rated critical by " \
           "the preflight (u_drop_col)" in refused.stderr
    assert "--accept-risk" in refused.stderr
    assert s.db.alembic_versions() == ["p1"]  # nothing ran

    accepted = s.agentctl("upgrade", "gunicorn", "--yes", "--accept-risk")
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert s.db.alembic_versions() == ["u_drop_col"]
    done = s.agentctl("plan", "gunicorn")
    assert done.returncode == 0 and "nothing pending" in done.stdout


def test_the_agent_service_parses_the_sql_in_its_confined_child(site: SiteFactory) -> None:
    """Under the agent's own hardened unit (capability bounding set, system call filter), the
    parser child still confines itself (chroot, setuid) and every revision is analysed."""
    port = free_port()
    files = {f"/etc/systemd/system/{AGENT}": agent_unit_text(),
             "/etc/driftwatch/agent.toml": agent_config(f"127.0.0.1:{port}")}
    files.update({f"/etc/systemd/system/{AGENT}.d/{name}": text
                  for name, text in agent_unit_dropins().items()})
    s = site(preflight_spec(steps("s_add_col", "u_drop_col")), upgrade_to="p1",
             extra_files=files)
    s.sb.systemctl("start", AGENT)
    s.sb.wait_active(AGENT)
    deadline = time.monotonic() + 120
    code, body = http_get(f"http://127.0.0.1:{port}/status")
    while code == 503 and time.monotonic() < deadline:  # the first inspection is running
        time.sleep(1)
        code, body = http_get(f"http://127.0.0.1:{port}/status")
    assert code == 200, body
    # From the agent itself, through its root-only socket: the detail /status redacts.
    shown = s.agentctl("status", "gunicorn", "--json")
    assert shown.stdout.startswith("{"), shown.stdout + shown.stderr
    pre = json.loads(shown.stdout)["units"][0]["preflight"]
    assert pre["error"] == "", pre
    assert [(r["revision"], r["risk"], r["rules"]) for r in pre["revisions"]] == [
        ("s_add_col", "low", []), ("u_drop_col", "critical", ["ban-drop-column"])], pre
