"""Running processes of a unit through psutil: interpreter, venv, cwd, environment, start.

Steady state: the process tree comes from /proc/PID/task/*/children (never a walk of every
process on the host), mapped files from /proc/PID/maps (smaps costs a page-table walk per
mapping and says nothing more we need), and a process already read at the same
(pid, start time) is not read again (ProcessMemo): only its cwd, which it can change itself.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import psutil

from agent.model import ProcessInfo

# ".../lib/python3.11/site-packages/..." -> the prefix before /lib/pythonX.Y is the venv.
SITE_PACKAGES = re.compile(r"^(?P<prefix>/.*?)/lib(?:64)?/python\d+(?:\.\d+)?/site-packages/")


def venv_from_maps(paths: Iterable[str]) -> str:
    """Pure: the prefix whose site-packages the process has mapped, most frequent first."""
    counts: dict[str, int] = {}
    for path in paths:
        match = SITE_PACKAGES.match(path)
        if match:
            prefix = match.group("prefix")
            counts[prefix] = counts.get(prefix, 0) + 1
    if not counts:
        return ""
    return max(counts.items(), key=lambda item: item[1])[0]


def venv_from_argv0(argv0: str) -> str:
    """Pure: '/srv/venv/bin/python3' -> '/srv/venv'; '' when argv0 is not under a bin/ dir."""
    parent = os.path.dirname(argv0)
    if os.path.basename(parent) == "bin" and os.path.isabs(argv0):
        return os.path.dirname(parent)
    return ""


def _process_info(proc: psutil.Process, role: str, proc_root: str) -> ProcessInfo:
    """Read one process; permission problems become an error text, never an exception."""
    errors = []
    with proc.oneshot():
        argv = tuple(_safe(proc.cmdline, [], errors, "cmdline"))
        exe = _safe(proc.exe, "", errors, "exe")
        cwd = _safe(proc.cwd, "", errors, "cwd")
        create_time = _safe(proc.create_time, 0.0, errors, "start time")
        username = _safe(proc.username, "", errors, "user")
        ppid = _safe(proc.ppid, 0, errors, "ppid")
    environ = _safe(proc.environ, None, errors, "environment")
    maps = _safe(mapped_paths, [], errors, "memory maps", pid=proc.pid, proc=psutil.PROCFS_PATH)
    venv, evidence = "", ""
    from_maps = venv_from_maps(maps)
    from_argv = venv_from_argv0(argv[0]) if argv else ""
    if from_argv and os.path.isfile(os.path.join(proc_root + from_argv, "pyvenv.cfg")):
        venv, evidence = from_argv, f"argv[0] {argv[0]}"
    elif from_maps:
        venv, evidence = from_maps, "site-packages mapped in memory"
    elif environ and environ.get("VIRTUAL_ENV"):
        venv, evidence = environ["VIRTUAL_ENV"], "VIRTUAL_ENV in the process environment"
    if from_argv and from_maps and os.path.realpath(from_argv) != os.path.realpath(from_maps):
        # The interpreter path says one venv but the loaded packages come from another.
        evidence += f"; site-packages mapped from {from_maps}"
    return ProcessInfo(
        pid=proc.pid, ppid=ppid, role=role, argv=argv, exe=exe, cwd=cwd,
        create_time=create_time, username=username,
        environ_names=frozenset(environ) if environ is not None else None,
        environ=environ, venv=venv or None, venv_evidence=evidence,
        error="; ".join(errors),
    )


def _safe(call, default, errors: list[str], what: str, **kwargs):  # type: ignore[no-untyped-def]
    try:
        return call(**kwargs)
    except psutil.AccessDenied:
        errors.append(f"{what}: permission denied")
    except psutil.ZombieProcess:
        errors.append(f"{what}: zombie")
    except psutil.NoSuchProcess:
        errors.append(f"{what}: process exited")
    except OSError as exc:
        errors.append(f"{what}: {exc.strerror or exc}")
    return default


def mapped_paths(pid: int, proc: str = "/proc") -> list[str]:
    """The path of every mapping of pid that has one, one per mapping (psutil's memory_maps
    grouped=False without its anonymous ones, and without smaps' page accounting)."""
    try:
        with open(f"{proc}/{pid}/maps", "rb") as f:
            data = f.read()
    except PermissionError:
        raise psutil.AccessDenied(pid) from None
    except (FileNotFoundError, ProcessLookupError):
        raise psutil.NoSuchProcess(pid) from None
    paths = []
    for line in data.split(b"\n"):
        # "addr perms offset dev inode   path": the path is the sixth field, may hold spaces.
        fields = line.split(None, 5)
        if len(fields) == 6:
            path = fields[5].decode("utf-8", "surrogateescape")
            paths.append(path[:-10] if path.endswith(" (deleted)") else path)
    return paths


def descendants(pid: int, proc: str = "/proc") -> list[int] | None:
    """Pids of pid's descendants, breadth first, each level by pid; None when the kernel
    has no /proc/PID/task/TID/children (CONFIG_PROC_CHILDREN) or pid is gone."""
    found: list[int] = []
    level = [pid]
    seen = {pid}
    while level:
        following: list[int] = []
        for parent in level:
            kids = _children_of(parent, proc)
            if kids is None:
                if parent == pid:
                    return None
                continue  # a child that exited meanwhile
            following += [k for k in kids if k not in seen]
            seen.update(kids)
        following.sort()
        found += following
        level = following
    return found


def _children_of(pid: int, proc: str) -> list[int] | None:
    try:
        tids = os.listdir(f"{proc}/{pid}/task")
    except OSError:
        return None
    kids: list[int] = []
    for tid in tids:
        try:
            with open(f"{proc}/{pid}/task/{tid}/children", "rb") as f:
                kids += [int(k) for k in f.read().split()]
        except FileNotFoundError:
            if tid == str(pid):
                return None  # no children file at all: CONFIG_PROC_CHILDREN is off
        except OSError:
            continue
    return kids


def _cwd(pid: int, proc: str) -> str:
    """/proc/PID/cwd as psutil's cwd() reads it (a " (deleted)" suffix dropped)."""
    path = os.readlink(f"{proc}/{pid}/cwd").split("\x00")[0]
    if path.endswith(" (deleted)") and not os.path.lexists(path):
        path = path[:-10]
    return path


def start_ticks(pid: int, proc: str = "/proc") -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22)."""
    try:
        with open(f"{proc}/{pid}/stat", "rb") as f:
            data = f.read()
        return int(data[data.rindex(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class ProcessMemo:
    """Per unit: what was read of each process, by (pid, start time); bounded to the
    processes seen at the unit's last read."""

    units: dict[str, dict[tuple[int, int], ProcessInfo]] = field(default_factory=dict)
    reads: int = 0   # full reads of a process (for tests and the benchmark)

    def forget(self, unit: str | None = None) -> None:
        """Read every process again next time (a restart was seen)."""
        if unit is None:
            self.units.clear()
        else:
            self.units.pop(unit, None)


def unit_processes(main_pid: int, proc_root: str = "", memo: ProcessMemo | None = None,
                   unit: str = "") -> list[ProcessInfo]:
    """The main process and all its descendants (gunicorn master and workers).

    memo: processes already read at the same pid and start time are taken from it (their
    cwd read again); the rest are read in full.
    """
    if main_pid <= 0:
        return []
    proc = psutil.PROCFS_PATH
    pids = descendants(main_pid, proc)
    try:
        master = psutil.Process(main_pid)
        children = master.children(recursive=True) if pids is None else None
    except psutil.NoSuchProcess:
        return []
    except psutil.AccessDenied:
        return [ProcessInfo(pid=main_pid, ppid=0, role="master", argv=(), exe="", cwd="",
                            create_time=0.0, username="", error="permission denied")]
    known = memo.units.get(unit, {}) if memo is not None else {}
    kept: dict[tuple[int, int], ProcessInfo] = {}

    def read(process: psutil.Process | int, role: str) -> ProcessInfo:
        pid = process if isinstance(process, int) else process.pid
        ticks = start_ticks(pid, proc)
        cached = known.get((pid, ticks)) if ticks is not None else None
        if cached is not None and cached.role == role:
            try:
                cwd = _cwd(pid, proc)
            except OSError:
                cached = None
            else:
                info = cached if cwd == cached.cwd else replace(cached, cwd=cwd)
        if cached is None:
            target = process if isinstance(process, psutil.Process) else psutil.Process(pid)
            info = _process_info(target, role, proc_root)
            if memo is not None:
                memo.reads += 1
        if ticks is not None and not info.error:
            kept[(pid, ticks)] = info
        return info

    infos = [read(master, "master")]
    for child in (children if children is not None else pids or []):
        try:
            infos.append(read(child, "worker"))
        except psutil.NoSuchProcess:
            continue
    if memo is not None:
        memo.units[unit] = kept
    return infos
