"""The rule that keeps the agent's own reads of the version table out of migration activity."""

from __future__ import annotations

import pytest

from agent.privileged.sources.database import agent_read


@pytest.mark.parametrize("name", ["driftwatch", "driftwatch-probe"])
def test_the_agents_read_lock_is_not_a_migration(name: str) -> None:
    assert agent_read("lock", name, "AccessShareLock")


@pytest.mark.parametrize("kind,name,mode", [
    ("lock", "", "AccessShareLock"),                    # anyone else reading: as before
    ("lock", "flask", "AccessShareLock"),
    ("lock", "driftwatch-upgrade", "AccessShareLock"),  # not one of the agent's read sessions
    ("lock", "driftwatch", "RowExclusiveLock"),         # a write is never the agent's
    ("lock", "driftwatch", "AccessExclusiveLock"),
    ("exclusive", "driftwatch", None),                  # DDL locks count whoever holds them
    ("active", "driftwatch", None),
])
def test_everything_else_still_counts(kind: str, name: str, mode: str | None) -> None:
    assert not agent_read(kind, name, mode)
