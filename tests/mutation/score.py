"""Print the mutation score: killed / non-equivalent mutants, survivors listed by name."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EQUIVALENT = Path(__file__).with_name("equivalent.txt")


def equivalent_mutants() -> dict[str, str]:
    """name -> why it cannot change behaviour (from equivalent.txt: 'name  # reason')."""
    out = {}
    for line in EQUIVALENT.read_text().splitlines():
        name, _, reason = line.partition("#")
        if name.strip():
            out[name.strip()] = reason.strip()
    return out


def survivors() -> list[str]:
    """Names of the mutants no test killed (mutmut's own results listing)."""
    text = subprocess.run([str(ROOT / ".venv/bin/mutmut"), "results"], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout
    return [line.split(":")[0].strip() for line in text.splitlines()
            if line.strip().endswith(("survived", "no tests"))]


def main() -> int:
    """Print the score; exit 1 below 80%."""
    stats = json.loads((ROOT / "mutants/mutmut-cicd-stats.json").read_text())
    equivalent = equivalent_mutants()
    left = survivors()
    eq_left = [m for m in left if m in equivalent]
    real_left = [m for m in left if m not in equivalent]
    killed = stats["killed"] + stats["timeout"] + stats["segfault"]
    considered = killed + len(real_left)
    score = 100.0 * killed / considered if considered else 100.0
    print(f"mutants: {stats['total']} generated, {killed} killed, {len(left)} survived "
          f"({len(eq_left)} equivalent, listed in tests/mutation/equivalent.txt), "
          f"{stats['suspicious']} suspicious")
    print(f"mutation score: {score:.1f}% of {considered} non-equivalent mutants killed")
    for name in real_left:
        print(f"  survived: {name}")
    return 0 if score >= 80.0 else 1


if __name__ == "__main__":
    sys.exit(main())
