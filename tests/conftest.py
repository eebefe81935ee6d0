"""Shared pytest fixtures: the real-systemd sandbox; the skip rule lives in tests/skiprule.py."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
from hypothesis import settings

from tests.harness.sandbox import Sandbox, sandbox_unavailable_reason
from tests.skiprule import must_run, skip_or_fail

pytest_plugins = ["tests.skiprule", "tests.harness.pg_fixtures", "tests.harness.app_fixtures",
                  "tests.harness.mariadb_fixtures",
                  "pytester"]

__all__ = ["must_run", "skip_or_fail"]

# Property-based tests: 300 examples each in normal runs; the mutation run (tests/mutation/run)
# selects the smaller "mutation" profile, since it repeats the tests once per mutant.
settings.register_profile("default", max_examples=300, deadline=None)
settings.register_profile("mutation", max_examples=40, deadline=None, derandomize=True,
                          database=None)
settings.load_profile(os.environ.get("DRIFTWATCH_HYPOTHESIS_PROFILE", "default"))


@pytest.fixture
def make_sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], Sandbox]]:
    """Factory for unbooted sandboxes; every one made is destroyed by PID after the test."""
    reason = sandbox_unavailable_reason()
    if reason:
        skip_or_fail(reason)
    made: list[Sandbox] = []

    def factory() -> Sandbox:
        sandbox = Sandbox(tmp_path_factory.mktemp("sandbox"))
        made.append(sandbox)
        return sandbox

    yield factory
    for sandbox in made:
        sandbox.destroy()
