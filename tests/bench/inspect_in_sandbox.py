"""Runs inside a sandbox: the agent's own Inspector, timed per inspection, driven line by line.

    <agent python> -m tests.bench.inspect_in_sandbox --exclude UNIT,UNIT...

Reads one command per line on stdin, answers one JSON line on stdout:
    inspect N UNIT,UNIT...   N inspections of those units; CPU seconds of each (everything in
                             the sandbox but the excluded units: this process, its session
                             children, probe units, systemd's own D-Bus work), of which this
                             process and its children ("own"), and wall seconds
    reset                    a fresh Inspector with an empty state directory (a first check)
    quit
The driver (tests/bench/bench9.py) samples PostgreSQL's CPU around each command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

from tests.bench.cpu import namespace_cpu, tree_cpu


def vm_kib(field: str) -> int:
    """A Vm* line of this process's /proc status, in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--exclude", default="")
    parser.add_argument("--probe-timeout", type=float, default=300.0)
    args = parser.parse_args()
    exclude = [u for u in args.exclude.split(",") if u]

    from agent.config import Config
    from agent.privileged.inspector import make_inspector

    def fresh() -> Any:
        state = tempfile.mkdtemp(prefix="bench-state-")
        return make_inspector(Config(state_dir=state, discover_gunicorn=False,
                                     probe_timeout_seconds=args.probe_timeout))

    inspector = fresh()
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        if words[0] == "reset":       # a new agent: nothing memoised, nothing remembered
            inspector.close()
            inspector = fresh()
            print("{}", flush=True)
            continue
        count, units = int(words[1]), words[2].split(",")
        cpu: list[float] = []
        own: list[float] = []
        wall: list[float] = []
        problems: list[str] = []
        for _ in range(count):
            before, started = namespace_cpu(exclude), time.perf_counter()
            mine = tree_cpu(os.getpid())
            snapshot = inspector.inspect(units)
            own.append(tree_cpu(os.getpid()) - mine)
            wall.append(time.perf_counter() - started)
            cpu.append(namespace_cpu(exclude) - before)
            problems = [f"{u.unit}: {c.name}: {c.error}" for u in snapshot.units
                        for c in u.checks if not c.success]
        answer: dict[str, Any] = {"cpu": cpu, "own": own, "wall": wall, "rss_kib": vm_kib("VmRSS"),
                                  "hwm_kib": vm_kib("VmHWM"), "failed_checks": problems[:5],
                                  "probe_runs": inspector.probe_runs}
        print(json.dumps(answer), flush=True)
    inspector.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
