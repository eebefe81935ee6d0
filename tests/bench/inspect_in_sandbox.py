"""Runs inside a sandbox: the agent's own Inspector, timed per inspection, driven line by line.

    <agent python> -m tests.bench.inspect_in_sandbox --exclude UNIT,... --pg-cpu-fds FD,FD2

Reads one command per line on stdin, answers one JSON line on stdout:
    inspect N UNIT,UNIT...   N inspections of those units; CPU seconds over all N, precise:
                             "own" this process and its reaped children (getrusage: nsenter
                             leaves it in the host's cgroup, outside the sandbox's), the
                             sandbox's cgroup tree but the excluded units (cgroup v2
                             usage_usec, exited processes included) split into "pid1",
                             "sessions", "probes", "dbus", "other" (sum "sandbox"), and "pg"
                             (PostgreSQL's own cgroup, its cpu.stat open at FD) of which
                             "pg_background" (its child group of background processes, FD2)
                             and "pg_backends" (the rest);
                             wall seconds of each inspection
    reset                    a fresh Inspector with an empty state directory (a first check)
    quit
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from typing import Any

from tests.bench.cpu import (SESSION_PREFIX, rusage_seconds, snapshot, split, unified_root,
                             usage_from_fd)


def vm_kib(field: str) -> int:
    """A Vm* line of this process's /proc status, in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def own_cgroup() -> str:
    """This process's cgroup v2 path as the sandbox's cgroup namespace shows it."""
    with open("/proc/self/cgroup") as f:
        return next((line.strip()[3:] for line in f if line.startswith("0::")), "?")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--exclude", default="")
    parser.add_argument("--probe-timeout", type=float, default=300.0)
    parser.add_argument("--pg-cpu-fds", default="")
    args = parser.parse_args()
    exclude = [u for u in args.exclude.split(",") if u]
    root = unified_root()
    if root is None:
        raise SystemExit("no cgroup v2 hierarchy in the sandbox")
    fds = [int(fd) for fd in args.pg_cpu_fds.split(",") if fd]

    def pg() -> list[float]:
        """PostgreSQL's CPU seconds so far: the whole cluster, its background processes."""
        return [usage_from_fd(fd) for fd in fds] if fds else [0.0, 0.0]

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
        wall: list[float] = []
        problems: list[str] = []
        tree0, pg0, own0 = snapshot(root), pg(), rusage_seconds()
        for _ in range(count):
            started = time.perf_counter()
            result = inspector.inspect(units)
            wall.append(time.perf_counter() - started)
            problems = [f"{u.unit}: {c.name}: {c.error}" for u in result.units
                        for c in u.checks if not c.success]
        own, pg1, tree1 = rusage_seconds() - own0, pg(), snapshot(root)
        parts = split(tree0, tree1, exclude)
        pg_cpu, pg_background = pg1[0] - pg0[0], pg1[1] - pg0[1]
        sessions = [k for k in tree1 if k.rsplit("/", 1)[-1].startswith(SESSION_PREFIX)]
        answer: dict[str, Any] = {"count": count, "own": own, "sandbox": parts.pop("total"),
                                  **parts, "pg": pg_cpu,
                                  "pg_background": pg_background,
                                  "pg_backends": pg_cpu - pg_background, "wall": wall,
                                  "session_units": len(sessions),
                                  "rss_kib": vm_kib("VmRSS"), "hwm_kib": vm_kib("VmHWM"),
                                  "failed_checks": problems[:5],
                                  "probe_runs": inspector.probe_runs,
                                  "own_cgroup": own_cgroup()}
        print(json.dumps(answer), flush=True)
    inspector.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
