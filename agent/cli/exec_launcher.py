"""The first process of `agentctl exec`/`upgrade`: stdlib only, run as `python -I -S FILE FD`.

agentctl starts it as root in a new session (setsid) with a minimal environment, puts it in
its own transient scope, then sends the plan as JSON on descriptor FD: waiting for the plan
is what guarantees nothing of the app runs before the scope holds it. It then takes the
fresh pseudo-terminal on stdin as controlling terminal (when given one), becomes the unit's
user, enters the app directory as that user, closes every descriptor above 2 and execs the
command with the unit's environment (which never reached a root process before).
"""

import fcntl
import json
import os
import sys
import termios

EXIT_EXEC_FAILED, EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND = 125, 126, 127


def fail(message: str, code: int) -> None:
    """One line on stderr (the command's own stderr: the pty or agentctl's), then exit."""
    os.write(2, f"agentctl: {message}\n".encode("utf-8", "replace"))
    os._exit(code)


def read_plan(fd: int) -> dict:
    """The plan agentctl sends once the scope exists; empty means agentctl gave up."""
    chunks = []
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    if not chunks:
        os._exit(EXIT_EXEC_FAILED)
    return json.loads(b"".join(chunks))


def main() -> None:
    """Read the plan, take the terminal, drop privileges, enter the directory, exec."""
    plan = read_plan(int(sys.argv[1]))
    if plan["controlling_tty"]:
        # We are a session leader without a terminal: the fresh pty becomes ours.
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    drop = plan["drop"]
    if drop:
        # Groups first, then gid, then uid: the only order that works.
        os.setgroups(drop["extra_groups"])
        os.setresgid(drop["group"], drop["group"], drop["group"])
        os.setresuid(drop["user"], drop["user"], drop["user"])
    try:
        os.chdir(plan["cwd"])  # after the drop, so it fails as it would for the unit's user
    except OSError as exc:
        fail(f"{plan['cwd_message']}: {exc.strerror or exc}", EXIT_EXEC_FAILED)
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    try:
        os.execve(plan["program"], plan["argv"], plan["env"])
    except OSError as exc:
        fail(f"{plan['exec_message']}: {exc.strerror or exc}",
             EXIT_NOT_FOUND if isinstance(exc, FileNotFoundError) else EXIT_NOT_EXECUTABLE)


if __name__ == "__main__":
    main()
