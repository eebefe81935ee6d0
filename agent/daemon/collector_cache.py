"""Collect when scraped, but single-flight and rate-limited: a scrape storm is never a query storm."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from agent.daemon.metrics import CollectorStats
from agent.snapshot import CheckRun, Snapshot

log = logging.getLogger(__name__)

Inspect = Callable[[Sequence[str] | None], Snapshot]
# (unit, check, clock() when that check started): what a running inspection is doing now.
Running = tuple[str, str, float]
# Running's unit while discovery asks systemd which units exist: every unit's check waits on it.
ALL_UNITS = "*"
Wait = Callable[[threading.Event, float], bool]
# Prometheus's default scrape timeout is 10 s: a scrape waits well under it, then is served
# from the last snapshot while the inspection finishes in the background.
DEFAULT_MAX_WAIT_SECONDS = 4.0


def _event_wait(event: threading.Event, timeout: float) -> bool:
    return event.wait(timeout)


@dataclass
class _Flight:
    """One inspection run that any number of callers wait on."""

    units: list[str] | None
    inspect: Inspect | None = None
    done: threading.Event = field(default_factory=threading.Event)
    started: float = 0.0
    result: Snapshot | None = None
    warned: bool = False


def merge_snapshots(old: Snapshot, new: Snapshot) -> Snapshot:
    """Pure: OLD with the units re-inspected in NEW replaced (new ones appended)."""
    fresh = {u.unit: u for u in new.units}
    units = [fresh.pop(u.unit, u) for u in old.units]
    units.extend(fresh.values())
    errors = tuple(dict.fromkeys((*new.errors, *old.errors)))
    return replace(old, units=tuple(units), errors=errors)


def mark_running(snapshot: Snapshot, running: Running | None, inspection_seconds: float,
                 now: float) -> Snapshot:
    """Pure: SNAPSHOT served while an inspection is still running: the running check of its
    unit gets success 0 and its running time as duration; the snapshot says why."""
    note = (f"inspection still running after {inspection_seconds:.1f}s: served from the last "
            "snapshot, the inspection finishes in the background")
    units = list(snapshot.units)
    if running is not None:
        unit, check, since = running
        seconds = round(max(0.0, now - since), 4)
        who = "all units (discovery)" if unit == ALL_UNITS else unit
        note += f" ({who}: check {check} running for {seconds:.1f}s)"
        run = CheckRun(check, False, seconds, f"still running after {seconds:.1f}s; the "
                       "inspection continues in the background")
        for i, u in enumerate(units):
            if u.unit == unit or unit == ALL_UNITS:
                checks = [c for c in u.checks if c.name != check]
                units[i] = replace(u, checks=(*checks, run))
    return replace(snapshot, units=tuple(units), errors=(note, *snapshot.errors))


class SnapshotCache:
    """Serves the latest Snapshot; runs at most one inspection at a time, at most every interval.

    invalidate(unit) makes the next get() re-inspect that unit (or everything) even inside the
    interval, but never more often than min_rerun_seconds: D-Bus signal bursts stay cheap.
    """

    def __init__(self, inspect: Inspect, min_interval_seconds: float = 30.0,
                 min_rerun_seconds: float = 1.0,
                 clock: Callable[[], float] = time.monotonic,
                 max_wait_seconds: float = DEFAULT_MAX_WAIT_SECONDS,
                 wait: Wait = _event_wait) -> None:
        self._inspect = inspect
        self.min_interval_seconds = min_interval_seconds
        self.min_rerun_seconds = min_rerun_seconds
        self.max_wait_seconds = max_wait_seconds
        self._clock = clock
        self._wait = wait
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
        self.stale_serves = 0     # scrapes served from the last snapshot while one ran

    # -- configuration --------------------------------------------------------------------
    def set_inspect(self, inspect: Inspect, min_interval_seconds: float,
                    max_wait_seconds: float | None = None) -> None:
        """Swap the inspector (config reload); the cached snapshot is dropped at next get()."""
        with self._lock:
            self._inspect = inspect
            self.min_interval_seconds = min_interval_seconds
            if max_wait_seconds is not None:
                self.max_wait_seconds = max_wait_seconds
            self._all_dirty = True

    def running(self) -> tuple[float, Running | None] | None:
        """(seconds the inspection has run, what it is doing) or None when none runs."""
        with self._lock:
            flight = self._flight
        if flight is None:
            return None
        return self._clock() - flight.started, getattr(flight.inspect, "current", None)

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
        """The snapshot to serve: cached if young enough, else from the one shared inspection.

        Nobody waits longer than max_wait_seconds: past it the last snapshot is served with the
        running check marked failed, and the inspection goes on in its own thread.
        """
        with self._lock:
            flight = self._flight
            if flight is None:
                now = self._clock()
                wanted = self._wanted_units(now)
                if wanted is False:
                    return self._snapshot
                flight = _Flight(units=wanted, inspect=self._inspect,  # type: ignore[arg-type]
                                 started=now)
                self._flight = flight
                self._last_run = now
                # Whatever was dirty is looked at now; an invalidate() during the run marks its
                # unit dirty again, so a result that predates a restart is never trusted long.
                self._all_dirty = False
                self._dirty.clear()
                # Its own thread: a hung probe or a frozen D-Bus never holds a scrape.
                threading.Thread(target=self._run, args=(flight,), daemon=True,
                                 name="driftwatch-inspection").start()
        if self._wait(flight.done, self.max_wait_seconds):
            return flight.result
        return self._stale(flight)

    def _stale(self, flight: _Flight) -> Snapshot | None:
        """The last snapshot, marked: which check is still running and for how long."""
        with self._lock:
            if flight.done.is_set():   # finished between the timeout and here
                return flight.result
            self.stale_serves += 1
            snapshot = self._snapshot
            warn, flight.warned = not flight.warned, True
        now = self._clock()
        running = getattr(flight.inspect, "current", None)
        if warn:   # once per inspection, not once per scrape
            log.warning("inspection still running after %.1fs (%s); serving the last snapshot",
                        now - flight.started,
                        f"{running[0]}: {running[1]}" if running else "no check started yet")
        if snapshot is None:
            return None
        return mark_running(snapshot, running, now - flight.started, now)

    def _run(self, flight: _Flight) -> None:
        """Run the inspection outside the lock and publish its result to every waiter."""
        result: Snapshot | None = None
        error = ""
        try:
            result = (flight.inspect or self._inspect)(flight.units)
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
