"""agent.daemon.collector_cache: single-flight, minimum interval, invalidation."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence


from agent.daemon.collector_cache import ALL_UNITS, SnapshotCache, mark_running, merge_snapshots
from agent.snapshot import CheckRun, Snapshot, UnitSnapshot


class FakeInspector:
    """Counts runs; a run waits for `gate` (when given) and returns a.service and b.service."""

    def __init__(self, fail: bool = False, gate: threading.Event | None = None) -> None:
        self.fail = fail
        self.gate = gate
        self.entered = threading.Event()
        self.calls: list[Sequence[str] | None] = []
        self.lock = threading.Lock()

    def __call__(self, units: Sequence[str] | None) -> Snapshot:
        with self.lock:
            self.calls.append(units)
            run = len(self.calls)
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(30), "the test never opened the gate"
        if self.fail:
            raise RuntimeError("systemd unreachable")
        names = units if units is not None else ["a.service", "b.service"]
        return Snapshot(units=tuple(UnitSnapshot(unit=n, timestamp=run, unit_up=True)
                                    for n in names), taken_at=run)


class Clock:
    """A manual monotonic clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_fifty_concurrent_scrapes_share_one_inspection() -> None:
    gate = threading.Event()
    inspector = FakeInspector(gate=gate)
    waiting: list[float] = []
    lock = threading.Lock()

    def wait(event: threading.Event, timeout: float) -> bool:
        # The run is held until all fifty scrapes wait on it: they provably overlap.
        with lock:
            waiting.append(timeout)
            if len(waiting) == 50:
                gate.set()
        return event.wait(30)

    cache = SnapshotCache(inspector, min_interval_seconds=30, clock=Clock(), wait=wait)
    results: list[Snapshot | None] = []
    threads = [threading.Thread(target=lambda: results.append(cache.get())) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(waiting) == 50
    assert len(inspector.calls) == 1
    assert cache.inspections_total == 1
    assert len(results) == 50 and all(r is results[0] and r is not None for r in results)


def test_cached_within_interval_then_rerun() -> None:
    clock = Clock()
    inspector = FakeInspector()
    cache = SnapshotCache(inspector, min_interval_seconds=30, clock=clock)
    first = cache.get()
    clock.now += 29
    assert cache.get() is first
    assert len(inspector.calls) == 1
    clock.now += 1
    assert cache.get() is not first
    assert inspector.calls == [None, None]


def test_invalidate_unit_reinspects_only_that_unit() -> None:
    clock = Clock()
    inspector = FakeInspector()
    cache = SnapshotCache(inspector, min_interval_seconds=30, min_rerun_seconds=1, clock=clock)
    cache.get()
    clock.now += 2
    cache.invalidate("b.service")
    snap = cache.get()
    assert inspector.calls == [None, ["b.service"]]
    assert [(u.unit, u.timestamp) for u in snap.units] == [("a.service", 1), ("b.service", 2)]
    # served from cache again afterwards
    assert cache.get() is snap and len(inspector.calls) == 2


def test_invalidate_unknown_unit_or_all_reinspects_everything() -> None:
    clock = Clock()
    inspector = FakeInspector()
    cache = SnapshotCache(inspector, min_interval_seconds=30, min_rerun_seconds=0, clock=clock)
    cache.get()
    cache.invalidate("new.service")
    cache.get()
    cache.invalidate()
    cache.get()
    assert inspector.calls == [None, None, None]


def test_invalidation_storm_is_rate_limited() -> None:
    clock = Clock()
    inspector = FakeInspector()
    cache = SnapshotCache(inspector, min_interval_seconds=30, min_rerun_seconds=1, clock=clock)
    cache.get()
    clock.now += 5
    for _ in range(100):
        cache.invalidate()
        cache.get()
    assert len(inspector.calls) == 2
    clock.now += 1
    cache.get()
    assert len(inspector.calls) == 3


def test_invalidate_during_inflight_run_triggers_another() -> None:
    gate = threading.Event()
    inspector = FakeInspector(gate=gate)
    cache = SnapshotCache(inspector, min_interval_seconds=30, min_rerun_seconds=0,
                          clock=Clock())
    t = threading.Thread(target=cache.get)
    t.start()
    assert inspector.entered.wait(30)
    cache.invalidate()          # the unit restarted while we were looking
    gate.set()
    t.join(30)
    cache.get()
    assert len(inspector.calls) == 2


def test_failure_keeps_last_snapshot_and_counts() -> None:
    clock = Clock()
    inspector = FakeInspector()
    cache = SnapshotCache(inspector, min_interval_seconds=30, clock=clock)
    good = cache.get()
    inspector.fail = True
    clock.now += 31
    assert cache.get() is good
    assert (cache.inspections_total, cache.failures_total, cache.last_success) == (2, 1, False)
    assert "systemd unreachable" in cache.last_error
    clock.now += 1
    assert cache.get() is good and len(inspector.calls) == 2   # no retry storm


def test_failure_without_snapshot_retries_later() -> None:
    clock = Clock()
    inspector = FakeInspector(fail=True)
    cache = SnapshotCache(inspector, min_interval_seconds=30, clock=clock)
    assert cache.get() is None
    assert cache.get() is None
    assert len(inspector.calls) == 1
    clock.now += 5
    inspector.fail = False
    assert cache.get() is not None
    assert cache.stats().inspections_total == 2


def test_merge_snapshots() -> None:
    old = Snapshot(units=(UnitSnapshot("a", 1, True), UnitSnapshot("b", 1, True)),
                   errors=("old",))
    new = Snapshot(units=(UnitSnapshot("b", 2, False), UnitSnapshot("c", 2, True)),
                   errors=("new",))
    merged = merge_snapshots(old, new)
    assert [(u.unit, u.timestamp) for u in merged.units] == [("a", 1), ("b", 2), ("c", 2)]
    assert merged.errors == ("new", "old")


def test_cached_scrape_never_inspects_or_waits() -> None:
    """A scrape inside the interval is served from the cache: no inspection, no waiting."""
    clock = Clock()
    inspector = FakeInspector()
    waits: list[float] = []

    def wait(event: threading.Event, timeout: float) -> bool:
        waits.append(timeout)
        return event.wait(30)

    cache = SnapshotCache(inspector, min_interval_seconds=30, clock=clock, wait=wait)
    first = cache.get()
    assert first is not None and waits == [cache.max_wait_seconds]
    for _ in range(200):
        clock.now += 0.1                       # 200 scrapes over 20 s of the 30 s interval
        assert cache.get() is first
    assert waits == [cache.max_wait_seconds] and len(inspector.calls) == 1
    assert cache.stats().inspections_total == 1 and cache.running() is None


# -- a scrape never waits past max_wait_seconds (issue #8 point 3) ---------------------------
class HangingInspector:
    """First run returns at once; later runs hang in (a.service, app_load) until released."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.calls = 0
        self.hang = False
        self.entered = threading.Event()
        self.release = threading.Event()
        self.current: tuple[str, str, float] | None = None

    def __call__(self, units: Sequence[str] | None) -> Snapshot:
        self.calls += 1
        run = self.calls
        if self.hang:
            self.current = ("a.service", "app_load", self.clock.now)
            self.entered.set()
            assert self.release.wait(30), "test never released the inspection"
            self.current = None
        return Snapshot(units=(UnitSnapshot(
            unit="a.service", timestamp=run, unit_up=True,
            checks=(CheckRun("unit", True, 0.01), CheckRun("app_load", True, 0.5))),),
            taken_at=run)


def clock_wait(clock: Clock, inspector: HangingInspector):  # noqa: ANN201 - test helper
    """A wait() that, for a hanging run, lets the clock (not the test) sit out the timeout."""
    def wait(event: threading.Event, timeout: float) -> bool:
        if not inspector.hang:
            return event.wait(30)
        assert inspector.entered.wait(30)
        clock.now += timeout
        return event.is_set()
    return wait


def test_scrape_past_the_bound_gets_last_snapshot_with_the_running_check_marked() -> None:
    clock = Clock()
    inspector = HangingInspector(clock)
    cache = SnapshotCache(inspector, min_interval_seconds=300, clock=clock, max_wait_seconds=4,
                          wait=clock_wait(clock, inspector))
    first = cache.get()
    assert first is not None and inspector.calls == 1
    clock.now += 301
    inspector.hang = True
    served = cache.get()
    assert served is not None and served.taken_at == first.taken_at
    checks = {c.name: c for c in served.units[0].checks}
    assert checks["app_load"].success is False
    assert checks["app_load"].duration_seconds == 4.0        # how long it has been running
    assert "still running after 4.0s" in checks["app_load"].error
    assert checks["unit"].success is True                    # the other checks as they were
    assert served.errors[0].startswith("inspection still running after 4.0s")
    assert "a.service: check app_load running for 4.0s" in served.errors[0]
    # Single-flight still holds: twenty more scrapes while it hangs start nothing new.
    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get())) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 20 and all(r is not None and not r.units[0].checks[-1].success
                                      for r in results)
    assert inspector.calls == 2 and cache.stale_serves == 21
    running = cache.running()
    assert running is not None and running[1] == ("a.service", "app_load", 1301.0)
    # The inspection finishes in the background; the next scrape gets its result.
    inspector.hang = False
    inspector.release.set()
    for _ in range(3000):
        if cache.running() is None:
            break
        time.sleep(0.01)
    fresh = cache.get()
    assert fresh is not None and fresh.taken_at == 2 and fresh.errors == ()
    assert all(c.success for c in fresh.units[0].checks)
    assert inspector.calls == 2 and cache.inspections_total == 2


def test_first_scrape_past_the_bound_serves_nothing_yet() -> None:
    clock = Clock()
    inspector = HangingInspector(clock)
    inspector.hang = True
    cache = SnapshotCache(inspector, clock=clock, max_wait_seconds=3,
                          wait=clock_wait(clock, inspector))
    assert cache.get() is None
    assert cache.get() is None and inspector.calls == 1
    inspector.hang = False
    inspector.release.set()
    for _ in range(3000):
        if cache.running() is None:
            break
        time.sleep(0.01)
    assert cache.get() is not None and inspector.calls == 1


def test_mark_running_is_pure() -> None:
    snap = Snapshot(units=(UnitSnapshot("a", 1, True, checks=(CheckRun("db", True, 0.1),)),
                           UnitSnapshot("b", 1, True)), errors=("old",))
    marked = mark_running(snap, ("b", "database", 100.0), 7.5, now=102.25)
    assert marked.units[0] == snap.units[0]
    assert marked.units[1].checks == (CheckRun("database", False, 2.25,
                                               "still running after 2.2s; the inspection "
                                               "continues in the background"),)
    assert marked.errors[1:] == ("old",) and "after 7.5s" in marked.errors[0]
    assert snap.units[1].checks == ()                                # the input is untouched
    assert mark_running(snap, None, 1.0, 0.0).units == snap.units


def test_mark_running_during_discovery_marks_every_units_unit_check() -> None:
    snap = Snapshot(units=(UnitSnapshot("a", 1, True, checks=(CheckRun("unit", True, 0.1),
                                                               CheckRun("db", True, 0.1))),
                           UnitSnapshot("b", 1, True)))
    marked = mark_running(snap, (ALL_UNITS, "unit", 100.0), 3.0, now=103.0)
    for unit in marked.units:
        run = [c for c in unit.checks if c.name == "unit"]
        assert run == [CheckRun("unit", False, 3.0, "still running after 3.0s; the "
                                "inspection continues in the background")]
    assert CheckRun("db", True, 0.1) in marked.units[0].checks
    assert "all units (discovery): check unit running for 3.0s" in marked.errors[0]
