"""The daemon's systemd side in a process of its own: the inspector and the D-Bus signal watcher.

pystemd holds the GIL during sd_bus_call(), so while systemd (PID 1) does not answer, every
D-Bus call stalls its whole process for the bus timeout. Run in the daemon's own process, that
stalled the HTTP threads too; here only this worker stalls, and the daemon keeps answering
scrapes from the last snapshot. The worker is a fresh `python -m agent.daemon.worker` (never a
fork of the threaded daemon), talking over a socketpair with multiprocessing's Connection.

Daemon -> worker: sys.path, then (factory, config, units, watch), then any of
("inspect", seq, units | None), ("units", [unit, ...]), ("stop",).
Worker -> daemon: ("ready",) or ("failed", error) once, then any of ("current", running),
("changed", unit | None) and ("result", seq, Snapshot | None, error).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

from agent.daemon.process import trim_heap
from agent.errors import DriftwatchError
from agent.snapshot import Snapshot

log = logging.getLogger(__name__)

START_TIMEOUT_SECONDS = 60.0
STOP_GRACE_SECONDS = 8.0     # > the bus timeout: SIGTERM is handled once sd_bus_call returns
# Silence from the worker this long past the probe timeout means it hangs (every check it
# starts is reported, so a healthy worker is never this quiet during an inspection).
HANG_MARGIN_SECONDS = 60.0
WATCH_READY_SECONDS = 2.0

Running = tuple[str, str, float]
# Watch signals? True: on systemd's bus; a (picklable) bus factory: on that bus (tests).
Watch = bool | Callable[[], Any]


class WorkerError(DriftwatchError):
    """The worker could not start, died or hung."""


# -- the worker process -------------------------------------------------------------------
def _terminate(*_: Any) -> None:
    """SIGTERM in the worker: stop every probe this worker started, then exit at once."""
    from agent.daemon.process import stop_children
    stop_children()
    os._exit(0)


def worker_main(conn: Connection) -> None:
    """Entry point of the worker process: build the inspector and watcher, serve requests."""
    from agent.daemon.process import lean_worker_imports
    lean_worker_imports()   # before anything imports pystemd or hashlib

    from agent.daemon.process import candidate_predicate, setup_logging, stop_children
    from agent.daemon.watch import UnitWatcher, default_bus_factory

    signal.signal(signal.SIGTERM, _terminate)
    # The daemon's import path first: the inspector factory is unpickled by its name.
    sys.path[:] = conn.recv()
    factory, config, units, watch = conn.recv()
    # The daemon handles ^C and SIGHUP (a reload starts a new worker).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    os.environ.pop("NOTIFY_SOCKET", None)   # only the daemon speaks sd_notify
    setup_logging(getattr(config, "log_level", "info"))
    lock = threading.Lock()

    def send(message: tuple[Any, ...]) -> None:
        with lock:   # the watcher thread and the inspection share the pipe
            conn.send(message)

    try:
        inspect = factory(config)
    except Exception as exc:
        send(("failed", f"{type(exc).__name__}: {exc}" if not isinstance(
            exc, DriftwatchError) else str(exc)))
        return
    if hasattr(inspect, "on_current"):
        inspect.on_current = lambda running: send(("current", running))
    watcher = UnitWatcher(lambda unit: send(("changed", unit)), units=units,
                          is_candidate=candidate_predicate(config),
                          bus_factory=watch if callable(watch) else default_bus_factory
                          ) if watch else None
    if watcher is not None:
        watcher.start()
        # Subscribed before "ready": no change after it is missed. Bounded, because a frozen
        # PID 1 must not keep the worker from serving the inspections it still can.
        watcher.connected.wait(WATCH_READY_SECONDS)
    send(("ready",))
    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break   # the daemon is gone
            if message[0] == "stop":
                break
            if message[0] == "units" and watcher is not None:
                watcher.set_units(message[1])
            elif message[0] == "inspect":
                _, seq, wanted = message
                try:
                    send(("result", seq, inspect(wanted), ""))
                except Exception as exc:  # reported to the daemon, the worker goes on
                    send(("result", seq, None, f"{type(exc).__name__}: {exc}"))
                trim_heap()
    finally:
        if watcher is not None:
            watcher.stop()
        stop_children()


# -- the daemon's side --------------------------------------------------------------------
class _Call:
    """One inspect request waiting for its result."""

    def __init__(self, seq: int, conn: Connection | None) -> None:
        self.seq = seq
        self.conn = conn
        self.done = threading.Event()
        self.result: Snapshot | None = None
        self.error = ""


class WorkerInspect:
    """The cache's Inspect, run in the worker; restarts a worker that died or hung.

    `current` mirrors the running check for mark_running(); on_change(unit) gets the watcher's
    invalidations (None after a restart: signals sent meanwhile were lost).
    """

    def __init__(self, factory: Callable[[Any], Any], config: Any,
                 on_change: Callable[[str | None], None], units: Sequence[str] = (),
                 watch: Watch = True, hang_seconds: float | None = None) -> None:
        self._factory = factory
        self._config = config
        self._on_change = on_change
        self._units = list(units)
        self._watch = watch
        self.hang_seconds = hang_seconds if hang_seconds is not None else (
            float(getattr(config, "probe_timeout_seconds", 20.0)) + HANG_MARGIN_SECONDS)
        self._lock = threading.Lock()        # guards the fields below
        self._call_lock = threading.Lock()   # one inspection at a time
        self._restart_lock = threading.Lock()
        self._retry_at = 0.0                 # no restart storm when the worker cannot start
        self._retired = False
        self._gone = False                   # the worker's pipe closed: it exited or is exiting
        self._proc: Any = None
        self._conn: Connection | None = None
        self._call: _Call | None = None
        self._seq = 0
        self._heard = time.monotonic()       # when the worker last said anything
        self.current: Running | None = None
        self.starts = 0

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Spawn the worker and wait until its inspector is built (raises WorkerError)."""
        ours, theirs = socket.socketpair()
        proc = subprocess.Popen([sys.executable, "-m", "agent.daemon.worker",
                                 str(theirs.fileno())], pass_fds=[theirs.fileno()],
                                stdin=subprocess.DEVNULL)
        theirs.close()
        parent = Connection(ours.detach())
        early: list[str | None] = []
        try:
            parent.send(sys.path)
            parent.send((self._factory, self._config, self._units, self._watch))
            deadline = time.monotonic() + START_TIMEOUT_SECONDS
            while True:
                if not parent.poll(max(0.0, deadline - time.monotonic())):
                    raise WorkerError(
                        f"worker did not start within {START_TIMEOUT_SECONDS:g}s")
                message = parent.recv()
                # The watcher starts before "ready" (so no change is missed), and its first
                # signals can overtake it: keep them, forward once the worker is ours.
                if message[0] == "changed":
                    early.append(message[1])
                elif message[0] != "current":
                    break
        except (EOFError, OSError):
            message = ("failed", f"worker exited with code {proc.poll()}")
        except WorkerError as exc:
            message = ("failed", str(exc))
        if message[0] != "ready":
            parent.close()
            _end(proc, 0)
            raise WorkerError(str(message[1]))
        with self._lock:
            self._proc, self._conn, self.current = proc, parent, None
            self._gone = False
            self._heard = time.monotonic()
            self.starts += 1
        threading.Thread(target=self._read, args=(parent, proc), daemon=True,
                         name="driftwatch-worker-pipe").start()
        for unit in early:
            self._on_change(unit)
        log.debug("worker %d started", proc.pid)

    def stop(self, graceful: bool = False) -> None:
        """End the worker: SIGTERM at once (it stops its probes), or after the running
        inspection finishes (graceful, for a reload)."""
        with self._lock:
            proc, conn = self._proc, self._conn
            self._proc = self._conn = None
            self._retired = self._retired or graceful
        if proc is None:
            return
        if graceful and conn is not None:
            try:
                conn.send(("stop",))
                proc.wait(self.hang_seconds)
            except (OSError, subprocess.TimeoutExpired):
                pass
        _end(proc, STOP_GRACE_SECONDS)
        if conn is not None:
            conn.close()

    def alive(self) -> bool:
        """True while a worker runs."""
        with self._lock:
            return self._proc is not None and not self._gone and self._proc.poll() is None

    def pid(self) -> int | None:
        """The worker's process id (None when none runs)."""
        with self._lock:
            return self._proc.pid if self._proc is not None else None

    def ensure(self) -> None:
        """Restart a worker that died (the daemon's main loop calls this every tick)."""
        if not self.alive() and time.monotonic() >= self._retry_at:
            self._restart("worker not running")

    def set_units(self, units: Sequence[str]) -> None:
        """The units the watcher should watch."""
        units = sorted(units)
        if units == self._units:
            return
        self._units = units
        self._send(("units", units))

    # -- the cache's Inspect ----------------------------------------------------------------
    def __call__(self, units: Sequence[str] | None = None) -> Snapshot:
        """Inspect in the worker; raises WorkerError when it dies or hangs meanwhile."""
        with self._call_lock:
            if not self.alive():
                self._restart("worker not running")
                if not self.alive():
                    raise WorkerError("the worker is not running and could not be restarted")
            with self._lock:
                self._seq += 1
                call = self._call = _Call(self._seq, self._conn)
                self._heard = time.monotonic()
            self._send(("inspect", call.seq, list(units) if units is not None else None))
            while not call.done.wait(1.0):
                with self._lock:
                    silent = time.monotonic() - self._heard
                if silent > self.hang_seconds:
                    self._restart(f"worker silent for {silent:.0f}s during an inspection",
                                  force=True)
                    raise WorkerError(f"inspection hung for {silent:.0f}s; worker restarted")
            with self._lock:
                self._call = None
            if call.result is None:
                raise WorkerError(call.error or "inspection failed")
            return call.result

    # -- internals ------------------------------------------------------------------------
    def _send(self, message: tuple[Any, ...]) -> None:
        with self._lock:
            conn = self._conn
        if conn is None:
            return
        try:
            conn.send(message)
        except OSError as exc:   # the reader sees the worker gone and fails the call
            log.debug("worker pipe: %s", exc)

    def _restart(self, why: str, force: bool = False) -> None:
        """Kill the worker (if any), start a new one, and invalidate everything."""
        with self._restart_lock:
            if self._retired or (self.alive() and not force):
                return
            log.error("%s; restarting the worker", why)
            self.stop()
            try:
                self.start()
            except WorkerError as exc:
                self._retry_at = time.monotonic() + 10.0
                log.error("worker restart failed: %s", exc)
                return
        self._on_change(None)

    def _read(self, conn: Connection, proc: Any) -> None:
        """Pipe reader for one worker: mirror progress, forward changes, deliver results."""
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            with self._lock:
                self._heard = time.monotonic()
                call = self._call
            kind = message[0]
            if kind == "current":
                self.current = message[1]
            elif kind == "changed":
                self._on_change(message[1])
            elif kind == "result" and call is not None and call.seq == message[1]:
                call.result, call.error = message[2], message[3]
                self.current = None
                call.done.set()
                del message
                trim_heap()   # the pickled snapshot's buffers
        with self._lock:
            call = self._call
            if self._conn is conn:
                self._gone = True
        if call is not None and call.conn is conn and not call.done.is_set():
            call.error = f"worker {proc.pid} exited during the inspection"
            call.done.set()


def _end(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM, then SIGKILL after GRACE seconds, and reap."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


if __name__ == "__main__":
    worker_main(Connection(int(sys.argv[1])))
