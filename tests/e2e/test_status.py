"""agentctl status: from a running driftwatch-agent, or one local check when none answers."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.harness.agent import VENV_BIN, agent_config
from tests.harness.apps import AppDir, AppSpec, http_get
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


def start_agent(s: Site, port: int, **settings: object) -> None:
    """driftwatch-agent as a transient unit inside the sandbox, answering on 127.0.0.1:PORT."""
    s.sb.write_file(CONFIG, agent_config(f"127.0.0.1:{port}",
                                         **{"min_interval_seconds": 0, **settings}))
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
    assert f"database: 127.0.0.1:{s.db.cluster.port}/{s.db.name} (postgresql), reachable" in out
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
    # Root asks the root-only unix socket first: full detail.
    proc = s.agentctl("status", "--web.listen-address", f"127.0.0.1:{port}")
    assert proc.returncode == 1, proc.stderr
    out = proc.stdout
    assert out.startswith("from the driftwatch agent 0.1.0 on /run/driftwatch/agent.sock, "
                          "snapshot taken"), out
    assert "revision: r2, head r3: 1 pending (r3)" in out
    assert "checked locally" not in out and "pending, in order: r3" in out
    # Without the socket: TCP, and it says so; anonymous over TCP means no detail.
    proc = s.agentctl("status", "--web.listen-address", f"127.0.0.1:{port}", "--socket",
                      "/run/nothing.sock")
    assert proc.stdout.startswith(f"from the driftwatch agent 0.1.0 on 127.0.0.1:{port} over "
                                  "TCP (no unix socket /run/nothing.sock; detail redacted: run "
                                  "as root for it), snapshot taken"), proc.stdout
    assert "pending, in order" not in proc.stdout and "authenticated clients only" in \
        proc.stdout
    # The address can come from the agent's config file too; --json filters by unit.
    proc = s.agentctl("status", "gunicorn", "--json", "--config.file", CONFIG, "--socket", "")
    data = json.loads(proc.stdout)
    assert proc.returncode == 1
    assert data["source"] == {"kind": "agent", "address": f"127.0.0.1:{port} over TCP (no "
                              "unix socket asked; detail redacted: run as root for it)"}
    assert "config_file" not in data["agent"]          # a path: not for anonymous clients
    data = json.loads(s.agentctl("status", "gunicorn", "--json").stdout)
    assert data["source"] == {"kind": "agent", "address": "/run/driftwatch/agent.sock"}
    assert data["agent"]["config_file"] == CONFIG
    assert [u["unit"] for u in data["units"]] == [UNIT]
    assert data["units"][0]["migrations"]["pending"] == ["r3"]
    # A unit the agent does not watch: checked locally, and said why.
    proc = s.agentctl("status", "dw-test", "--web.listen-address", f"127.0.0.1:{port}")
    assert proc.stdout.startswith("the agent on /run/driftwatch/agent.sock does not watch "
                                  "dw-test.service; checked locally"), proc.stdout



SQUATTER = """
import http.server, json, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"units": [{"unit": "gunicorn.service", "unit_up": True,
                                      "checks": [], "findings": []}],
                           "agent": {"version": "0.1.0"}}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body)))
        self.end_headers(); self.wfile.write(body)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def test_a_local_user_on_the_agents_port_cannot_answer_status(site: SiteFactory) -> None:
    """While the agent is down, www-data listens on its port and answers 'all ok'."""
    s = site(upgrade_to="r2")
    port = free_port()
    s.sb.write_file("/tmp/squatter.py", SQUATTER)
    s.sb.run(["systemd-run", "--unit=squatter", "-p", "User=www-data", "--",
              "/usr/bin/python3", "/tmp/squatter.py", str(port)])
    assert http_get(f"http://127.0.0.1:{port}/status", timeout=20)[0] == 200
    for user in (None, "www-data"):
        proc = s.agentctl("status", "--web.listen-address", f"127.0.0.1:{port}",
                          **({"user": user} if user else {}))
        out = proc.stdout
        assert out.startswith(f"the process listening on 127.0.0.1:{port} runs as uid 33 "
                              "(www-data), not as root: not the agent, not asked; checked "
                              "locally"), (user, out, proc.stderr)
        assert "from the driftwatch agent" not in out
        if user is None:      # root's local check sees the truth
            assert proc.returncode == 1 and "1 pending (r3)" in out


HANG_FLAG = "/run/dw-test-hang"


def scrape(port: int) -> tuple[float, dict[tuple[str, str], float]]:
    """(seconds the scrape took, {(metric, check): value} for the check gauges)."""
    started = time.monotonic()
    code, body = http_get(f"http://127.0.0.1:{port}/metrics", timeout=30)
    took = time.monotonic() - started
    assert code == 200
    values = {}
    for line in body.splitlines():
        for metric in ("driftwatch_check_success", "driftwatch_check_duration_seconds",
                       "driftwatch_inspections_total"):
            if line.startswith(metric + "{") and 'check="app_load"' in line or \
                    line.startswith(metric + " "):
                values[(metric, "app_load")] = float(line.rsplit(" ", 1)[1])
    return took, values


def test_a_hung_probe_never_holds_a_scrape(site: SiteFactory) -> None:
    """The app hangs while it is loaded (probe_timeout 30 s): scrapes are answered after
    scrape_wait_seconds from the last snapshot with app_load at 0, one inspection runs."""
    spec = AppSpec(on_create=f"import time\nif os.path.exists({HANG_FLAG!r}):\n"
                             "    time.sleep(12)")
    s = site(spec, upgrade_to="r2")
    port = free_port()
    start_agent(s, port, scrape_wait_seconds=2, probe_timeout_seconds=30)
    _, before = scrape(port)
    assert before[("driftwatch_check_success", "app_load")] == 1.0
    s.sb.write_file(HANG_FLAG, "")
    # A code change makes the agent load the app again (the memo's fingerprint changes).
    s.sb.run(["touch", str(s.app.root / "app" / "__init__.py")])
    took, during = scrape(port)
    print(f"\nscrape during a hung probe took {took:.1f}s (scrape_wait_seconds 2, probe "
          f"timeout 30 s, Prometheus default scrape timeout 10 s)")
    assert during[("driftwatch_check_success", "app_load")] == 0.0
    assert during[("driftwatch_check_duration_seconds", "app_load")] >= 1.0
    assert took < 8
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda _: scrape(port), range(20)))
    assert all(r[1][("driftwatch_check_success", "app_load")] == 0.0 for r in results)
    inspections = {r[1][("driftwatch_inspections_total", "app_load")] for r in results}
    assert inspections == {before[("driftwatch_inspections_total", "app_load")]}, inspections
    print(f"20 concurrent scrapes meanwhile: max {max(r[0] for r in results):.1f}s, "
          "no new inspection")
    s.sb.run(["rm", "-f", HANG_FLAG])
    deadline = time.monotonic() + 60
    while True:        # the inspection finishes in the background and is served next
        _, after = scrape(port)
        if after[("driftwatch_check_success", "app_load")] == 1.0:
            break
        assert time.monotonic() < deadline, after
        time.sleep(1)
