"""The skip rule that cannot be lost: as root or under CI, a skipped test fails the run."""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest


def must_run() -> bool:
    """True where every test can run: as root (what `.ci/run` needs anyway) or with CI set."""
    # Read at call time, so neither a dropped CI variable (`sudo` resets the environment)
    # nor an import-time snapshot can turn a real failure into a quiet skip.
    in_ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    return in_ci or os.geteuid() == 0


def skip_or_fail(reason: str) -> None:
    """Skip with a clear reason as a normal user outside CI; as root or in CI, fail."""
    if must_run():
        pytest.fail(f"this test must run here (root or CI=true) but cannot: {reason}",
                    pytrace=False)
    pytest.skip(reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]
                              ) -> Generator[None, Any, None]:
    """A skip that did not go through skip_or_fail (a bare pytest.skip) fails as root or in CI."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and must_run():
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = (f"skipped while running as root or with CI=true ({reason}); "
                           "every test must run here: install what it needs (.ci/setup)")


def pytest_collectreport(report: pytest.CollectReport) -> None:
    """A module skipped at collection (importorskip) is a failure too where tests must run."""
    if report.skipped and must_run():
        report.outcome = "failed"
        report.longrepr = f"module skipped while running as root or with CI=true: {report.longrepr}"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Backstop: any skip left in the stats (from any hook order) makes the run fail."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter is not None else 0
    if skipped and must_run() and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        if reporter is not None:
            reporter.write_line(f"{skipped} test(s) skipped while running as root or with "
                                "CI=true: the run fails", red=True)
