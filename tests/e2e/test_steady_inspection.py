"""A steady inspection of a real gunicorn unit does only what can have changed, and answers
the same: no session started, no process read again, no probe; a lost session or a restart
is noticed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness.agent import agent_python
from tests.harness.app_fixtures import AppDir
from tests.harness.apps import http_get
from tests.harness.postgres import PgDatabase
from tests.harness.sandbox import Sandbox
from tests.harness.site import Site, site_factory

pytestmark = [pytest.mark.systemd, pytest.mark.postgres]

STEADY = """
import json, subprocess, tempfile, time
from agent.privileged.inspector import Inspector, InspectorSettings
from agent.privileged.sources import procs
U = "gunicorn.service"
insp = Inspector(InspectorSettings(units=(U,), discover_gunicorn=False,
                                   state_path=tempfile.mkdtemp() + "/state.db"))
def run():
    snap = insp.inspect([U]).units[0]
    return {"failed": sorted(c.name for c in snap.checks if not c.success),
            "findings": sorted(f.check for f in snap.findings),
            "current": list(snap.migrations.current), "connections": snap.database_connections}
def counters():
    return [insp._sessions.started, insp._processes.reads, insp.probe_runs]
out = {"first": run()}
before = counters()
out["second"], out["third"] = run(), run()
out["steady"] = [a - b for a, b in zip(counters(), before)]
out["journal_api"] = insp._journals[U].uses_api()
held = next(iter(insp._sessions.held.values()))
try:
    held.conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")
except Exception:
    pass
out["after_terminate"] = run()
out["terminate"] = [a - b for a, b in zip(counters(), before)]
subprocess.run(["systemctl", "restart", U], check=True)
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    pid = int(subprocess.run(["systemctl", "show", "-p", "MainPID", "--value", U],
                             capture_output=True, text=True).stdout)
    if pid and len(procs.descendants(pid) or []) == 2:
        break
    time.sleep(0.2)
time.sleep(1)
out["after_restart"] = run()
out["restart"] = [a - b for a, b in zip(counters(), before)]
insp.close()
print(json.dumps(out))
"""


@pytest.fixture
def site(make_sandbox: Callable[[], Sandbox], make_app: Callable[..., AppDir],
         flask_venv: Path, pg_database: PgDatabase) -> Callable[..., Site]:
    return site_factory(make_sandbox, make_app, flask_venv, pg_database)


def test_steady_inspection_does_only_what_can_have_changed(site: Callable[..., Site]) -> None:
    s = site()
    http_get(f"http://127.0.0.1:{s.port}/db")   # a worker opens its database connection
    out = agent_python(s.sb, STEADY)
    first = out["first"]
    assert first["failed"] == [] and first["findings"] == [], first
    assert first["current"] == ["r3"] and first["connections"].startswith("connected to")
    assert out["second"] == first and out["third"] == first
    assert out["steady"] == [0, 0, 0]   # sessions started, processes read, probes run
    assert out["journal_api"] is True
    # The kept session's backend was ended: the next inspection starts a new one, no error.
    assert out["after_terminate"] == first
    assert out["terminate"] == [1, 0, 0]
    # A restart: new processes (master and two workers) are read, the answers hold.
    after = out["after_restart"]
    assert after["failed"] == [] and after["current"] == ["r3"], after
    assert out["restart"][1] == 3


HARDENING = ("SystemCallFilter", "SystemCallErrorNumber", "SystemCallArchitectures",
             "NoNewPrivileges", "CapabilityBoundingSet", "RestrictAddressFamilies")
BORROW = ("from agent.privileged.sources import connections as c\n"
          "try:\n    c.observe_own([1])\n    print('own')\n"
          "except c.SocketsUnavailable as exc:\n    print('refused', exc)\n")


def test_the_agent_units_hardening_lets_it_look_at_the_sockets_themselves(
        make_sandbox: Callable[[], Sandbox]) -> None:
    """Under the syscall filter and capabilities of systemd/driftwatch-agent.service,
    pidfd_getfd is allowed: the own-sockets path runs, not the host-wide fallback."""
    from tests.harness.agent import PYTHON
    from tests.harness.sandbox import REPO_ROOT

    unit = (REPO_ROOT / "systemd" / "driftwatch-agent.service").read_text().splitlines()
    props = [line for line in unit if line.split("=", 1)[0] in HARDENING]
    assert any(p == "SystemCallFilter=pidfd_getfd" for p in props), props
    sb = make_sandbox()
    sb.boot()
    argv = ["systemd-run", "--wait", "--pipe", "-q", f"--setenv=PYTHONPATH={REPO_ROOT}"]
    for prop in props:
        argv += ["-p", prop]
    proc = sb.run([*argv, PYTHON, "-c", BORROW], check=False)
    assert proc.stdout.strip() == "own", (proc.stdout, proc.stderr)
