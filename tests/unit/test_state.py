"""The agent's SQLite state, real, in tmp_path."""

from __future__ import annotations

import stat
from pathlib import Path

from agent.state import StateStore

UNIT = "gunicorn.service"
HASHES = {"a": "1" * 64, "b": "2" * 64, "c": "3" * 64}


def test_directory_created_0700_and_file_private(tmp_path: Path) -> None:
    path = tmp_path / "lib" / "driftwatch" / "state.db"
    with StateStore(path) as store:
        assert store.warnings == []
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0


def test_first_seen_hash_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with StateStore(path) as store:
        assert store.record_applied(UNIT, HASHES, ["a", "b"]) == 2
        assert store.record_applied(UNIT, {**HASHES, "a": "f" * 64}, ["a", "b"]) == 0
    with StateStore(path) as store:  # survives reopening
        assert store.recorded(UNIT) == {"a": HASHES["a"], "b": HASHES["b"]}
        assert store.recorded("other.service") == {}


def test_modified_and_missing_findings(tmp_path: Path) -> None:
    with StateStore(tmp_path / "state.db") as store:
        store.record_applied(UNIT, HASHES, ["a", "b", "c"])
        assert store.integrity_findings(UNIT, HASHES) == []
        now = {"a": HASHES["a"], "b": "e" * 64}  # b edited, c gone
        found = {f.check: f for f in store.integrity_findings(UNIT, now)}
        assert set(found) == {"applied_migration_modified", "applied_migration_missing"}
        assert "migration b was edited" in found["applied_migration_modified"].message
        assert "migration c" in found["applied_migration_missing"].message


def test_downgraded_revision_is_forgotten(tmp_path: Path) -> None:
    with StateStore(tmp_path / "state.db") as store:
        store.record_applied(UNIT, HASHES, ["a", "b", "c"])
        store.record_applied(UNIT, HASHES, ["a", "b"])  # downgraded below c
        changed = {**HASHES, "c": "9" * 64}  # c fixed while not applied: legitimate
        assert store.integrity_findings(UNIT, changed) == []
        store.record_applied(UNIT, changed, ["a", "b", "c"])
        assert store.recorded(UNIT)["c"] == "9" * 64


def test_corrupt_file_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not a sqlite database" * 100)
    with StateStore(path) as store:
        assert len(store.warnings) == 1
        assert "moved aside" in store.warnings[0]
        assert store.record_applied(UNIT, HASHES, ["a"]) == 1
    aside = list(tmp_path.glob("state.db.corrupt-*"))
    assert len(aside) == 1
    assert aside[0].read_bytes().startswith(b"this is not")


def test_corruption_found_later_is_survived(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = StateStore(path)
    store.record_applied(UNIT, HASHES, ["a"])
    store.close()
    # Overwrite the header: SQLite refuses the file on the next statement.
    data = bytearray(path.read_bytes())
    data[:16] = b"garbage garbage!"
    path.write_bytes(bytes(data))
    with StateStore(path) as store:
        assert store.warnings and store.recorded(UNIT) == {}
