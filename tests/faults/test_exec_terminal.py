"""TIOCSTI from the command agentctl exec/upgrade runs reaches nothing (real pty, real kernel)."""

from __future__ import annotations

import os
import pty
import select
import sys
import time

import pytest

from tests.conftest import skip_or_fail
from tests.faults.terminal import first_line_after, injector_argv

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# What agentctl exec does once the plan is made: run_exec as uid 65534 (nobody).
RUN_EXEC = """
import sys
from agent.cli.unitexec import ExecPlan, run_exec
plan = ExecPlan(unit="t.service", argv=tuple(sys.argv[1:]), cwd="/",
                env={"PATH": "/usr/bin:/bin"}, user="nobody", uid=65534,
                drop={"user": 65534, "group": 65534, "extra_groups": []})
sys.exit(run_exec(plan).returncode)
"""
RUN_CAPTURED = RUN_EXEC.replace("run_exec(plan).returncode",
                                "run_captured(plan, on_line=print).returncode").replace(
    "import ExecPlan, run_exec", "import ExecPlan, run_captured")


@pytest.fixture
def as_root() -> None:
    """Dropping to nobody needs root."""
    if os.geteuid() != 0:
        skip_or_fail("dropping to another user needs root")


def test_sharing_the_terminal_lets_the_injection_through(as_root: None) -> None:
    # The control, and the bug of the first release: the command ran on root's terminal.
    first, transcript = first_line_after(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *injector_argv()])
    print(f"\nshared terminal: the shell's next line was {first!r}")
    if first != "INJECTED" and "fd0:pushed" not in transcript:
        skip_or_fail(f"TIOCSTI is refused on this kernel (dev.tty.legacy_tiocsti=0?), so "
                     f"nothing here can show it is kept out: {transcript}")
    assert first == "INJECTED", transcript


@pytest.mark.parametrize("runner", [RUN_EXEC, RUN_CAPTURED], ids=["exec", "upgrade-capture"])
def test_injection_from_the_command_reaches_nothing(as_root: None, runner: str) -> None:
    first, transcript = first_line_after([sys.executable, "-c", runner, *injector_argv()],
                                         env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                              "TERM": "dumb", "PYTHONPATH": REPO})
    print(f"\nthrough agentctl: the shell's next line was {first!r}")
    print(transcript)
    assert "injector 65534" in transcript  # the command did run, as nobody
    assert "COMMAND-DONE:0" in transcript
    assert first == "clean", transcript


def test_interactive_command_gets_its_keys_and_exit_code(as_root: None) -> None:
    # The relay in both directions: a prompt out, typed keys in, the exit code back.
    script = "printf 'name? '; read x; echo \"got:$x tty:$(tty)\"; exit 3"
    pid, master = pty.fork()
    if pid == 0:  # pragma: no cover - the child
        os.execve(sys.executable, [sys.executable, "-c", RUN_EXEC, "sh", "-c", script],
                  {"PATH": "/usr/bin:/bin", "TERM": "dumb", "PYTHONPATH": REPO})
    out = b""
    typed = False
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                data = os.read(master, 4096)
            except OSError:
                break
            if not data:
                break
            out += data
        if not typed and b"name? " in out:
            os.write(master, b"hello\r")
            typed = True
    os.close(master)
    _, status = os.waitpid(pid, 0)
    text = out.decode(errors="replace")
    print(f"\ninteractive: {text!r}, exit {os.waitstatus_to_exitcode(status)}")
    assert os.waitstatus_to_exitcode(status) == 3
    assert "got:hello tty:/dev/pts/" in text
