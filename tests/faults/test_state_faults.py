"""The state store: truncated file, and concurrent inspections under load (real SQLite)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from agent.privileged.state import OK, StateStore

UNIT = "gunicorn.service"


def test_truncated_state_file_is_moved_aside_and_history_restarts(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with StateStore(path) as store:
        store.record_applied(UNIT, {f"r{i}": f"{i:064d}" for i in range(200)},
                             [f"r{i}" for i in range(200)])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])  # a crash mid-copy, a bad restore
    started = time.monotonic()
    with StateStore(path) as store:
        took = time.monotonic() - started
        print(f"\ntruncated {len(data)} -> {len(data) // 3} bytes: condition {store.condition},"
              f" recovered in {took * 1000:.0f} ms: {store.warnings}")
        assert store.condition == OK
        assert len(store.warnings) == 1 and "moved aside" in store.warnings[0]
        assert store.record_applied(UNIT, {"r1": "1" * 64}, ["r1"]) == 1
    aside = list(tmp_path.glob("state.db.corrupt-*"))
    assert [p.name for p in aside if not p.name.endswith(("-wal", "-shm"))]
    assert any(p.read_bytes() == data[: len(data) // 3] for p in aside)  # kept for a look


@pytest.mark.long(seconds=60, short=2)
def test_concurrent_inspections_for_a_while(tmp_path: Path, load_seconds: float) -> None:
    # 16 threads, as a scrape storm's inspection threads would, for load_seconds.
    store = StateStore(tmp_path / "state.db")
    errors: list[str] = []
    done = [0] * 16
    stop = time.monotonic() + load_seconds

    def work(n: int) -> None:
        i = 0
        try:
            while time.monotonic() < stop:
                hashes = {f"u{n}r{i % 50}": f"{n:02d}{i % 50:062d}"}
                store.record_applied(f"unit{n}.service", hashes, list(hashes))
                store.integrity_findings(f"unit{n}.service", hashes)
                i += 1
        except Exception as exc:  # the failure this test is about
            errors.append(f"{type(exc).__name__}: {exc}")
        done[n] = i

    threads = [threading.Thread(target=work, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store.close()
    total = sum(done)
    print(f"\n16 threads x {load_seconds:g} s: {total} record+check rounds "
          f"({total / load_seconds:.0f}/s), errors {len(errors)}")
    assert errors == []
    assert min(done) > 0
    assert store.condition == OK and store.warnings == []
