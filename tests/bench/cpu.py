"""CPU seconds from /proc: a process tree, or everything in a PID namespace but some units."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

HZ = os.sysconf("SC_CLK_TCK")


def _stat(pid: int, proc: Path) -> tuple[int, float, float] | None:
    """(ppid, own CPU seconds, CPU seconds of its reaped children) of PID, None if gone."""
    try:
        text = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    rest = text[text.rindex(")") + 2:].split()   # fields from 3 (state) on
    ppid = int(rest[1])
    own = (int(rest[11]) + int(rest[12])) / HZ                # utime, stime
    reaped = (int(rest[13]) + int(rest[14])) / HZ             # cutime, cstime
    return ppid, own, reaped


def _pids(proc: Path) -> list[int]:
    return [int(name) for name in os.listdir(proc) if name.isdigit()]


def tree_cpu(root: int, proc: Path = Path("/proc")) -> float:
    """CPU seconds of ROOT and all its live descendants, each with its reaped children:
    a live child counts once (itself), an exited one once (in its parent's cutime)."""
    stats = {pid: s for pid in _pids(proc) if (s := _stat(pid, proc)) is not None}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            _, own, reaped = stats[pid]
            total += own + reaped
        todo += children.get(pid, [])
    return total


def _unit_of(pid: int, proc: Path) -> str:
    """The last component of PID's systemd cgroup (its unit or scope), '' if unknown."""
    try:
        lines = (proc / str(pid) / "cgroup").read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers in ("name=systemd", ""):
            return path.rstrip("/").rsplit("/", 1)[-1]
    return ""


def namespace_cpu(exclude_units: Iterable[str], proc: Path = Path("/proc")) -> float:
    """CPU seconds of every live process this /proc shows (and of its reaped children), but
    those in EXCLUDE_UNITS: inside a sandbox, what systemd, the agent, its probes and its
    session children spent, without the apps' own workers."""
    excluded = set(exclude_units)
    total = 0.0
    for pid in _pids(proc):
        if excluded and _unit_of(pid, proc) in excluded:
            continue
        stat = _stat(pid, proc)
        if stat is not None:
            total += stat[1] + stat[2]
    return total
