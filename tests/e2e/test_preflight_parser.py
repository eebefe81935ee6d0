"""The SQL parser child for real: hostile SQL costs one revision its analysis, never root.

The SQL a migration renders is written by the app's code. pglast 8.8 (libpg_query) is C:
``SELECT 1+1+...`` with 50,000 terms (100 kB, inside the preflight's 200,000-character bound
per revision) kills the process that parses it with SIGSEGV. These tests run the real child
(parse.py + sqlchild.py) and look at it from outside, through /proc.
"""

from __future__ import annotations

import os
import pwd
import resource
import signal
import subprocess
import sys
import tempfile
from pathlib import Path


from agent.preflight.parse import CRASHED, TIMED_OUT, UNCHECKED, ParseLimits, analyze_all
from tests.skiprule import skip_or_fail

REPO = Path(__file__).resolve().parents[2]
INDEX = "BEGIN;\nCREATE INDEX ix ON items (email);\nCOMMIT;\n"
DROP = "BEGIN;\nALTER TABLE items DROP COLUMN email;\nCOMMIT;\n"
SEGFAULT = "SELECT " + "1+" * 50_000 + "1;"                    # 100 kB: pglast segfaults
NESTED = "SELECT " + "(" * 100_000 + "1" + ")" * 100_000 + ";"  # 200 kB of nesting
IN_LIST = "SELECT 1 WHERE a IN (" + ",".join(["1"] * 100_000) + ");"  # 2 s of CPU or so
MANY = "CREATE INDEX ix ON items (email);\n" * 5_000           # 5,000 statements


def need_root() -> None:
    if os.geteuid() != 0:
        skip_or_fail("dropping to another user needs root")


def status_of(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def test_the_parser_does_not_run_as_root() -> None:
    need_root()
    seen: list[tuple[dict[str, str], str]] = []
    www = pwd.getpwnam("www-data")
    nobody = pwd.getpwnam("nobody")
    analyses = analyze_all([INDEX], "www-data",
                           on_ready=lambda pid: seen.append((status_of(pid),
                                                             os.readlink(f"/proc/{pid}/root"))))
    assert [h.rule for h in analyses[0].hazards] == ["require-concurrent-index-creation"]
    (status, root), = seen
    assert status["Uid"].split() == [str(www.pw_uid)] * 4
    assert status["Gid"].split() == [str(www.pw_gid)] * 4
    assert status["Groups"] == ""                       # no supplementary groups
    assert status["CapEff"] == status["CapPrm"] == "0" * 16
    assert status["NoNewPrivs"] == "1"
    assert root.startswith(f"{tempfile.gettempdir()}/driftwatch-parse-")  # chroot: an empty
    assert not Path(root).exists()  # directory root made for it, removed once it is gone
    seen.clear()
    analyze_all([INDEX], "", on_ready=lambda pid: seen.append((status_of(pid), "")))
    assert seen[0][0]["Uid"].split() == [str(nobody.pw_uid)] * 4  # no User=: nobody


def test_hostile_sql_costs_its_revision_an_analysis_and_root_nothing() -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    analyses = analyze_all([INDEX, SEGFAULT, NESTED, IN_LIST, MANY, DROP], "www-data")
    index, crashed, nested, in_list, many, drop = analyses
    assert [h.rule for h in index.hazards] == ["require-concurrent-index-creation"]
    assert crashed.error == f"{CRASHED} (killed by SIGSEGV): {UNCHECKED}"
    assert crashed.statements == () and crashed.hazards == ()
    assert nested.error.startswith("PostgreSQL's parser rejects the SQL: memory exhausted")
    assert in_list.error == "" and in_list.statements == ()   # a SELECT locks nothing
    assert len(many.statements) == 5_000 and len(many.hazards) == 5_000
    # The revision after the crash is parsed by a fresh child, as if nothing happened.
    assert [h.rule for h in drop.hazards] == ["ban-drop-column"]
    # Root's process parsed none of it: its peak memory did not grow by the parse's.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 20_000  # KiB


def test_root_survives_what_kills_an_in_process_parse() -> None:
    """The reproduction (pglast in the agent's own process) dies; the agent's plan does not,
    and never even loads pglast."""
    in_process = subprocess.run(
        [sys.executable, "-c", "import sys; from agent.preflight.rules import analyze; "
         "analyze(sys.stdin.read())"], input=SEGFAULT, text=True, cwd=REPO,
        capture_output=True, timeout=120)
    assert in_process.returncode == -signal.SIGSEGV
    agent = subprocess.run(
        [sys.executable, "-c", "import sys\n"
         "from agent.preflight.plan import assemble\n"
         "from agent.preflight.probe import OfflineResult, OfflineRevision\n"
         "from agent.preflight.live import LiveState\n"
         "offline = OfflineResult(True, revisions=(OfflineRevision('r2', 'r1', sql=sys.stdin"
         ".read()),), urls={'default': 'postgresql://h/d'}, user='www-data')\n"
         "plan = assemble('u', ('r1',), ('r2',), offline, lambda *a, **k: LiveState())\n"
         "print(plan.revisions[0].level, plan.revisions[0].reason)\n"
         "print('pglast' in sys.modules)\n"],
        input=SEGFAULT, text=True, cwd=REPO, capture_output=True, timeout=120)
    assert agent.returncode == 0, agent.stderr
    level_reason, loaded = agent.stdout.splitlines()
    assert level_reason == f"high {CRASHED} (killed by SIGSEGV): {UNCHECKED}"
    assert loaded == "False"


def limits_of(pid: int) -> dict[str, str]:
    """/proc/PID/limits: limit name -> soft value."""
    lines = Path(f"/proc/{pid}/limits").read_text().splitlines()[1:]
    return {line[:26].strip(): line[26:47].strip() for line in lines}


def test_memory_is_bounded_per_revision() -> None:
    seen: list[dict[str, str]] = []
    small = ParseLimits(memory_bytes=40 * 2**20)
    first, second, after = analyze_all([IN_LIST, MANY, DROP], "www-data", small,
                                       on_ready=lambda pid: seen.append(limits_of(pid)))
    assert seen[0]["Max address space"] == str(40 * 2**20)
    assert seen[0]["Max processes"] == seen[0]["Max file size"] == "0"
    # Over RLIMIT_AS, whichever layer notices: Python (MemoryError), libpg_query ("out of
    # memory"), or libpg_query's FATAL exit(1). Each is that revision's error, nothing more.
    for over in (first, second):
        assert "memory" in over.error or over.error.startswith(CRASHED), over.error
        assert over.error.endswith(UNCHECKED) or "memory" in over.error
    assert [h.rule for h in after.hazards] == ["ban-drop-column"]


def test_cpu_is_bounded_per_revision() -> None:
    big_list = "SELECT 1 WHERE a IN (" + ",".join(["1"] * 500_000) + ");"  # 4 s of CPU
    out_of_cpu, after = analyze_all([big_list, DROP], "www-data", ParseLimits(cpu_seconds=1))
    assert out_of_cpu.error == f"{TIMED_OUT} (more than 1 s of CPU): {UNCHECKED}"
    assert [h.rule for h in after.hazards] == ["ban-drop-column"]


def test_a_stopped_parser_times_out_and_root_does_not_wait_for_it() -> None:
    stopped: list[int] = []

    def stop_first(pid: int) -> None:
        if not stopped:  # the unit's user can stop its own processes: this one too
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)

    hung, after = analyze_all([IN_LIST, DROP], "www-data",
                              ParseLimits(revision_seconds=1.0), on_ready=stop_first)
    assert hung.error == f"{TIMED_OUT}: {UNCHECKED}"
    assert [h.rule for h in after.hazards] == ["ban-drop-column"]
    assert not Path(f"/proc/{stopped[0]}").exists()  # killed (a stopped process too), reaped


def test_hard_limits_inherited_from_the_agent_do_not_stop_the_child() -> None:
    """A unit's LimitCPU=/LimitAS= are hard limits the dropped child cannot raise: it stays
    within them instead of failing to confine itself."""

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_CPU, (300, 300))
        resource.setrlimit(resource.RLIMIT_AS, (2**30, 2**30))

    code = ("from agent.preflight.parse import analyze_all\n"
            "print([a.error or [h.rule for h in a.hazards] for a in "
            "analyze_all(['DROP TABLE x;'], 'www-data')])\n")
    run = subprocess.run([sys.executable, "-c", code], preexec_fn=limited, cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert run.stdout.strip() == "[['ban-drop-table']]", run.stdout + run.stderr
