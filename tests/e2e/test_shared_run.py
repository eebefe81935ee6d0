"""One inspection run over many units on a real systemd and journald: one D-Bus pass and one
journal read for all of them, and every unit's journal counter and cursor still its own
(across runs, a run over some units only, and an agent restart)."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from tests.harness.agent import PYTHON
from tests.harness.sandbox import Sandbox

pytestmark = pytest.mark.systemd

UNITS = ["a.service", "b.service", "c.service"]
ERROR = "psycopg2.errors.UndefinedColumn: column users.email does not exist"

# Inside the sandbox: the real Inspector (a stand-in probe: no app to load here), its cursor
# file in a directory that outlives it, and `systemctl reload U` logging one schema error
# from U's own cgroup (ExecReload).
SCRIPT = """
import json, subprocess, sys, tempfile, time
from agent.privileged.inspector import Inspector, InspectorSettings
from agent.privileged.journal_cursors import CursorFile
from agent.privileged.probe_runner import ProbeResult
from agent.privileged.sources import journal_api

UNITS = %(units)r
state = tempfile.mkdtemp()
out = {"runs": []}

def stand_in(ctx, request, timeout):
    return ProbeResult(ok=False, error="no app here", error_kind="app_load")

def inspector():
    return Inspector(InspectorSettings(units=tuple(UNITS), discover_gunicorn=False,
                                       state_path=state + "/state.db"),
                     probe=stand_in, cursors=CursorFile(state))

def run(insp, units=UNITS):
    calls, opens = dict(insp.systemd.calls), journal_api.opens
    reads = insp._shared_journal.reads
    snap = insp.inspect(list(units))
    out["runs"].append({
        "units": list(units),
        "totals": {u.unit: u.journal_schema_errors.get("undefined_column", 0)
                   for u in snap.units},
        "dbus": {k: v - calls.get(k, 0) for k, v in insp.systemd.calls.items()
                 if v - calls.get(k, 0)},
        "opens": journal_api.opens - opens,
        "union_reads": insp._shared_journal.reads - reads,
        "errors": [c.error for u in snap.units for c in u.checks
                   if c.name in ("unit", "journal") and not c.success]})
    return out["runs"][-1]["totals"]

def log_errors(unit, n):
    for _ in range(n):
        subprocess.run(["systemctl", "reload", unit], check=True)

def settle(insp, want, units=UNITS):
    deadline = time.monotonic() + 15   # journald stores lines asynchronously
    while True:
        totals = run(insp, units)
        if all(totals.get(u, 0) >= n for u, n in want.items()) or time.monotonic() > deadline:
            return totals

one = inspector()
run(one); run(one)                                   # baseline, then everyone joins
log_errors("a.service", 1); log_errors("b.service", 2)
out["first"] = settle(one, {"a.service": 1, "b.service": 2})
out["steady"] = run(one)
log_errors("b.service", 1)
out["only_a"] = run(one, ["a.service"])             # b's new error waits for b's next run
out["all_again"] = settle(one, {"b.service": 3})
one.close()
two = inspector()                                    # the agent restarted: cursors from disk
out["restarted"] = run(two)
log_errors("c.service", 1); log_errors("a.service", 1)
out["after_restart"] = settle(two, {"c.service": 1, "a.service": 1})
out["after_restart_steady"] = run(two)
two.close()
print(json.dumps(out))
"""


@pytest.fixture
def sb(make_sandbox: Callable[[], Sandbox]) -> Sandbox:
    sandbox = make_sandbox()
    for name in UNITS:
        sandbox.add_unit(name, f"""[Service]
ExecStart=/bin/sh -c 'echo started; exec sleep infinity'
ExecReload=/bin/echo '{ERROR}'
""")
    sandbox.boot()
    sandbox.systemctl("start", *UNITS)
    return sandbox


def test_one_pass_one_journal_read_and_cursors_per_unit(sb: Sandbox) -> None:
    sb.write_file("/opt/shared_run.py", SCRIPT % {"units": UNITS})
    proc = sb.run([PYTHON, "/opt/shared_run.py"], check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    runs = seen["runs"]
    assert all(not r["errors"] for r in runs), [r["errors"] for r in runs]
    # Every run: one ListUnitsByNames for all units, never a LoadUnit; one journal opened.
    assert all(r["dbus"].get("ListUnitsByNames") == 1 and "LoadUnit" not in r["dbus"]
               for r in runs), [r["dbus"] for r in runs]
    assert all(r["opens"] == 1 for r in runs), [r["opens"] for r in runs]
    # From the second run of an inspector on, the units are read through one union read.
    assert [r["union_reads"] for r in runs][:5] == [0, 1, 1, 1, 1], [(r["union_reads"], r["totals"]) for r in runs]
    # Each unit counts its own errors, once: a, b, then nothing new.
    assert seen["first"] == {"a.service": 1, "b.service": 2, "c.service": 0}
    assert seen["steady"] == seen["first"]
    # A run over a only: b's new error is neither lost nor counted twice later.
    assert seen["only_a"] == {"a.service": 1}
    assert seen["all_again"] == {"a.service": 1, "b.service": 3, "c.service": 0}
    # After a restart the counters start from the persisted cursors: nothing old again...
    assert seen["restarted"] == {"a.service": 0, "b.service": 0, "c.service": 0}
    # ... and nothing new lost.
    assert seen["after_restart"] == {"a.service": 1, "b.service": 0, "c.service": 1}
    assert seen["after_restart_steady"] == seen["after_restart"]
    # Steady runs of unchanged active units: no full property read at all.
    steady = runs[-1]["dbus"]
    assert not any(k.startswith("GetAll") for k in steady), steady
