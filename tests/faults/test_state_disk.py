"""The state store on a real read-only bind mount and a real, tiny, full tmpfs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from agent.privileged.state import FULL, OK, READ_ONLY, StateStore
from tests.faults.mounts import fill, read_only_bind, tmpfs

UNIT = "gunicorn.service"
OLD = {"a": "1" * 64, "b": "2" * 64}
NEW = {f"r{i:03d}": hashlib.sha256(str(i).encode()).hexdigest() for i in range(400)}

pytestmark = pytest.mark.usefixtures("can_mount")


def tree(directory: Path) -> dict[str, str]:
    """name -> sha256 of every file in directory: what 'nothing was touched' means."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.iterdir()) if p.is_file()}


def test_read_only_directory_is_reported_not_treated_as_corruption(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with StateStore(state / "state.db") as store:
        store.record_applied(UNIT, OLD, ["a", "b"])
    before = tree(state)
    with read_only_bind(state):
        with StateStore(state / "state.db") as store:
            print(f"\nread-only: condition={store.condition}: {store.detail}")
            assert store.condition == READ_ONLY
            assert "is read-only" in store.detail and "kept as it is" in store.detail
            assert store.warnings == []  # nothing was moved aside
            # The history is still read, so an edited migration is still caught...
            assert store.recorded(UNIT) == OLD
            found = store.integrity_findings(UNIT, {"a": OLD["a"], "b": "e" * 64})
            assert [f.check for f in found] == ["applied_migration_modified"]
            # ...and nothing new is recorded, without an error per call.
            assert store.record_applied(UNIT, NEW, list(NEW)) == 0
            assert store.condition == READ_ONLY
        assert tree(state) == before
    assert not list(state.glob("*corrupt*"))
    # Writable again: the same store object recovers on its next write.
    with StateStore(state / "state.db") as store:
        assert store.condition == OK
        assert store.record_applied(UNIT, NEW, list(NEW)) == len(NEW)


def test_read_only_empty_directory(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    with read_only_bind(state), StateStore(state / "state.db") as store:
        assert store.condition == READ_ONLY
        assert store.recorded(UNIT) == {}
        assert store.record_applied(UNIT, OLD, ["a"]) == 0
    assert list(state.iterdir()) == []


def test_full_disk_is_reported_and_the_file_kept(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "tiny", size="128k") as state:
        with StateStore(state / "state.db") as store:
            store.record_applied(UNIT, OLD, ["a", "b"])
            filler = fill(state)
            inode = (state / "state.db").stat().st_ino
            rounds = [store.record_applied(UNIT, {**OLD, **NEW}, [*OLD, *NEW])
                      for _ in range(3)]
            print(f"\nfull tmpfs: added per round={rounds} condition={store.condition}: "
                  f"{store.detail}")
            assert rounds == [0, 0, 0]
            assert store.condition == FULL
            assert "is full" in store.detail
            assert store.warnings == []
            assert store.recorded(UNIT) == OLD  # from the read-only view
            assert not list(state.glob("*corrupt*"))
            assert (state / "state.db").exists()
            assert (state / "state.db").stat().st_ino == inode  # the same file, not a new one
            filler.unlink()  # room again: recorded on the next round
            assert store.record_applied(UNIT, {**OLD, **NEW}, [*OLD, *NEW]) == len(NEW)
            assert store.condition == OK


def test_full_disk_before_the_first_open(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "tiny", size="64k") as root:
        fill(root)
        with StateStore(root / "lib" / "state.db") as store:
            print(f"\nfull before open: condition={store.condition}")
            assert store.condition == FULL
            assert store.record_applied(UNIT, OLD, ["a"]) == 0
            assert store.recorded(UNIT) == {}
