"""agent.daemon.watch: signal handling against a fake bus (the real bus is covered by e2e tests)."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest

from agent.daemon import watch
from agent.daemon.watch import UnitWatcher, relevant_change, unit_object_path


class FakeMessage:
    def __init__(self, body: Any) -> None:
        self.body = body

    def process_reply(self, with_headers: bool) -> None:
        pass


class FakeBus:
    """Queues signals; writing to a pipe makes get_fd() readable like a real socket."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        self.calls: list[bytes] = []
        self.matches: dict[tuple[bytes | None, bytes], Any] = {}
        self.queue: list[tuple[bytes, bytes, Any]] = []
        self.dead = False
        self.closed = False

    def call_method(self, destination: bytes, path: bytes, interface: bytes, method: bytes,
                    args: list[Any]) -> Any:
        self.calls.append(method)

    def match_signal(self, sender: Any, path: bytes, interface: bytes, member: bytes,
                     callback: Any, userdata: Any = None) -> None:
        callback.metadata = {}       # what pystemd does: bound methods would fail here
        self.matches[(path, member)] = callback

    def get_fd(self) -> int:
        return self.r

    def emit(self, path: bytes, member: bytes, body: Any) -> None:
        self.queue.append((path, member, body))
        os.write(self.w, b"x")

    def drop(self) -> None:
        self.dead = True
        os.write(self.w, b"x")

    def process(self) -> None:
        if self.dead:
            raise OSError("Connection reset by peer")
        try:
            os.read(self.r, 1 << 16) if self.queue else None
        except BlockingIOError:
            pass
        while self.queue:
            path, member, body = self.queue.pop(0)
            callback = self.matches.get((path, member))
            if callback:
                callback(FakeMessage(body))

    def close(self) -> None:
        self.closed = True


def wait_for(predicate: Any, timeout: float = 3.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_relevant_change() -> None:
    assert relevant_change({b"ActiveState": b"activating"}, [])
    assert relevant_change({}, [b"ExecMainStartTimestamp"])
    assert relevant_change({b"MainPID": 42}, [])
    assert not relevant_change({b"CPUUsageNSec": 5}, [b"Memory"])


def test_unit_object_path() -> None:
    assert unit_object_path("gunicorn.service") == \
        b"/org/freedesktop/systemd1/unit/gunicorn_2eservice"
    assert unit_object_path("app@1.service") == \
        b"/org/freedesktop/systemd1/unit/app_401_2eservice"


def test_signals_call_back_and_reconnect() -> None:
    buses: list[FakeBus] = []
    seen: list[str | None] = []
    lock = threading.Lock()

    def factory() -> FakeBus:
        bus = FakeBus()
        buses.append(bus)
        return bus

    def on_change(unit: str | None) -> None:
        with lock:
            seen.append(unit)

    backoffs = BackoffClock(limit=100)     # the reconnect sits out its backoff at once
    watcher = UnitWatcher(on_change, units=["app.service"],
                          is_candidate=lambda n: n.startswith("web"), bus_factory=factory,
                          max_backoff_seconds=0.05, backoff_wait=backoffs)
    watcher.start()
    try:
        assert watcher.connected.wait(2)
        bus = buses[0]
        assert bus.calls == [b"Subscribe"]
        path = unit_object_path("app.service")
        bus.emit(path, b"PropertiesChanged",
                 (b"org.freedesktop.systemd1.Unit", {b"CPUUsageNSec": 1}, []))
        bus.emit(path, b"PropertiesChanged",
                 (b"org.freedesktop.systemd1.Service", {b"MainPID": 4242}, []))
        assert wait_for(lambda: seen == ["app.service"])
        manager = b"/org/freedesktop/systemd1"
        bus.emit(manager, b"JobRemoved", (7, b"/job/7", b"app.service", b"done"))
        bus.emit(manager, b"UnitNew", (b"other.service", b"/x"))
        bus.emit(manager, b"UnitNew", (b"web-2.service", b"/y"))
        assert wait_for(lambda: seen == ["app.service", "app.service", "web-2.service"])

        # Bus drops: the watcher reconnects and reports "anything may have changed".
        bus.drop()
        assert wait_for(lambda: len(buses) == 2 and watcher.connections == 2)
        assert wait_for(lambda: seen[-1] is None)
        assert bus.closed
        assert backoffs.waits == [1.0]           # one backoff for the one drop

        # New unit set: fresh connection with a match on the new unit's path.
        watcher.set_units(["api.service"])
        assert wait_for(lambda: len(buses) == 3 and watcher.connected.is_set())
        assert (unit_object_path("api.service"), b"PropertiesChanged") in buses[2].matches
        assert (unit_object_path("app.service"), b"PropertiesChanged") not in buses[2].matches
    finally:
        watcher.stop()
    assert not watcher.is_alive()


def test_stop_wakes_the_thread_out_of_select(monkeypatch: pytest.MonkeyPatch) -> None:
    """stop() wakes the select() through the pipe: it never sits out the poll interval."""
    # An hour-long poll: without the wake-up the thread would still be in select() when
    # stop()'s join gives up, whatever the machine's load (no elapsed-time assertion).
    monkeypatch.setattr(watch, "POLL_SECONDS", 3600.0)
    bus = FakeBus()
    watcher = UnitWatcher(lambda unit: None, units=["a.service"], bus_factory=lambda: bus)
    watcher.start()
    assert watcher.connected.wait(30)
    watcher.stop(timeout=30)
    assert not watcher.is_alive()
    assert bus.closed


class BackoffClock:
    """Records each backoff the watcher sits out, instantly; stops it after `limit` waits."""

    def __init__(self, limit: int) -> None:
        self.waits: list[float] = []
        self.limit = limit
        self.watcher: UnitWatcher | None = None

    def __call__(self, seconds: float) -> bool:
        self.waits.append(seconds)
        if len(self.waits) >= self.limit and self.watcher is not None:
            self.watcher._stop.set()
        return False


def test_backs_off_when_bus_unavailable() -> None:
    attempts = 0

    def factory() -> FakeBus:
        nonlocal attempts
        attempts += 1
        raise OSError("No such file or directory")

    clock = BackoffClock(limit=9)
    watcher = UnitWatcher(lambda unit: None, units=["a.service"], bus_factory=factory,
                          max_backoff_seconds=60, backoff_wait=clock)
    clock.watcher = watcher
    watcher.start()
    assert wait_for(lambda: not watcher.is_alive(), 30)   # the clock stopped it
    watcher.stop(timeout=30)
    # Doubling from 1 s, capped at max_backoff_seconds; one connect attempt per wait.
    assert clock.waits == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert attempts == 9


def test_backoff_resets_after_a_successful_connect() -> None:
    buses: list[FakeBus] = []
    failures = iter([True, True, False, True, True])

    def factory() -> FakeBus:
        if next(failures, False):
            raise OSError("No such file or directory")
        bus = FakeBus()
        buses.append(bus)
        if len(buses) == 1:
            bus.dead = True   # connects, then drops at the first process()
            os.write(bus.w, b"x")
        return bus

    clock = BackoffClock(limit=100)
    watcher = UnitWatcher(lambda unit: None, units=["a.service"], bus_factory=factory,
                          max_backoff_seconds=60, backoff_wait=clock)
    clock.watcher = watcher
    watcher.start()
    assert wait_for(lambda: len(buses) == 2 and watcher.connected.is_set(), 30)
    watcher.stop(timeout=30)
    assert not watcher.is_alive()
    # fail, fail, connect then drop (back to 1 s), fail, fail, connect.
    assert clock.waits == [1, 2, 1, 2, 4]
