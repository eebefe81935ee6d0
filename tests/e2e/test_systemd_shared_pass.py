"""One D-Bus pass for all units (SystemdSource.read_units) on a real systemd: kept reads stay
right across daemon-reload, unit file edits, restarts and crash loops, and cost what they should."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from tests.harness.agent import PYTHON
from tests.harness.sandbox import Sandbox

pytestmark = pytest.mark.systemd

UNITS = [f"app{i}.service" for i in range(4)]

# Runs inside the sandbox: one long-lived SystemdSource (as the daemon's worker keeps it)
# between steps that change systemd's state; prints one JSON object of what it saw.
PRELUDE = """
import json, subprocess, time
from agent.privileged.sources.systemd import SystemdSource
s = SystemdSource()
UNITS = {units!r}
out = {{}}
def sh(*argv):
    subprocess.run(argv, check=True, capture_output=True)
def read():
    before = dict(s.calls)
    got = s.read_units(UNITS)
    calls = {{k: v - before.get(k, 0) for k, v in s.calls.items() if v - before.get(k, 0)}}
    return got, calls
"""


def run_steps(sb: Sandbox, body: str) -> dict:
    code = PRELUDE.format(units=UNITS) + body + "\nprint(json.dumps(out))\n"
    sb.write_file("/opt/steps.py", code)
    proc = sb.run([PYTHON, "/opt/steps.py"], check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture
def sb(make_sandbox: Callable[[], Sandbox]) -> Sandbox:
    sandbox = make_sandbox()
    for name in UNITS:
        sandbox.add_unit(name, "[Service]\nEnvironment=GREETING=hello\n"
                               "ExecStart=/bin/sleep infinity\n")
    sandbox.add_unit("loop.service", "[Service]\nExecStart=/bin/sh -c 'sleep 0.5; exit 3'\n"
                                     "Restart=always\nRestartSec=0.3\n"
                                     "StartLimitIntervalSec=0\n")
    sandbox.boot()
    sandbox.systemctl("start", *UNITS)
    return sandbox


def test_one_pass_for_all_units_and_only_small_gets_while_unchanged(sb: Sandbox) -> None:
    seen = run_steps(sb, """
first, out["first"] = read()
second, out["second"] = read()
out["same"] = all(first[u] == second[u] for u in UNITS)
out["pids"] = [second[u].main_pid for u in UNITS]
""")
    n = len(UNITS)
    # The first pass reads every unit in full, without one LoadUnit per unit.
    assert seen["first"] == {"ListUnitsByNames": 1, "Get(UnitsLoadTimestamp)": 1,
                             "GetAll(org.freedesktop.systemd1.Unit)": n,
                             "GetAll(org.freedesktop.systemd1.Service)": n}
    # Unchanged: still one pass; per unit three one-property Gets, no GetAll.
    assert seen["second"] == {"ListUnitsByNames": 1, "Get(UnitsLoadTimestamp)": 1,
                              "Get(InvocationID)": n, "Get(MainPID)": n,
                              "Get(NeedDaemonReload)": n}
    assert seen["same"] is True
    assert seen["pids"] == [sb.main_pid(u) for u in UNITS]


def test_edit_needs_reload_then_reload_brings_the_new_environment(sb: Sandbox) -> None:
    seen = run_steps(sb, """
read()
with open("/etc/systemd/system/app1.service", "a") as f:
    f.write("Environment=GREETING=bonjour\\n")
got, calls = read()
out["after_edit"] = {u: [got[u].need_daemon_reload, list(got[u].environment)] for u in UNITS}
out["after_edit_calls"] = calls
sh("systemctl", "daemon-reload")
got, calls = read()
out["after_reload"] = {u: [got[u].need_daemon_reload, list(got[u].environment)] for u in UNITS}
out["after_reload_calls"] = calls
""")
    # NeedDaemonReload is computed by systemd on request: seen on a kept read.
    assert seen["after_edit"]["app1.service"] == [True, ["GREETING=hello"]]
    assert seen["after_edit"]["app0.service"] == [False, ["GREETING=hello"]]
    assert "GetAll(org.freedesktop.systemd1.Service)" not in seen["after_edit_calls"]
    # After daemon-reload every kept read is dropped: the new Environment is there at once.
    assert seen["after_reload"]["app1.service"] == [False, ["GREETING=bonjour"]]
    assert seen["after_reload_calls"]["GetAll(org.freedesktop.systemd1.Service)"] == len(UNITS)


def test_a_restart_is_read_in_full(sb: Sandbox) -> None:
    seen = run_steps(sb, """
before, _ = read()
sh("systemctl", "restart", "app2.service")
after, calls = read()
out["pids"] = [before["app2.service"].main_pid, after["app2.service"].main_pid]
out["started"] = [before["app2.service"].exec_main_start_timestamp,
                  after["app2.service"].exec_main_start_timestamp]
out["full_reads"] = calls.get("GetAll(org.freedesktop.systemd1.Service)", 0)
""")
    assert seen["pids"][0] != seen["pids"][1] == sb.main_pid("app2.service")
    assert seen["started"][1] > seen["started"][0]
    assert seen["full_reads"] == 1   # only the restarted unit


def test_a_crash_loop_counts_its_restarts(sb: Sandbox) -> None:
    seen = run_steps(sb, """
UNITS.append("loop.service")
sh("systemctl", "start", "loop.service")
counts = []
deadline = time.monotonic() + 20
while time.monotonic() < deadline and len(set(counts)) < 3:
    counts.append(read()[0]["loop.service"].n_restarts)
    time.sleep(0.2)
out["counts"] = counts
""")
    assert len(set(seen["counts"])) >= 3
    assert seen["counts"] == sorted(seen["counts"])


def test_a_missing_unit_is_its_own_error(sb: Sandbox) -> None:
    seen = run_steps(sb, """
UNITS.append("nope.service")
got, _ = read()
out["errors"] = {u: type(v).__name__ for u, v in got.items() if isinstance(v, Exception)}
got, _ = read()
out["again"] = {u: type(v).__name__ for u, v in got.items() if isinstance(v, Exception)}
""")
    assert seen["errors"] == seen["again"] == {"nope.service": "UnitNotFound"}
