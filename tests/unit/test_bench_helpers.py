"""Helpers of tests/bench/bench9.py and tests/bench/cpu.py: the table and precise CPU sums."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.bench.bench9 import Row, percentile
from tests.bench.cpu import (OwnCgroup, descendants, parse_usage, rusage_seconds, split,
                             unified_root)
from tests.conftest import skip_or_fail


def test_row_prints_medians_ratio_range_and_target() -> None:
    row = Row("m", "flask db check", "<= 0.5x", " s", anchor_values=[4.0, 5.0, 6.0],
              ours_values=[2.0, 1.0, 3.0], ratios=[0.5, 0.2, 0.6])
    assert row.cells() == ("m", "flask db check: 5.00 s", "2.00 s", "0.50x [0.20-0.60]",
                           "<= 0.5x")
    skipped = Row("m", "a", "t", skipped="not root")
    assert skipped.cells()[2:4] == ("skipped", "not root")


def test_percentile_is_nearest_rank() -> None:
    assert percentile([5, 1, 4, 2, 3], 50) == 3
    assert percentile([1, 2, 3, 4], 50) == 2 and percentile([1, 2, 3, 4], 100) == 4


def test_parse_usage_reads_usage_usec() -> None:
    assert parse_usage("usage_usec 2816584\nuser_usec 2371197\nsystem_usec 445386\n") \
        == 2.816584
    with pytest.raises(ValueError):
        parse_usage("user_usec 1\n")


def test_split_subtracts_excluded_units_and_names_the_parts() -> None:
    before = {"": 10.0, "init.scope": 1.0, "system.slice": 8.0, "system.slice/app.service": 5.0,
              "system.slice/dbus.service": 0.5, "system.slice/driftwatch-session-app-1.service":
              0.2, "system.slice/gone.service": 0.1}
    after = {"": 10.5, "init.scope": 1.1, "system.slice": 8.4, "system.slice/app.service": 5.2,
             "system.slice/dbus.service": 0.52, "system.slice/driftwatch-session-app-1.service":
             0.25, "system.slice/driftwatch-probe-app-2.service": 0.03}
    parts = split(before, after, ["app.service"])
    assert parts["total"] == pytest.approx(0.3)           # 0.5 in all, 0.2 of it the app's
    assert parts["pid1"] == pytest.approx(0.1)
    assert parts["sessions"] == pytest.approx(0.05)
    assert parts["probes"] == pytest.approx(0.03)         # started meanwhile: counted whole
    assert parts["dbus"] == pytest.approx(0.02)
    assert parts["other"] == pytest.approx(0.3 - 0.1 - 0.05 - 0.03 - 0.02)


def test_rusage_counts_a_reaped_child_precisely() -> None:
    before = rusage_seconds()
    subprocess.run([sys.executable, "-c",
                    "import time\nt = time.process_time()\n"
                    "while time.process_time() - t < 0.3: pass"], check=True)
    assert 0.3 <= rusage_seconds() - before < 1.0


def test_own_cgroup_counts_a_tree_and_its_exited_children() -> None:
    """A real cgroup v2 group: a parent moved in with its live child; a child forked later
    and exited still counts (usage_usec keeps exited processes)."""
    if os.geteuid() != 0 or unified_root() is None:
        skip_or_fail("needs root and a cgroup v2 hierarchy")
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.2: pass\n"
    parent = subprocess.Popen([sys.executable, "-c",
                               "import subprocess, sys\n"
                               "kid = subprocess.Popen([sys.executable, '-c', 'import time; "
                               "time.sleep(30)'])\n"
                               "print(kid.pid, flush=True)\n"
                               "sys.stdin.readline()\n"
                               f"subprocess.run([sys.executable, '-c', {burn!r}])\n"
                               "kid.kill(); kid.wait()\n"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert parent.stdin and parent.stdout
    group = None
    try:
        kid = int(parent.stdout.readline())
        assert kid in descendants(parent.pid)
        group = OwnCgroup(f"driftwatch-test-{os.getpid()}", parent.pid)
        members = (group.path / "cgroup.procs").read_text().split()
        assert {str(parent.pid), str(kid)} <= set(members)
        before = group.cpu()
        parent.stdin.write("go\n")
        parent.stdin.flush()
        assert parent.wait(30) == 0
        assert 0.2 <= group.cpu() - before < 2.0
    finally:
        if parent.poll() is None:
            parent.kill()      # our own child, by its PID
            parent.wait()
        if group is not None:
            group.close()
            assert not group.path.exists()
