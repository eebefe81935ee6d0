"""Shared pytest fixtures: the real-systemd sandbox and the CI skip-or-fail rule."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from tests.harness.sandbox import Sandbox, sandbox_unavailable_reason

pytest_plugins = ["tests.harness.pg_fixtures", "tests.harness.app_fixtures"]

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def skip_or_fail(reason: str) -> None:
    """Skip with a clear reason outside CI; inside CI a missing capability is a failure."""
    if IN_CI:
        pytest.fail(f"CI=true but this test cannot run: {reason}")
    pytest.skip(reason)


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
