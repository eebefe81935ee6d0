"""systemd signals on one dedicated D-Bus connection: a unit restart invalidates the cache at once."""

from __future__ import annotations

import logging
import os
import select
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

log = logging.getLogger(__name__)

DESTINATION = b"org.freedesktop.systemd1"
MANAGER_PATH = b"/org/freedesktop/systemd1"
MANAGER_IFACE = b"org.freedesktop.systemd1.Manager"
PROPERTIES_IFACE = b"org.freedesktop.DBus.Properties"
# The properties whose change means "the processes we inspected are not the ones running now".
WATCHED_PROPERTIES = frozenset({b"ActiveState", b"MainPID", b"ExecMainStartTimestamp"})
# sd_bus_process() handles one message per call, and sd-bus may already have read several
# messages off the socket, so select() would not wake again for them: drain a bounded batch.
PROCESS_BATCH = 64
POLL_SECONDS = 5.0


class Bus(Protocol):
    """The part of pystemd.dbuslib.DBus the watcher uses (a fake in unit tests)."""

    def call_method(self, destination: bytes, path: bytes, interface: bytes, method: bytes,
                    args: list[Any]) -> Any: ...
    def match_signal(self, sender: bytes | None, path: bytes | None, interface: bytes,
                     member: bytes, callback: Callable[..., Any], userdata: Any = None) -> None: ...
    def get_fd(self) -> int: ...
    def process(self) -> Any: ...
    def close(self) -> None: ...


def unit_object_path(unit: str) -> bytes:
    """systemd's object path of UNIT (bus label escaping, as sd_bus_path_encode does)."""
    out = []
    for i, byte in enumerate(unit.encode()):
        char = chr(byte)
        keep = char.isascii() and (char.isalpha() or (char.isdigit() and i > 0))
        out.append(char if keep else f"_{byte:02x}")
    return b"/org/freedesktop/systemd1/unit/" + ("".join(out) or "_").encode()


def relevant_change(changed: Mapping[bytes, Any], invalidated: Iterable[bytes]) -> bool:
    """Pure: does a PropertiesChanged body mean the unit restarted, stopped or reloaded?"""
    return bool(WATCHED_PROPERTIES.intersection(changed)
                or WATCHED_PROPERTIES.intersection(invalidated))


def default_bus_factory() -> Bus:
    """A new, dedicated connection to systemd (system bus, else its private socket as root)."""
    from agent.privileged.sources.systemd import SystemdSource
    return SystemdSource().bus


class UnitWatcher:
    """Background thread: Subscribe(), match signals, call on_change(unit or None) on changes.

    on_change(None) means "anything may have changed" (e.g. after a reconnect, signals were lost).
    """

    def __init__(self, on_change: Callable[[str | None], None], units: Sequence[str] = (),
                 is_candidate: Callable[[str], bool] = lambda name: False,
                 bus_factory: Callable[[], Bus] = default_bus_factory,
                 max_backoff_seconds: float = 60.0,
                 backoff_wait: Callable[[float], object] | None = None) -> None:
        self._on_change = on_change
        self._units = frozenset(units)
        self._is_candidate = is_candidate
        self._bus_factory = bus_factory
        self._max_backoff = max_backoff_seconds
        self._stop = threading.Event()
        # Sits out a reconnect backoff; injectable so tests run the backoff on their own clock.
        self._backoff_wait = backoff_wait or self._stop.wait
        self._resubscribe = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        self._thread: threading.Thread | None = None
        # pystemd hands sd-bus a borrowed pointer to each callback and keeps no reference:
        # a callback garbage-collected while its match exists segfaults the process.
        self._callbacks: list[Callable[..., None]] = []
        self.connected = threading.Event()
        self.connections = 0   # successful (re)connects, for tests and logs

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Start the watcher thread."""
        self._thread = threading.Thread(target=self._run, name="driftwatch-watch", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the thread and close the bus and the wake-up pipe."""
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def is_alive(self) -> bool:
        """True while the thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def set_units(self, units: Iterable[str]) -> None:
        """Watch these units from now on; the matches are renewed on a fresh connection."""
        new = frozenset(units)
        if new != self._units:
            self._units = new
            self._resubscribe.set()
            self._wake()

    def set_candidate(self, is_candidate: Callable[[str], bool]) -> None:
        """Replace the predicate for new units that discovery could pick up (config reload)."""
        self._is_candidate = is_candidate

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    # -- the loop -------------------------------------------------------------------------
    def _run(self) -> None:
        backoff = 1.0
        while not self._stop.is_set():
            bus = None
            try:
                bus = self._connect()
                if self.connections > 1:
                    # Signals sent while we were away are lost: assume everything changed.
                    self._notify(None)
                backoff = 1.0
                self._serve(bus)
            except Exception as exc:  # pystemd raises DBusError; any failure means reconnect
                self.connected.clear()
                level = logging.WARNING if backoff <= 1.0 else logging.DEBUG
                log.log(level, "systemd signal watch unavailable (%s); retrying in %.0fs",
                        exc, backoff)
                self._backoff_wait(backoff)
                backoff = min(backoff * 2, self._max_backoff)
            finally:
                if bus is not None:
                    try:
                        bus.close()
                    except Exception:  # closing a dead bus must not kill the thread
                        pass

    def _connect(self) -> Bus:
        """Open a bus, Subscribe() and add the matches for the current unit set."""
        self._resubscribe.clear()
        bus = self._bus_factory()
        # The previous bus is closed, so its matches (and their callbacks) are gone.
        self._callbacks = []
        try:
            # Without Subscribe() systemd does not emit unit signals to this client at all.
            bus.call_method(DESTINATION, MANAGER_PATH, MANAGER_IFACE, b"Subscribe", [])
            for unit in sorted(self._units):
                # sender None: on systemd's private socket signals carry no well-known name.
                callback = self._properties_callback(unit)
                self._callbacks.append(callback)
                bus.match_signal(None, unit_object_path(unit), PROPERTIES_IFACE,
                                 b"PropertiesChanged", callback)
            for member in (b"UnitNew", b"UnitRemoved", b"JobRemoved"):
                callback = self._manager_callback(member)
                self._callbacks.append(callback)
                bus.match_signal(None, MANAGER_PATH, MANAGER_IFACE, member, callback)
        except Exception:
            bus.close()
            raise
        self.connections += 1
        self.connected.set()
        log.debug("watching %d units for systemd signals", len(self._units))
        return bus

    def _serve(self, bus: Bus) -> None:
        """select() on the bus fd until stop or resubscribe; raises when the bus drops."""
        fd = bus.get_fd()
        if fd < 0:
            raise OSError(-fd, "bus has no file descriptor")
        while not self._stop.is_set() and not self._resubscribe.is_set():
            readable, _, _ = select.select([fd, self._wake_r], [], [], POLL_SECONDS)
            if self._wake_r in readable:
                os.read(self._wake_r, 4096)
            # Also on timeout: a dead connection raises here, and buffered messages get handled.
            # pystemd hides sd_bus_process()'s "more to do" result (a message consumed by a
            # match callback looks like an empty one), so run the whole batch: an idle call is
            # a non-blocking no-op costing microseconds.
            for _ in range(PROCESS_BATCH):
                bus.process()

    # -- signal callbacks (run inside bus.process(); they must never raise) -----------------
    def _notify(self, unit: str | None) -> None:
        try:
            self._on_change(unit)
        except Exception:
            log.exception("unit change callback failed")

    def _properties_callback(self, unit: str) -> Callable[..., None]:
        # A plain closure, not a bound method: pystemd sets an attribute on the callback.
        def callback(msg: Any, error: Any = None, userdata: Any = None) -> None:
            try:
                msg.process_reply(False)
                _iface, changed, invalidated = msg.body
                if relevant_change(changed or {}, invalidated or ()):
                    log.debug("%s changed (%s)", unit,
                              b",".join(sorted(WATCHED_PROPERTIES.intersection(
                                  [*(changed or {}), *(invalidated or ())]))).decode())
                    self._notify(unit)
            except Exception:
                log.exception("bad PropertiesChanged signal for %s", unit)
        return callback

    def _manager_callback(self, member: bytes) -> Callable[..., None]:
        def callback(msg: Any, error: Any = None, userdata: Any = None) -> None:
            try:
                msg.process_reply(False)
                body = msg.body
                # UnitNew/UnitRemoved: (id, path); JobRemoved: (id, job, unit, result).
                raw = body[2] if member == b"JobRemoved" else body[0]
                name = raw.decode() if isinstance(raw, bytes) else str(raw)
                if name in self._units or self._is_candidate(name):
                    self._notify(name)
            except Exception:
                log.exception("bad %s signal", member.decode())
        return callback
