"""Fixtures of the fault suite."""

from __future__ import annotations

import os

import pytest

from tests.conftest import skip_or_fail
from tests.faults.mounts import mount_unavailable_reason


@pytest.fixture
def can_mount() -> None:
    """Real mounts (tmpfs, read-only binds) are possible, else skip (fail in CI)."""
    reason = mount_unavailable_reason()
    if reason:
        skip_or_fail(reason)


def full_length() -> bool:
    """DRIFTWATCH_LONG=1 runs the long fault/load cases at full length."""
    return os.environ.get("DRIFTWATCH_LONG", "") in ("1", "true", "yes")


@pytest.fixture
def load_seconds(request: pytest.FixtureRequest) -> float:
    """How long a @pytest.mark.long case runs: its full length (the marker's seconds=) with
    DRIFTWATCH_LONG=1, else a shortened run (short=, default 3 s) for CI."""
    marker = request.node.get_closest_marker("long")
    full = float(marker.kwargs.get("seconds", 60)) if marker else 60.0
    short = float(marker.kwargs.get("short", 3)) if marker else 3.0
    return full if full_length() else short
