"""Fixtures of the fault suite."""

from __future__ import annotations

import pytest

from tests.conftest import skip_or_fail
from tests.faults.mounts import mount_unavailable_reason


@pytest.fixture
def can_mount() -> None:
    """Real mounts (tmpfs, read-only binds) are possible, else skip (fail in CI)."""
    reason = mount_unavailable_reason()
    if reason:
        skip_or_fail(reason)
