"""Shared pytest fixtures: the real-systemd sandbox; the skip rule lives in tests/skiprule.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.harness.sandbox import Sandbox, sandbox_unavailable_reason

from tests.skiprule import must_run, skip_or_fail

pytest_plugins = ["tests.skiprule", "tests.harness.pg_fixtures", "tests.harness.app_fixtures",
                  "pytester"]

__all__ = ["must_run", "skip_or_fail"]


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
