"""The skip rule: as root or with CI set, a skip (through the helper or bare) fails the run."""

from __future__ import annotations

import os

import pytest

from tests import skiprule

INNER = """
import pytest
from tests.skiprule import skip_or_fail

def test_helper():
    skip_or_fail("no frobnicator")

def test_bare():
    pytest.skip("bare skip")

@pytest.fixture
def needs_tool():
    skip_or_fail("tool missing")

def test_fixture_skip(needs_tool):
    pass

def test_passes():
    assert True
"""


def _run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, *, root: bool,
         ci: str | None) -> pytest.RunResult:
    monkeypatch.setattr(os, "geteuid", lambda: 0 if root else 1000)
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    pytester.makepyfile(test_inner=INNER)
    return pytester.runpytest_inprocess("-p", "tests.skiprule", "-p", "no:cacheprovider")


def test_as_root_without_ci_every_skip_fails(pytester: pytest.Pytester,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    result = _run(pytester, monkeypatch, root=True, ci=None)
    result.assert_outcomes(passed=1, failed=2, errors=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*must run here*no frobnicator*"])
    result.stdout.fnmatch_lines(["*skipped while running as root*bare skip*"])


def test_with_ci_as_a_user_every_skip_fails(pytester: pytest.Pytester,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    result = _run(pytester, monkeypatch, root=False, ci="true")
    result.assert_outcomes(passed=1, failed=2, errors=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_as_a_user_outside_ci_skips_are_skips(pytester: pytest.Pytester,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    result = _run(pytester, monkeypatch, root=False, ci="false")
    result.assert_outcomes(passed=1, skipped=3)
    assert result.ret == pytest.ExitCode.OK


@pytest.mark.parametrize(("root", "ci", "expected"), [
    (True, None, True), (True, "false", True), (False, "1", True), (False, "yes", True),
    (False, "TRUE", True), (False, None, False), (False, "0", False), (False, "", False)])
def test_must_run(monkeypatch: pytest.MonkeyPatch, root: bool, ci: str | None,
                  expected: bool) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0 if root else 1000)
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    assert skiprule.must_run() is expected


def test_ci_run_exports_ci_itself() -> None:
    text = open(os.path.join(os.path.dirname(__file__), "..", "..", ".ci", "run")).read()
    assert "\nexport CI=true\n" in text
    assert text.index("export CI=true") < text.index("pytest")


def test_ci_setup_installs_openssl() -> None:
    text = open(os.path.join(os.path.dirname(__file__), "..", "..", ".ci", "setup")).read()
    assert " openssl" in text
