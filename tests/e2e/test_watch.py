"""agent.daemon.watch against a real systemd in a sandbox: a restart reaches the callback at once."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

import pytest

from tests.harness.sandbox import Sandbox

pytestmark = pytest.mark.systemd

# Runs inside the sandbox with the checkout's venv: watch, restart, report what was seen.
SCRIPT = r"""
import json, subprocess, threading, time
from agent.daemon.watch import UnitWatcher
seen, hit = [], threading.Event()
def on_change(unit):
    seen.append((unit, time.monotonic()))
    if unit == "demo.service":
        hit.set()
w = UnitWatcher(on_change, units=["demo.service"])
w.start()
assert w.connected.wait(10), "watcher never connected"
time.sleep(0.2)
seen.clear(); hit.clear()
start = time.monotonic()
subprocess.run(["systemctl", "restart", "demo.service"], check=True)
ok = hit.wait(5)
latency = seen[0][1] - start if seen else None
units = sorted({u or "" for u, _ in seen})
# The bus goes away (dbus-daemon restarts): the watcher must reconnect and keep working.
subprocess.run(["systemctl", "restart", "dbus.service"], check=True)
end = time.monotonic() + 15
while w.connections < 2 and time.monotonic() < end:
    time.sleep(0.05)
reconnected = w.connections >= 2 and w.connected.wait(5)
time.sleep(0.2)
hit.clear()
subprocess.run(["systemctl", "restart", "demo.service"], check=True)
after = hit.wait(5)
w.stop()
print(json.dumps({"ok": ok, "latency": latency, "units": units, "reconnected": reconnected,
                  "after_reconnect": after, "all_changed": None in [u for u, _ in seen],
                  "alive": w.is_alive()}))
"""


def test_restart_is_seen_and_bus_restart_survived(make_sandbox: Callable[[], Sandbox]) -> None:
    sb = make_sandbox()
    sb.add_unit("demo.service", "[Service]\nExecStart=/bin/sleep infinity\n")
    sb.boot()
    sb.systemctl("start", "demo.service")
    proc = sb.run([sys.executable, "-c", SCRIPT], check=False, timeout=60,
                  env={"PYTHONPATH": str(__import__("pathlib").Path(__file__).parents[2])})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\nrestart -> callback in {result['latency']:.3f}s")
    assert result["ok"] and result["latency"] < 1.0
    assert result["units"] == ["demo.service"]
    assert result["reconnected"] and result["all_changed"] and result["after_reconnect"]
    assert not result["alive"]
