"""Run a unit's command apart from root's terminal: new session, own scope, fresh pty.

A process that shares a controlling terminal can push keystrokes into it (TIOCSTI), so
app code (env.py, migrations, anything `agentctl exec` runs) never gets root's terminal:
it runs in a new session (setsid) and, when agentctl talks to a terminal, on a fresh
pseudo-terminal whose bytes agentctl relays, as `su --pty`, sudo's use_pty and run0 do.
Every descriptor above 2 is closed. It runs in a transient scope of its own, so whatever
it leaves behind (a daemonised child included) is stopped when it ends; where no scope can
be made (no systemd, not root), its session and process group are killed instead.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import select
import signal
import struct
import subprocess
import sys
import termios
import time
import tty
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LAUNCHER = Path(__file__).with_name("exec_launcher.py")
# The launcher runs as root before the drop: never with the unit's environment.
LAUNCHER_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"}
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
# How long leftovers get between SIGTERM and SIGKILL.
LEFTOVER_GRACE_SECONDS = 2.0
# How long output is still relayed once the command has exited.
DRAIN_SECONDS = 1.0


class SessionError(Exception):
    """The command could not be started apart from agentctl's terminal."""


@dataclass(frozen=True)
class Launch:
    """What the launcher needs: who, where, what, with which environment."""

    program: str
    argv: tuple[str, ...]
    env: dict[str, str]
    cwd: str
    drop: dict[str, Any]
    cwd_message: str      # "cannot enter DIR as USER", already masked
    exec_message: str     # "cannot run PROG as USER", already masked
    label: str            # for the scope's Description

    def as_json(self, controlling_tty: bool) -> bytes:
        """The plan the launcher reads on its descriptor."""
        return json.dumps({"program": self.program, "argv": list(self.argv), "env": self.env,
                           "cwd": self.cwd, "drop": self.drop, "cwd_message": self.cwd_message,
                           "exec_message": self.exec_message,
                           "controlling_tty": controlling_tty}).encode()


@dataclass(frozen=True)
class Finished:
    """How it ended: exit code (128+N for signal N), leftovers stopped, where it ran."""

    returncode: int
    leftovers: int
    scope: str  # "" when no scope could be made (the session was killed instead)
    timed_out: bool = False  # stopped by agentctl at the overall deadline


# -- scope (systemd) ------------------------------------------------------------------------

class Scope:
    """A transient scope holding one process tree; stop() ends whatever is left in it."""

    def __init__(self, systemd: Any, name: str) -> None:
        self.systemd, self.name = systemd, name

    @classmethod
    def create(cls, systemd: Any, pid: int, label: str) -> Scope | None:
        """Put pid in a new transient scope; None when systemd refuses or is unreachable."""
        if systemd is None:
            return None
        from pystemd.dbuslib import apply_signature
        from pystemd.systemd1.unit_signatures import signature_array

        name = f"driftwatch-exec-{pid}.scope"
        args = apply_signature(b"ss", [name.encode(), b"fail"])
        args += signature_array({
            b"Description": f"driftwatch: {label}".encode(),
            b"CollectMode": b"inactive-or-failed",
            b"TimeoutStopUSec": int(LEFTOVER_GRACE_SECONDS * 1e6),
            b"_custom": (b"PIDs", b"au", [pid]),
        })
        args += [(ord(b"a"), b"(sa(sv))"), (-1, None)]
        try:
            bus = systemd.bus
            bus.call_method(b"org.freedesktop.systemd1", b"/org/freedesktop/systemd1",
                            b"org.freedesktop.systemd1.Manager", b"StartTransientUnit", args)
        except Exception as exc:  # no systemd, not root, policy: fall back to the session
            log.debug("no scope for %s: %s", label, exc)
            return None
        return cls(systemd, name)

    def pids(self) -> list[int]:
        """The processes still in the scope (from its cgroup)."""
        try:
            path = self.systemd._call(
                b"/org/freedesktop/systemd1", b"org.freedesktop.systemd1.Manager",
                b"GetUnit", b"s", [self.name.encode()])
            cgroup = self.systemd._call(
                path, b"org.freedesktop.DBus.Properties", b"Get", b"ss",
                [b"org.freedesktop.systemd1.Scope", b"ControlGroup"])
        except Exception:  # already gone: empty scopes stop by themselves
            return []
        cg = cgroup.decode() if isinstance(cgroup, bytes) else str(cgroup)
        for root in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup/systemd", "/sys/fs/cgroup"):
            procs = Path(root + cg) / "cgroup.procs"
            with contextlib.suppress(OSError, ValueError):
                return [int(p) for p in procs.read_text().split()]
        return []

    def stop(self) -> int:
        """Stop the scope (SIGTERM, SIGKILL after the grace); returns how many were left."""
        left = self.pids()
        if not left:
            return 0
        with contextlib.suppress(Exception):
            self.systemd._call(b"/org/freedesktop/systemd1", b"org.freedesktop.systemd1.Manager",
                               b"StopUnit", b"ss", [self.name.encode(), b"replace"])
        deadline = time.monotonic() + LEFTOVER_GRACE_SECONDS + 3
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in self.pids():  # systemd did not manage: do it ourselves
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        return len(left)


# -- session fallback ------------------------------------------------------------------------

def session_members(sid: int, proc: Path = Path("/proc")) -> list[int]:
    """PIDs whose session id is sid (field 6 of /proc/PID/stat)."""
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # comm may hold spaces and parentheses: the fields start after the last ')'.
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 3 and int(fields[3]) == sid:
            members.append(int(entry.name))
    return members


def kill_session(sid: int) -> int:
    """SIGKILL every process left in session sid (and its process group); returns count."""
    left = session_members(sid)
    for pid in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        os.killpg(sid, signal.SIGKILL)
    return len(left)


# -- terminal ---------------------------------------------------------------------------------

def _copy_winsize(src: int, dst: int) -> None:
    with contextlib.suppress(OSError):
        size = fcntl.ioctl(src, termios.TIOCGWINSZ, struct.pack("HHHH", 0, 0, 0, 0))
        fcntl.ioctl(dst, termios.TIOCSWINSZ, size)


@contextlib.contextmanager
def _raw(fd: int | None) -> Iterator[None]:
    """fd's terminal in raw mode (keys go to the pty as typed), restored after."""
    if fd is None:
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSAFLUSH, saved)


@contextlib.contextmanager
def _forward_signals(pid_getter: Callable[[], int]) -> Iterator[None]:
    """Signals sent to agentctl go to the command's process group instead."""
    def forward(signum: int, _frame: object) -> None:
        pid = pid_getter()
        if pid:
            with contextlib.suppress(OSError):
                os.killpg(pid, signum)

    saved = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        try:
            data = data[os.write(fd, data):]
        except InterruptedError:
            continue


# -- running ------------------------------------------------------------------------------------

class Session:
    """One command in its own session (and scope), its stdio given by the caller."""

    def __init__(self, launch: Launch, systemd: Any, stdin: int | None, stdout: int | None,
                 stderr: int | None, controlling_tty: bool) -> None:
        plan_r, plan_w = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-B", str(LAUNCHER), str(plan_r)],
                stdin=stdin, stdout=stdout, stderr=stderr, env=LAUNCHER_ENV, cwd="/",
                close_fds=True, pass_fds=(plan_r,), start_new_session=True)
        except OSError as exc:
            os.close(plan_w)
            raise SessionError(f"cannot start the command: {exc.strerror or exc}") from None
        finally:
            os.close(plan_r)
        # The launcher waits for the plan: it is in the scope before anything of the app runs.
        self.scope = Scope.create(systemd, self.proc.pid, launch.label)
        with os.fdopen(plan_w, "wb") as pipe:
            with contextlib.suppress(BrokenPipeError):
                pipe.write(launch.as_json(controlling_tty))

        self.timed_out = False

    def finish(self) -> Finished:
        """Wait for the command, then stop whatever it left behind."""
        code = self.proc.wait()
        leftovers = self.scope.stop() if self.scope is not None else 0
        leftovers += kill_session(self.proc.pid)  # the fallback, and setsid-less stragglers
        return Finished(code if code >= 0 else 128 - code, leftovers,
                        self.scope.name if self.scope else "", self.timed_out)

    def stop_at(self, deadline: float | None) -> Callable[[], None]:
        """A check for the relay loop: past deadline, SIGTERM the command's process group,
        and SIGKILL it LEFTOVER_GRACE_SECONDS later."""
        state = {"termed": 0.0}

        def check() -> None:
            now = time.monotonic()
            if deadline is None or now < deadline or self.proc.poll() is not None:
                return
            sig = signal.SIGTERM
            if state["termed"]:
                if now - state["termed"] < LEFTOVER_GRACE_SECONDS:
                    return
                sig = signal.SIGKILL
            else:
                state["termed"] = now
            self.timed_out = True
            with contextlib.suppress(OSError):
                os.killpg(self.proc.pid, sig)
        return check


def std_ttys() -> tuple[bool, bool, bool]:
    """Which of stdin, stdout, stderr are terminals."""
    return tuple(os.isatty(fd) for fd in (0, 1, 2))  # type: ignore[return-value]


def run_interactive(launch: Launch, systemd: Any) -> Finished:
    """exec: the command gets a fresh pty for each of stdin/stdout/stderr that is a terminal
    here (the rest is handed over as is) and agentctl relays the bytes."""
    ttys = std_ttys()
    if not any(ttys):
        session = Session(launch, systemd, None, None, None, controlling_tty=False)
        with _forward_signals(lambda: session.proc.pid):
            return session.finish()
    master, slave = os.openpty()
    here = 0 if ttys[0] else (1 if ttys[1] else 2)
    with contextlib.suppress(termios.error):
        termios.tcsetattr(slave, termios.TCSANOW, termios.tcgetattr(here))
    _copy_winsize(here, slave)
    try:
        session = Session(launch, systemd, slave if ttys[0] else None,
                          slave if ttys[1] else None, slave if ttys[2] else None,
                          controlling_tty=ttys[0])
    finally:
        os.close(slave)
    out = 1 if ttys[1] else 2
    old_winch = signal.signal(signal.SIGWINCH, lambda *_: _copy_winsize(here, master))
    try:
        with _raw(0 if ttys[0] else None), _forward_signals(lambda: session.proc.pid):
            _relay(master, 0 if ttys[0] else None, lambda data: _write_all(out, data),
                   session.proc)
        return session.finish()
    finally:
        signal.signal(signal.SIGWINCH, old_winch)
        os.close(master)


def run_output(launch: Launch, systemd: Any, on_output: Callable[[bytes], None],
               use_pty: bool, timeout: float | None = None) -> Finished:
    """upgrade: stdin from /dev/null, stdout and stderr merged to on_output, through a fresh
    pty when use_pty (agentctl talks to a terminal) else a pipe; never agentctl's terminal."""
    if use_pty:
        reader, writer = os.openpty()
    else:
        reader, writer = os.pipe()
    try:
        session = Session(launch, systemd, subprocess.DEVNULL, writer, writer,
                          controlling_tty=False)
    finally:
        os.close(writer)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        with _forward_signals(lambda: session.proc.pid):
            _relay(reader, None, on_output, session.proc, session.stop_at(deadline))
        return session.finish()
    finally:
        os.close(reader)


def _relay(source: int, keys: int | None, sink: Callable[[bytes], None],
           proc: subprocess.Popen[bytes], tick: Callable[[], None] = lambda: None) -> None:
    """Copy source -> sink (and keys -> source) until the command has exited and its
    output is drained; leftovers holding the pty open do not keep agentctl waiting."""
    watch = [source] + ([keys] if keys is not None else [])
    exited_at = 0.0
    while True:
        tick()
        exited = proc.poll() is not None
        if exited and not exited_at:
            exited_at = time.monotonic()
        if exited and time.monotonic() - exited_at > DRAIN_SECONDS:
            return  # a leftover keeps writing: it is stopped next, not waited for
        try:
            ready, _, _ = select.select(watch, [], [], 0.05 if exited else 0.2)
        except InterruptedError:
            continue
        if source in ready:
            try:
                data = os.read(source, 65536)
            except OSError as exc:
                if exc.errno != errno.EIO:  # EIO: every holder of the pty slave is gone
                    raise
                data = b""
            if not data:
                return
            sink(data)
            continue
        if keys is not None and keys in ready:
            try:
                data = os.read(keys, 65536)
            except OSError:  # our terminal hung up: the command reads no more from it
                data = b""
            if data:
                _write_all(source, data)
            else:
                watch.remove(keys)
                keys = None
            continue
        if exited:  # nothing more within the drain window
            return
