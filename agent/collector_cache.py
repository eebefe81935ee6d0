"""Collect when scraped, but single-flight and rate-limited: a scrape storm is never a query storm."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from agent.metrics import CollectorStats
from agent.snapshot import Snapshot

log = logging.getLogger(__name__)

Inspect = Callable[[Sequence[str] | None], Snapshot]


@dataclass
class _Flight:
    """One inspection run that any number of callers wait on."""

    units: list[str] | None
    done: threading.Event = field(default_factory=threading.Event)
    started: float = 0.0
    result: Snapshot | None = None


def merge_snapshots(old: Snapshot, new: Snapshot) -> Snapshot:
    """Pure: OLD with the units re-inspected in NEW replaced (new ones appended)."""
    fresh = {u.unit: u for u in new.units}
    units = [fresh.pop(u.unit, u) for u in old.units]
    units.extend(fresh.values())
    errors = tuple(dict.fromkeys((*new.errors, *old.errors)))
    return replace(old, units=tuple(units), errors=errors)


class SnapshotCache:
    """Serves the latest Snapshot; runs at most one inspection at a time, at most every interval.

    invalidate(unit) makes the next get() re-inspect that unit (or everything) even inside the
    interval, but never more often than min_rerun_seconds: D-Bus signal bursts stay cheap.
    """

    def __init__(self, inspect: Inspect, min_interval_seconds: float = 30.0,
                 min_rerun_seconds: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._inspect = inspect
        self.min_interval_seconds = min_interval_seconds
        self.min_rerun_seconds = min_rerun_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._snapshot: Snapshot | None = None
        self._taken: float | None = None       # clock() when the served snapshot was started
        self._last_run: float | None = None    # clock() when the last run of any kind started
        self._all_dirty = False
        self._dirty: set[str] = set()
        self._flight: _Flight | None = None
        self.inspections_total = 0
        self.failures_total = 0
        self.last_success: bool | None = None
        self.last_error = ""

    # -- configuration --------------------------------------------------------------------
    def set_inspect(self, inspect: Inspect, min_interval_seconds: float) -> None:
        """Swap the inspector (config reload); the cached snapshot is dropped at next get()."""
        with self._lock:
            self._inspect = inspect
            self.min_interval_seconds = min_interval_seconds
            self._all_dirty = True

    # -- reading --------------------------------------------------------------------------
    def peek(self) -> Snapshot | None:
        """The cached snapshot, never triggering an inspection (for STATUS and the watcher)."""
        with self._lock:
            return self._snapshot

    def stats(self) -> CollectorStats:
        """Counters for the metrics collector."""
        with self._lock:
            return CollectorStats(self.inspections_total, self.failures_total,
                                  self.last_success)

    def inflight_seconds(self) -> float:
        """How long the current inspection has been running (0 when none): a hang detector."""
        with self._lock:
            flight = self._flight
        return self._clock() - flight.started if flight else 0.0

    def _wanted_units(self, now: float) -> list[str] | None | bool:
        """Under the lock: False = serve cache, None = inspect all, list = inspect those."""
        if self._snapshot is None:
            # Nothing to serve: retry soon, but a failing inspector still is not hammered.
            retry = min(self.min_interval_seconds, 5.0)
            if self._last_run is None or now - self._last_run >= retry:
                return None
            return False
        if self._taken is None:
            return None
        if now - self._taken >= self.min_interval_seconds:
            return None
        if not (self._all_dirty or self._dirty):
            return False
        if self._last_run is not None and now - self._last_run < self.min_rerun_seconds:
            return False
        return None if self._all_dirty else sorted(self._dirty)

    def get(self) -> Snapshot | None:
        """The snapshot to serve: cached if young enough, else from the one shared inspection."""
        with self._lock:
            flight = self._flight
            if flight is None:
                now = self._clock()
                wanted = self._wanted_units(now)
                if wanted is False:
                    return self._snapshot
                flight = _Flight(units=wanted, started=now)  # type: ignore[arg-type]
                self._flight = flight
                self._last_run = now
                # Whatever was dirty is looked at now; an invalidate() during the run marks its
                # unit dirty again, so a result that predates a restart is never trusted long.
                self._all_dirty = False
                self._dirty.clear()
                leader = True
            else:
                leader = False
        if leader:
            self._run(flight)
        else:
            flight.done.wait()
        return flight.result

    def _run(self, flight: _Flight) -> None:
        """Run the inspection outside the lock and publish its result to every waiter."""
        result: Snapshot | None = None
        error = ""
        try:
            result = self._inspect(flight.units)
        except Exception as exc:  # the agent must keep serving whatever the inspector does
            error = f"{type(exc).__name__}: {exc}"
            log.error("inspection failed: %s", error)
        with self._lock:
            self.inspections_total += 1
            self.last_success = result is not None
            self.last_error = error
            if result is None:
                self.failures_total += 1
                if flight.units is not None:
                    self._dirty.update(flight.units)   # retried after min_rerun_seconds
                elif self._snapshot is not None:
                    # Keep serving the last good snapshot; retry a full run after the interval.
                    self._taken = flight.started
            else:
                if flight.units is not None and self._snapshot is not None:
                    result = merge_snapshots(self._snapshot, result)
                else:
                    self._taken = flight.started
                self._snapshot = result
            flight.result = self._snapshot
            self._flight = None
        flight.done.set()

    # -- invalidation ---------------------------------------------------------------------
    def invalidate(self, unit: str | None = None) -> None:
        """Make the next get() re-inspect UNIT (None or an unknown unit: everything)."""
        with self._lock:
            known = self._snapshot is not None and any(
                u.unit == unit for u in self._snapshot.units)
            if unit is None or not known:
                self._all_dirty = True
            else:
                self._dirty.add(unit)
