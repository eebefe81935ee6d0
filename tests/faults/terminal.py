"""A real terminal for tests: a shell on a fresh pty (pty.fork), driven like a person would."""

from __future__ import annotations

import os
import pty
import select
import shlex
import time

# Run as the unit's user: pushes "echo INJECTED" + newline into every terminal it can reach
# (its controlling terminal via /dev/tty, and stdin/stdout/stderr), and says how it went.
INJECTOR = r"""
import fcntl, os, termios
fds, notes = [], []
try:
    fds.append(("/dev/tty", os.open("/dev/tty", os.O_RDWR)))
except OSError as e:
    notes.append(f"/dev/tty:{e.strerror}")
fds += [("fd0", 0), ("fd1", 1), ("fd2", 2)]
for name, fd in fds:
    try:
        for ch in b"INJECTED\n":
            fcntl.ioctl(fd, termios.TIOCSTI, bytes([ch]))
        notes.append(f"{name}:pushed")
    except OSError as e:
        notes.append(f"{name}:{e.strerror}")
print("injector", os.getuid(), os.getsid(0), " ".join(notes), flush=True)
"""


def injector_argv(python: str = "/usr/bin/python3") -> list[str]:
    """argv of the injector."""
    return [python, "-c", INJECTOR]


def first_line_after(command: list[str], env: dict[str, str] | None = None,
                     timeout: float = 60) -> tuple[str, str]:
    """Run command on a shell's terminal, then type 'clean' + Enter once it has ended.

    Returns (the first line the shell read from its terminal afterwards, the transcript).
    If the command pushed keystrokes into the shell's terminal, the shell reads those first.
    """
    script = (f"{shlex.join(command)}; echo COMMAND-DONE:$?; read line; "
              "echo FIRST-LINE:$line")
    pid, master = pty.fork()
    if pid == 0:  # pragma: no cover - the child
        os.execve("/bin/sh", ["sh", "-c", script],
                  env or {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "TERM": "dumb"})
    transcript = b""
    typed = False
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the shell is gone
                    break
                if not data:
                    break
                transcript += data
            if not typed and b"COMMAND-DONE:" in transcript:
                time.sleep(0.3)  # anything injected is in the queue by now
                os.write(master, b"clean\n")
                typed = True
            if b"FIRST-LINE:" in transcript and transcript.endswith(b"\n"):
                break
    finally:
        os.close(master)
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
    text = transcript.decode("utf-8", "replace").replace("\r", "")
    first = ""
    for line in text.splitlines():
        if line.startswith("FIRST-LINE:"):
            first = line.split(":", 1)[1]
    return first, text
