"""Running processes of a unit through psutil: interpreter, venv, cwd, environment, start."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

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
    maps = [m.path for m in _safe(proc.memory_maps, [], errors, "memory maps", grouped=False)]
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


def unit_processes(main_pid: int, proc_root: str = "") -> list[ProcessInfo]:
    """The main process and all its descendants (gunicorn master and workers)."""
    if main_pid <= 0:
        return []
    try:
        master = psutil.Process(main_pid)
        children = master.children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    except psutil.AccessDenied:
        return [ProcessInfo(pid=main_pid, ppid=0, role="master", argv=(), exe="", cwd="",
                            create_time=0.0, username="", error="permission denied")]
    infos = [_process_info(master, "master", proc_root)]
    for child in children:
        try:
            infos.append(_process_info(child, "worker", proc_root))
        except psutil.NoSuchProcess:
            continue
    return infos
