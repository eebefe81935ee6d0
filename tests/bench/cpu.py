"""Precise CPU seconds: cgroup v2 usage_usec (includes exited processes) and getrusage.

/proc/PID/stat counts in 10 ms ticks, too coarse for a 10 ms inspection; cgroup v2 `cpu.stat`
`usage_usec` and getrusage are kept by the scheduler in nanoseconds.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

SESSION_PREFIX = "driftwatch-session-"
PROBE_PREFIX = "driftwatch-probe-"


def unified_root(sys_fs_cgroup: Path = Path("/sys/fs/cgroup")) -> Path | None:
    """The cgroup v2 mount: /sys/fs/cgroup/unified on a hybrid host, else /sys/fs/cgroup."""
    for path in (sys_fs_cgroup / "unified", sys_fs_cgroup):
        if (path / "cgroup.procs").exists() and (path / "cpu.stat").exists():
            return path
    return None


def parse_usage(text: str) -> float:
    """CPU seconds from a cpu.stat text (its usage_usec line)."""
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "usage_usec":
            return int(value) / 1e6
    raise ValueError("cpu.stat without usage_usec")


def usage_seconds(cgroup: Path) -> float:
    """CPU seconds a cgroup and all its descendants (live or exited) spent; 0 if gone."""
    try:
        return parse_usage((cgroup / "cpu.stat").read_text())
    except FileNotFoundError:
        return 0.0


def usage_from_fd(fd: int) -> float:
    """CPU seconds from an open cpu.stat (re-read from offset 0: the kernel renders it anew)."""
    return parse_usage(os.pread(fd, 4096, 0).decode())


def rusage_seconds() -> float:
    """CPU seconds of this process and of its reaped children (getrusage, microseconds)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def snapshot(root: Path) -> dict[str, float]:
    """usage of ROOT ('') and of its cgroups two levels down ('init.scope', 'system.slice',
    'system.slice/x.service'): a systemd tree's scopes, slices and units."""
    found = {"": usage_seconds(root)}
    for top in _subdirs(root):
        found[top.name] = usage_seconds(top)
        for unit in _subdirs(top):
            found[f"{top.name}/{unit.name}"] = usage_seconds(unit)
    return found


def _subdirs(path: Path) -> list[Path]:
    try:
        return [p for p in path.iterdir() if p.is_dir()]
    except FileNotFoundError:
        return []


def split(before: Mapping[str, float], after: Mapping[str, float],
          exclude: Iterable[str]) -> dict[str, float]:
    """What a systemd tree spent between two snapshots, but the EXCLUDE units (names):
    'total', of which 'pid1' (init.scope), 'sessions' and 'probes' (driftwatch's transient
    units alive at the second snapshot; one that started meanwhile counts whole), 'dbus'
    (dbus-daemon) and 'other' (the rest, e.g. transient units that ended meanwhile)."""
    excluded = set(exclude)

    def delta(key: str) -> float:
        return max(0.0, after.get(key, 0.0) - before.get(key, 0.0))

    def units(prefix: str) -> float:
        return sum(delta(k) for k in after if "/" in k and k.rsplit("/", 1)[1].startswith(prefix))

    total = delta("") - sum(delta(k) for k in after
                            if "/" in k and k.rsplit("/", 1)[1] in excluded)
    parts = {"pid1": delta("init.scope"), "sessions": units(SESSION_PREFIX),
             "probes": units(PROBE_PREFIX), "dbus": delta("system.slice/dbus.service")}
    # Never below 0 but by rounding: every part is a cgroup inside the total.
    return {"total": total, **parts, "other": max(0.0, total - sum(parts.values()))}


def descendants(pid: int, proc: Path = Path("/proc")) -> list[int]:
    """PID's live descendants (from /proc/PID/task/*/children), parents before children."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop(0)
        try:
            tasks = list((proc / str(current) / "task").iterdir())
        except FileNotFoundError:
            continue
        for task in tasks:
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except (FileNotFoundError, ProcessLookupError):
                continue
            found += kids
            todo += kids
    return found


class OwnCgroup:
    """A cgroup v2 group of its own holding a process tree (its root moved first, so what it
    forks from then on is born inside), read for precise CPU including exited processes."""

    def __init__(self, name: str, root_pid: int) -> None:
        root = unified_root()
        if root is None:
            raise RuntimeError("no cgroup v2 hierarchy mounted")
        self.path = root / name
        self.path.mkdir(exist_ok=True)
        self.move(root_pid)
        for pid in descendants(root_pid):
            self.move(pid)

    def move(self, pid: int, sub: str = "") -> None:
        try:
            (self.path / sub / "cgroup.procs").write_text(str(pid))
        except ProcessLookupError:     # ended meanwhile: nothing left to count
            pass

    def split_off(self, sub: str, pids: Iterable[int]) -> Path:
        """A child group SUB holding PIDS (counted in this group's usage too); its path.
        (Without controllers enabled, cgroup v2 lets a group hold processes and children.)"""
        path = self.path / sub
        path.mkdir(exist_ok=True)
        for pid in pids:
            self.move(pid, sub)
        return path

    def cpu(self) -> float:
        return usage_seconds(self.path)

    def close(self) -> None:
        """rmdir the group (children first) once its processes are gone."""
        for _ in range(100):
            try:
                for sub in _subdirs(self.path):
                    sub.rmdir()
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.05)


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
