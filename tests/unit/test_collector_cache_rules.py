"""SnapshotCache rules with an injected clock (no sleeps, no wall-clock assertions): a failed
partial re-inspection is retried, intervals and rerun limits hold to the second."""

from __future__ import annotations

from collections.abc import Sequence

from agent.daemon.collector_cache import SnapshotCache
from agent.snapshot import Snapshot, UnitSnapshot


class Clock:
    """A manual monotonic clock."""

    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


class Inspector:
    """Returns a.service and b.service (or the units asked for); fails while `fail` is set."""

    def __init__(self) -> None:
        self.calls: list[Sequence[str] | None] = []
        self.fail = False

    def __call__(self, units: Sequence[str] | None) -> Snapshot:
        self.calls.append(None if units is None else list(units))
        if self.fail:
            raise RuntimeError("D-Bus timed out")
        names = units if units is not None else ["a.service", "b.service"]
        return Snapshot(tuple(UnitSnapshot(n, len(self.calls), True) for n in names))


def test_failed_partial_reinspection_is_retried() -> None:
    clock, inspector = Clock(), Inspector()
    cache = SnapshotCache(inspector, min_interval_seconds=30, min_rerun_seconds=1, clock=clock)
    first = cache.get()
    clock.now += 2
    cache.invalidate("b.service")
    inspector.fail = True
    assert cache.get() is first                     # served the last good snapshot
    assert inspector.calls == [None, ["b.service"]]
    clock.now += 0.5
    assert cache.get() is first and len(inspector.calls) == 2   # not before min_rerun
    clock.now += 0.5
    inspector.fail = False
    snap = cache.get()
    assert inspector.calls[-1] == ["b.service"]     # the failed unit, again
    assert [(u.unit, u.timestamp) for u in snap.units] == [("a.service", 1), ("b.service", 3)]
    assert cache.failures_total == 1 and cache.last_success is True


def test_failed_full_run_retried_after_the_interval_not_before() -> None:
    clock, inspector = Clock(), Inspector()
    cache = SnapshotCache(inspector, min_interval_seconds=30, min_rerun_seconds=1, clock=clock)
    good = cache.get()
    clock.now += 30
    inspector.fail = True
    assert cache.get() is good and len(inspector.calls) == 2
    clock.now += 29.9
    assert cache.get() is good and len(inspector.calls) == 2
    clock.now += 0.1
    inspector.fail = False
    assert cache.get() is not good and len(inspector.calls) == 3


def test_interval_boundary_is_exact() -> None:
    clock, inspector = Clock(), Inspector()
    cache = SnapshotCache(inspector, min_interval_seconds=10, clock=clock)
    cache.get()
    clock.now += 9.999
    cache.get()
    assert len(inspector.calls) == 1
    clock.now += 0.001
    cache.get()
    assert len(inspector.calls) == 2


def test_inflight_seconds_uses_the_clock() -> None:
    clock = Clock()
    seen: list[float] = []

    def slow(units: Sequence[str] | None) -> Snapshot:
        clock.now += 7.5                            # the inspection "takes" 7.5 s
        seen.append(cache.inflight_seconds())
        return Snapshot(())

    cache = SnapshotCache(slow, min_interval_seconds=30, clock=clock)
    assert cache.inflight_seconds() == 0.0
    cache.get()
    assert seen == [7.5]
    assert cache.inflight_seconds() == 0.0


def test_set_inspect_drops_the_cache_at_next_get() -> None:
    clock, first, second = Clock(), Inspector(), Inspector()
    cache = SnapshotCache(first, min_interval_seconds=30, min_rerun_seconds=0, clock=clock)
    cache.get()
    cache.set_inspect(second, 60)
    cache.get()
    assert len(first.calls) == 1 and second.calls == [None]
    assert cache.min_interval_seconds == 60
