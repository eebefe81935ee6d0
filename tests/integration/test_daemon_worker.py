"""agent.daemon.worker: the worker protocol with real worker processes (stand-in inspectors
and a stand-in bus; the real systemd side is covered by tests/faults/test_pid1_frozen.py)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from agent.config import Config
from agent.daemon.worker import WorkerError, WorkerInspect
from agent.snapshot import MigrationState, Snapshot, UnitSnapshot

UNIT = "gunicorn.service"


class StandInInspector:
    """Inspects nothing; some unit names make it slow, die or hang, to drive the protocol."""

    def __init__(self) -> None:
        self.on_current: Callable[[tuple[str, str, float] | None], None] | None = None
        self.runs = 0

    def __call__(self, units: Sequence[str] | None) -> Snapshot:
        self.runs += 1
        names = list(units or [UNIT])
        if self.on_current is not None:
            self.on_current((names[0], "migrations", time.monotonic()))
        if "slow.service" in names:
            time.sleep(1.5)
        if "die.service" in names:
            os._exit(3)
        if "hang.service" in names:
            time.sleep(3600)
        if "fail.service" in names:
            raise RuntimeError("inspection broke")
        unit = UnitSnapshot(unit=names[0], timestamp=time.time(), unit_up=True,
                            migrations=MigrationState(True, ("a",), ("b",), ("b",)))
        return Snapshot(units=(unit,), errors=(f"pid {os.getpid()} run {self.runs}",))


def make_stand_in(config: Config) -> StandInInspector:
    """Factory the worker imports by name."""
    return StandInInspector()


def make_broken(config: Config) -> StandInInspector:
    """A factory that refuses its configuration."""
    raise ValueError("no such setting")


class SignallingBus:
    """A bus that delivers one PropertiesChanged (a restart) for each watched unit."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        self.pending: list[Any] = []

    def call_method(self, *args: Any) -> None:
        pass

    def match_signal(self, sender: Any, path: bytes, interface: bytes, member: bytes,
                     callback: Any, userdata: Any = None) -> None:
        if member == b"PropertiesChanged":
            self.pending.append(callback)
            os.write(self.w, b"x")

    def get_fd(self) -> int:
        return self.r

    def process(self) -> None:
        while self.pending:
            callback = self.pending.pop(0)
            callback(_Message((b"org.freedesktop.systemd1.Unit",
                               {b"ActiveState": b"activating"}, [])))

    def close(self) -> None:
        pass


class _Message:
    def __init__(self, body: Any) -> None:
        self.body = body

    def process_reply(self, with_headers: bool) -> None:
        pass


def signalling_bus() -> SignallingBus:
    """Bus factory the worker's watcher imports by name."""
    return SignallingBus()


class EagerBus(SignallingBus):
    """A bus whose first signal arrives during the subscription, before the worker is ready."""

    def match_signal(self, sender: Any, path: bytes, interface: bytes, member: bytes,
                     callback: Any, userdata: Any = None) -> None:
        if member == b"PropertiesChanged":
            callback(_Message((b"org.freedesktop.systemd1.Unit",
                               {b"ActiveState": b"activating"}, [])))


def eager_bus() -> EagerBus:
    """Bus factory the worker's watcher imports by name."""
    return EagerBus()


@pytest.fixture
def changes() -> list[str | None]:
    return []


@pytest.fixture
def worker(changes: list[str | None]) -> Iterator[WorkerInspect]:
    w = WorkerInspect(make_stand_in, Config(), changes.append, units=[UNIT], watch=False,
                      hang_seconds=2.0)
    w.start()
    yield w
    w.stop()


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_inspect_returns_the_workers_snapshot(worker: WorkerInspect) -> None:
    snapshot = worker([UNIT])
    assert snapshot.units[0].unit == UNIT
    assert snapshot.units[0].migrations is not None
    assert snapshot.units[0].migrations.pending == ("b",)
    # It ran in the worker, not here.
    assert snapshot.errors == (f"pid {worker.pid()} run 1",)
    assert worker.pid() != os.getpid()
    assert worker.current is None   # nothing runs once the result is in


def test_progress_is_streamed_while_the_inspection_runs(worker: WorkerInspect) -> None:
    done = threading.Event()
    threading.Thread(target=lambda: (worker(["slow.service"]), done.set()), daemon=True).start()
    assert wait_for(lambda: worker.current is not None, timeout=5)
    assert not done.is_set()
    assert worker.current is not None
    unit, check, since = worker.current
    assert (unit, check) == ("slow.service", "migrations")
    assert since <= time.monotonic()   # CLOCK_MONOTONIC is the same in both processes
    assert done.wait(10)
    assert worker.current is None


def test_a_failing_inspection_is_an_error_and_the_worker_goes_on(worker: WorkerInspect) -> None:
    pid = worker.pid()
    with pytest.raises(WorkerError, match="RuntimeError: inspection broke"):
        worker(["fail.service"])
    assert worker([UNIT]).units[0].unit == UNIT
    assert worker.pid() == pid and worker.starts == 1


def test_a_worker_that_dies_is_restarted_and_everything_invalidated(
        worker: WorkerInspect, changes: list[str | None]) -> None:
    first = worker.pid()
    with pytest.raises(WorkerError, match="exited during the inspection"):
        worker(["die.service"])
    # The next inspection gets a new worker; signals sent meanwhile are lost: invalidate all.
    snapshot = worker([UNIT])
    assert worker.pid() != first and worker.starts == 2
    assert snapshot.errors == (f"pid {worker.pid()} run 1",)
    assert changes == [None]


def test_a_dead_worker_is_restarted_by_ensure(worker: WorkerInspect,
                                              changes: list[str | None]) -> None:
    first = worker.pid()
    assert first is not None
    os.kill(first, 9)
    assert wait_for(lambda: not worker.alive())
    worker.ensure()
    assert worker.alive() and worker.pid() != first
    assert changes == [None]


def test_a_hung_worker_is_killed_and_restarted(worker: WorkerInspect) -> None:
    first = worker.pid()
    assert first is not None
    started = time.monotonic()
    with pytest.raises(WorkerError, match="hung"):
        worker(["hang.service"])
    took = time.monotonic() - started
    print(f"\nhung worker given up after {took:.1f}s (hang_seconds 2)")
    assert worker.alive() and worker.pid() != first
    with pytest.raises(ProcessLookupError):
        os.kill(first, 0)   # killed and reaped, not left behind
    assert worker([UNIT]).units[0].unit == UNIT


def test_a_factory_that_fails_is_reported_at_start() -> None:
    w = WorkerInspect(make_broken, Config(), lambda unit: None, watch=False)
    with pytest.raises(WorkerError, match="ValueError: no such setting"):
        w.start()
    assert not w.alive()


def test_watcher_signals_invalidate_units(changes: list[str | None]) -> None:
    w = WorkerInspect(make_stand_in, Config(), changes.append, units=[UNIT],
                      watch=signalling_bus)
    w.start()
    try:
        assert wait_for(lambda: UNIT in changes), changes
        # A new unit set renews the matches: the new unit's signal comes through too.
        w.set_units([UNIT, "other.service"])
        assert wait_for(lambda: "other.service" in changes), changes
    finally:
        w.stop()


def test_a_signal_before_ready_is_delivered_not_taken_for_a_failure(
        changes: list[str | None]) -> None:
    # The CI failure of 2026-11-29: a change that overtook "ready" failed the start with
    # WorkerError("gunicorn.service").
    w = WorkerInspect(make_stand_in, Config(), changes.append, units=[UNIT], watch=eager_bus)
    w.start()
    try:
        assert changes == [UNIT]
        assert w([UNIT]).units[0].unit == UNIT
    finally:
        w.stop()


def make_picky(config: Config) -> StandInInspector:
    """A factory that refuses one configuration (a reload to it must keep the old worker)."""
    if config.probe_timeout_seconds == 7:
        raise ValueError("refuses a 7 s probe timeout")
    return StandInInspector()


def test_reload_starts_a_new_worker_and_a_refused_config_keeps_the_running_one(
        tmp_path: Any) -> None:
    from agent.config import load_config
    from agent.daemon.main import Daemon

    path = tmp_path / "agent.toml"
    base = '[agent]\nlisten_address = "127.0.0.1:0"\n'
    path.write_text(base)
    daemon = Daemon(load_config(str(path)), make_picky, str(path), watcher_factory=None,
                    worker=True)
    daemon.start()
    try:
        assert daemon.worker is not None
        first = daemon.worker.pid()
        assert first is not None
        path.write_text(base + "probe_timeout_seconds = 7\n")
        assert daemon.reload() is False
        assert daemon.worker.pid() == first and daemon.worker.alive()
        path.write_text(base + "probe_timeout_seconds = 8\n")
        assert daemon.reload() is True
        assert daemon.worker.pid() not in (None, first)
        # The old worker is retired once idle: gone, not left behind.
        assert wait_for(lambda: not os.path.exists(f"/proc/{first}"))
        snapshot = daemon.cache.get()
        assert snapshot is not None and snapshot.errors == (f"pid {daemon.worker.pid()} run 1",)
    finally:
        daemon.shutdown()
    assert not daemon.worker.alive()
