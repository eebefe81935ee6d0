"""agent.privileged.sources.procs on real processes: the tree, the maps, and the memo of a steady state."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import psutil
import pytest

from agent.privileged.sources import procs

# A master with two workers that sleep: the shape of a gunicorn unit.
TREE = ("import subprocess, sys, time\n"
        "kids = [subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']) "
        "for _ in range(2)]\n"
        "print('ready', flush=True)\n"
        "kids[0].wait(); kids[1].wait()\n")  # reaps a killed worker, as gunicorn does


@pytest.fixture
def tree() -> Iterator[subprocess.Popen[str]]:
    master = subprocess.Popen([sys.executable, "-c", TREE], stdout=subprocess.PIPE, text=True)
    assert master.stdout is not None and master.stdout.readline().strip() == "ready"
    try:
        yield master
    finally:
        for child in psutil.Process(master.pid).children(recursive=True):
            child.kill()   # our own grandchildren, by PID
        master.kill()
        master.wait()


def test_descendants_are_psutils_children(tree: subprocess.Popen[str]) -> None:
    expected = sorted(c.pid for c in psutil.Process(tree.pid).children(recursive=True))
    assert procs.descendants(tree.pid) == expected
    assert len(expected) == 2


def test_mapped_paths_are_memory_maps_without_anonymous_ones() -> None:
    pid = os.getpid()
    ours = procs.mapped_paths(pid)
    theirs = [m.path for m in psutil.Process(pid).memory_maps(grouped=False)
              if m.path and m.path != "[anon]"]
    assert ours == theirs
    assert any("python" in p for p in ours)


def test_steady_state_reads_each_process_once(tree: subprocess.Popen[str]) -> None:
    memo = procs.ProcessMemo()
    first = procs.unit_processes(tree.pid, memo=memo, unit="u")
    assert [p.role for p in first] == ["master", "worker", "worker"]
    assert memo.reads == 3
    assert procs.unit_processes(tree.pid, memo=memo, unit="u") == first
    assert memo.reads == 3   # nothing changed: nothing read again
    assert procs.unit_processes(tree.pid) == first   # the memo changes no answer


def test_a_new_worker_is_read_and_a_gone_one_forgotten(tree: subprocess.Popen[str]) -> None:
    memo = procs.ProcessMemo()
    first = procs.unit_processes(tree.pid, memo=memo, unit="u")
    gone = first[1].pid
    psutil.Process(gone).kill()
    deadline = time.monotonic() + 5
    while gone in (procs.descendants(tree.pid) or []) and time.monotonic() < deadline:
        time.sleep(0.05)  # the master has not reaped it yet
    after = procs.unit_processes(tree.pid, memo=memo, unit="u")
    assert gone not in {p.pid for p in after}
    assert memo.reads == 3
    assert set(memo.units["u"]) == {(p.pid, procs.start_ticks(p.pid)) for p in after}
    memo.forget("u")
    procs.unit_processes(tree.pid, memo=memo, unit="u")
    assert memo.reads == 3 + len(after)   # a restart seen: read again in full
