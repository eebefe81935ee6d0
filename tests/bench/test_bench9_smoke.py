"""The benchmark still runs end to end (tiny sizes): every row of #9's table gets numbers.

About 80 s on the 2-core machine, so collected only with DRIFTWATCH_LONG=1 (tests/bench/conftest.py):
    DRIFTWATCH_LONG=1 .venv/bin/python -m pytest tests/bench -q
"""

from __future__ import annotations

import pytest

from tests.bench import bench9
from tests.conftest import skip_or_fail

pytestmark = [pytest.mark.systemd, pytest.mark.postgres, pytest.mark.long]


@pytest.mark.timeout(600)
def test_every_row_is_measured(capsys: pytest.CaptureFixture[str]) -> None:
    reason = bench9.unavailable_reason()
    if reason:
        skip_or_fail(reason)
    if not bench9.NODE_EXPORTER.exists():
        skip_or_fail(f"{bench9.NODE_EXPORTER} missing: run .ci/setup")
    assert bench9.main(["--quick", "--units", "2", "--rounds", "1", "--models", "20",
                        "--inspections", "1", "--seconds", "0.5", "--sockets", "200"]) == 0
    out = capsys.readouterr().out
    table = [line for line in out.split("\n\n")[1].splitlines()[2:]
             if not line.startswith("- ")]
    assert len(table) == 8, out
    assert not [line for line in table if "skipped" in line], out
    assert "failed checks" not in out, out
