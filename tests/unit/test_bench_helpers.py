"""Pure helpers of tests/bench/bench9.py and tests/bench/cpu.py: the table and /proc CPU sums."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from tests.bench.bench9 import Row, percentile
from tests.bench.cpu import namespace_cpu, tree_cpu


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


def test_tree_cpu_counts_a_reaped_child_once() -> None:
    before = tree_cpu(os.getpid())
    subprocess.run([sys.executable, "-c",
                    "import time\nt = time.process_time()\n"
                    "while time.process_time() - t < 0.3: pass"], check=True)
    spent = tree_cpu(os.getpid()) - before
    assert 0.25 <= spent < 1.0
    assert namespace_cpu(()) >= tree_cpu(os.getpid())


def test_tree_cpu_counts_a_live_child() -> None:
    child = subprocess.Popen([sys.executable, "-c",
                              "import time\nt = time.process_time()\n"
                              "while time.process_time() - t < 0.3: pass\n"
                              "time.sleep(30)"])
    try:
        deadline = time.monotonic() + 10
        while tree_cpu(child.pid) < 0.25 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert tree_cpu(os.getpid()) >= tree_cpu(child.pid) >= 0.25
    finally:
        child.kill()       # our own child, by its PID
        child.wait()
