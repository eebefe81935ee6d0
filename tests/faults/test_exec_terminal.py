"""TIOCSTI from the command agentctl exec/upgrade runs reaches nothing (real pty, real kernel)."""

from __future__ import annotations

import os
import sys

import pytest

from tests.conftest import skip_or_fail
from tests.faults.terminal import first_line_after, injector_argv

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# What agentctl exec does once the plan is made: run_exec as uid 65534 (nobody).
RUN_EXEC = """
import sys
from agent.unitexec import ExecPlan, run_exec
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
