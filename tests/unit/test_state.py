"""The agent's SQLite state, real, in tmp_path."""

from __future__ import annotations

import stat
import threading
from pathlib import Path

from agent.privileged.state import StateStore

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


def test_store_is_safe_under_concurrent_threads(tmp_path: Path) -> None:
    # Made in one thread, used by many at once: the daemon's scrape threads do exactly this.
    path = tmp_path / "state.db"
    store = StateStore(path)
    errors: list[str] = []
    added: list[int] = []

    def inspect(n: int) -> None:
        try:
            for i in range(20):
                hashes = {f"t{n}-{i}": f"{n:02d}{i:02d}".ljust(64, "0")}
                added.append(store.record_applied(f"unit{n}.service", hashes, list(hashes)))
                store.integrity_findings(f"unit{n}.service", hashes)
        except Exception as exc:  # the failure this test is about
            errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=inspect, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store.close()
    assert errors == []
    assert sum(added) == 160
    assert not list(tmp_path.glob("*corrupt*"))
    with StateStore(path) as again:
        assert len(again.recorded("unit7.service")) == 20


def test_only_sqlite_verdicts_mean_corruption(tmp_path: Path) -> None:
    import errno
    import sqlite3

    from agent.privileged.state import CORRUPT, ERROR, FULL, READ_ONLY, Corrupt, classify

    def sqlite_error(code: int) -> sqlite3.Error:
        exc = sqlite3.OperationalError("x")
        exc.sqlite_errorcode = code  # type: ignore[attr-defined]
        return exc

    assert classify(Corrupt("quick_check: bad"), tmp_path) == CORRUPT
    assert classify(sqlite_error(26), tmp_path) == CORRUPT           # NOTADB
    assert classify(sqlite_error(11 | 256), tmp_path) == CORRUPT     # CORRUPT_VTAB
    assert classify(sqlite_error(13), tmp_path) == FULL
    assert classify(sqlite_error(8), tmp_path) == READ_ONLY
    assert classify(OSError(errno.EROFS, "ro"), tmp_path) == READ_ONLY
    assert classify(OSError(errno.ENOSPC, "full"), tmp_path) == FULL
    # "unable to open" on a writable, roomy directory: an error, never corruption.
    assert classify(sqlite_error(14), tmp_path) == ERROR
    assert classify(sqlite_error(5), tmp_path) == ERROR  # BUSY


def test_condition_is_exported_as_a_gauge() -> None:
    from prometheus_client import CollectorRegistry

    from agent.daemon.metrics import DriftwatchCollector
    from agent.snapshot import Snapshot

    registry = CollectorRegistry()
    registry.register(DriftwatchCollector(lambda: Snapshot((), state_store="full")))
    values = {c: registry.get_sample_value("driftwatch_state_store_condition",
                                           {"condition": c})
              for c in ("ok", "read_only", "full", "error")}
    assert values == {"ok": 0.0, "read_only": 0.0, "full": 1.0, "error": 0.0}
