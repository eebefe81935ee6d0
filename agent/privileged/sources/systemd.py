"""systemd over D-Bus (pystemd): unit properties as plain data, bytes decoded here."""

from __future__ import annotations

import fnmatch
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from agent.execstart import runs_app_server
from agent.errors import AccessDenied, BusUnavailable, DriftwatchError, UnitNotFound
from agent.model import ExecCommand, UnitProperties

DESTINATION = b"org.freedesktop.systemd1"
MANAGER_PATH = b"/org/freedesktop/systemd1"
MANAGER_IFACE = b"org.freedesktop.systemd1.Manager"
UNIT_IFACE = b"org.freedesktop.systemd1.Unit"
SERVICE_IFACE = b"org.freedesktop.systemd1.Service"
PROPERTIES_IFACE = b"org.freedesktop.DBus.Properties"
PRIVATE_SOCKET = "/run/systemd/private"

# Watched whenever it exists, unless units are named explicitly.
DEFAULT_UNIT = "gunicorn.service"
# Set by systemd each time it (re)loads every unit (daemon-reload, daemon-reexec): kept
# properties of a unit are never used across it. 0 until the first reload.
UNITS_LOAD_TIMESTAMP = b"UnitsLoadTimestamp"
# Discovery's verdicts ("runs an app server") are asked again at least this often.
DISCOVERY_MAX_AGE_SECONDS = 300.0


def _text(value: Any) -> str:
    """Decode one D-Bus string; systemd hands us bytes that are UTF-8 in practice."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="surrogateescape")
    return str(value)


def _usec_to_seconds(usec: int) -> float | None:
    """systemd timestamps are µs since the epoch; 0 means 'never'."""
    return usec / 1_000_000 if usec else None


# Execution settings of the app's unit that the probe's transient unit carries over, with
# their D-Bus signatures, so credentials, dynamic users and sandboxing behave as for the app.
CARRIED_SETTINGS: dict[str, str] = {
    "User": "s", "Group": "s", "SupplementaryGroups": "as", "DynamicUser": "b",
    "Environment": "as", "EnvironmentFiles": "a(sb)", "UnsetEnvironment": "as",
    "PassEnvironment": "as", "WorkingDirectory": "s", "RootDirectory": "s",
    "LoadCredential": "a(ss)", "LoadCredentialEncrypted": "a(ss)", "SetCredential": "a(say)",
    "SetCredentialEncrypted": "a(say)", "PrivateTmp": "b", "PrivateDevices": "b",
    "ProtectSystem": "s", "ProtectHome": "s", "ReadWritePaths": "as", "ReadOnlyPaths": "as",
    "InaccessiblePaths": "as", "BindPaths": "a(ssbt)", "BindReadOnlyPaths": "a(ssbt)",
    "TemporaryFileSystem": "a(ss)", "UMask": "u", "NoNewPrivileges": "b",
    "StateDirectory": "as", "RuntimeDirectory": "as", "CacheDirectory": "as",
    "LogsDirectory": "as", "ConfigurationDirectory": "as",
}


def exec_settings_from_dbus(service: Mapping[bytes, Any]) -> dict[str, Any]:
    """Pure: the carried settings the unit really sets (empty lists and strings left out)."""
    out: dict[str, Any] = {}
    for name in CARRIED_SETTINGS:
        value = service.get(name.encode())
        if value is None or (isinstance(value, (bytes, str, list, tuple)) and not value):
            continue
        out[name] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    """D-Bus values as plain JSON-able data: bytes -> str (surrogateescape, lossless)."""
    if isinstance(value, bytes):
        return _text(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def unit_properties_from_dbus(name: str, unit: Mapping[bytes, Any],
                              service: Mapping[bytes, Any],
                              manager_environment: Iterable[Any] = ()) -> UnitProperties:
    """Build UnitProperties from the GetAll() dictionaries of the Unit and Service interfaces."""
    def u(key: str, default: Any = b"") -> Any:
        return unit.get(key.encode(), default)

    def s(key: str, default: Any = b"") -> Any:
        return service.get(key.encode(), default)

    exec_start = tuple(
        ExecCommand(path=_text(entry[0]), argv=tuple(_text(a) for a in entry[1]))
        for entry in s("ExecStart", [])
    )
    return UnitProperties(
        name=_text(u("Id", name.encode())) or name,
        load_state=_text(u("LoadState")),
        active_state=_text(u("ActiveState")),
        sub_state=_text(u("SubState")),
        fragment_path=_text(u("FragmentPath")),
        drop_in_paths=tuple(_text(p) for p in u("DropInPaths", [])),
        environment=tuple(_text(e) for e in s("Environment", [])),
        environment_files=tuple((_text(p), bool(opt)) for p, opt in s("EnvironmentFiles", [])),
        working_directory=_text(s("WorkingDirectory")),
        root_directory=_text(s("RootDirectory")),
        exec_start=exec_start,
        user=_text(s("User")),
        group=_text(s("Group")),
        supplementary_groups=tuple(_text(g) for g in s("SupplementaryGroups", [])),
        main_pid=int(s("MainPID", 0) or 0),
        control_pid=int(s("ControlPID", 0) or 0),
        need_daemon_reload=bool(u("NeedDaemonReload", False)),
        exec_main_start_timestamp=_usec_to_seconds(int(s("ExecMainStartTimestamp", 0) or 0)),
        result=_text(s("Result")),
        n_restarts=int(s("NRestarts", 0) or 0),
        restart_sec=int(s("RestartUSec", 0) or 0) / 1_000_000,
        unit_file_state=_text(u("UnitFileState")),
        description=_text(u("Description")),
        unset_environment=tuple(_text(e) for e in s("UnsetEnvironment", [])),
        pass_environment=tuple(_text(e) for e in s("PassEnvironment", [])),
        manager_environment=tuple(_text(e) for e in manager_environment),
        dynamic_user=bool(s("DynamicUser", False)),
        exec_settings=exec_settings_from_dbus(service),
    )


def select_units(loaded: Iterable[tuple[str, bool]], names: Iterable[str],
                 patterns: Iterable[str], discover_gunicorn: bool) -> list[str]:
    """Pure: the units to watch from (name, runs_gunicorn) pairs, explicit names and globs."""
    chosen: list[str] = []
    for name in names:
        if name not in chosen:
            chosen.append(name)
    pattern_list = list(patterns)
    for name, is_gunicorn in loaded:
        wanted = (discover_gunicorn and is_gunicorn) or any(
            fnmatch.fnmatchcase(name, p) for p in pattern_list)
        if wanted and name not in chosen:
            chosen.append(name)
    return chosen


def normalize_unit_name(name: str) -> str:
    """'gunicorn' -> 'gunicorn.service', as systemctl does for bare names."""
    if "." not in name.rsplit("@", 1)[-1] or name.endswith("@"):
        return f"{name}.service"
    return name


@dataclass(frozen=True)
class _Kept:
    """A unit's full property read and what must be unchanged for it to stay current."""

    props: UnitProperties
    path: bytes
    invocation: bytes
    generation: int


def still_current(kept: _Kept, row: Sequence[Any], generation: int | None) -> bool:
    """Pure: may the kept read stand, given the unit's ListUnitsByNames row and the manager's
    UnitsLoadTimestamp? Only a loaded, active unit with no job pending, in the same sub-state,
    with no unit (re)load since (a loaded active unit is never garbage-collected and loaded
    anew; every other state is read in full). InvocationID and MainPID are asked after this."""
    load_state, active_state, sub_state = (_text(v) for v in row[2:5])
    return (generation is not None and generation == kept.generation
            and load_state == "loaded" and active_state == "active"
            and kept.props.active_state == "active" and sub_state == kept.props.sub_state
            and row[6] == kept.path and not int(row[7] or 0))


class SystemdSource:
    """One shared connection to systemd's D-Bus API, opened lazily, with a call timeout.

    read_units() keeps each unit's full property read and, for a unit that is provably
    unchanged since, asks systemd only for what no kept read can know (NeedDaemonReload,
    which systemd computes on request from the unit files' mtimes)."""

    def __init__(self, timeout_seconds: float = 5.0, address: str | None = None) -> None:
        self.timeout_seconds = timeout_seconds
        self.address = address
        self._bus: Any = None
        self._kept: dict[str, _Kept] = {}
        # Service name -> (UnitsLoadTimestamp, monotonic time asked, runs an app server).
        self._verdicts: dict[str, tuple[int, float, bool]] = {}
        # D-Bus method calls made, by method name (tests count them).
        self.calls: dict[str, int] = {}

    # -- connection ----------------------------------------------------------------------
    def _open(self) -> Any:
        if self._bus is not None:
            return self._bus
        # sd-bus reads its method-call timeout from this variable when the bus is created.
        os.environ["SYSTEMD_BUS_TIMEOUT"] = f"{self.timeout_seconds}s"
        try:
            from pystemd.dbuslib import DBus, DBusAddress
        except ImportError as exc:  # pragma: no cover - install problem
            raise BusUnavailable(f"pystemd is not importable: {exc}") from exc
        errors = []
        candidates: list[Any] = []
        if self.address:
            candidates.append(lambda: DBusAddress(self.address.encode(), peer_to_peer=True))
        else:
            candidates.append(DBus)
            # systemd's private socket needs no dbus-daemon; only root may use it.
            if os.geteuid() == 0 and Path(PRIVATE_SOCKET).exists():
                candidates.append(lambda: DBusAddress(
                    f"unix:path={PRIVATE_SOCKET}".encode(), peer_to_peer=True))
        for make in candidates:
            bus = make()
            try:
                bus.open()
                self._bus = bus
                return bus
            except Exception as exc:  # pystemd raises DBusError subclasses of Exception
                errors.append(str(exc))
        raise BusUnavailable("cannot reach systemd over D-Bus (is systemd running? "
                             f"{'; '.join(errors)})")

    def close(self) -> None:
        """Close the shared connection."""
        self._kept.clear()
        self._verdicts.clear()
        if self._bus is not None:
            try:
                self._bus.close()
            finally:
                self._bus = None

    @property
    def bus(self) -> Any:
        """The open pystemd bus, for signal subscriptions."""
        return self._open()

    def _call(self, path: bytes, interface: bytes, method: bytes, signature: bytes,
              args: list[Any]) -> Any:
        from pystemd.dbuslib import apply_signature
        bus = self._open()
        key = method.decode() if method not in (b"Get", b"GetAll") or not args else \
            f"{method.decode()}({_text(args[-1])})"
        self.calls[key] = self.calls.get(key, 0) + 1
        try:
            return bus.call_method(DESTINATION, path, interface, method,
                                   apply_signature(signature, args) if signature else []).body
        except Exception as exc:
            raise _translate_error(exc) from exc

    def _get_all(self, path: bytes, interface: bytes) -> dict[bytes, Any]:
        return self._call(path, PROPERTIES_IFACE, b"GetAll", b"s", [interface])

    def _get(self, path: bytes, interface: bytes, prop: bytes) -> Any:
        return self._call(path, PROPERTIES_IFACE, b"Get", b"ss", [interface, prop])

    # -- queries -------------------------------------------------------------------------
    def read_unit(self, name: str) -> UnitProperties:
        """All properties driftwatch uses of one service; UnitNotFound when systemd has none."""
        name = normalize_unit_name(name)
        path = self._call(MANAGER_PATH, MANAGER_IFACE, b"LoadUnit", b"s", [name.encode()])
        return self._read_full(name, path)[0]

    def read_units(self, names: Sequence[str]) -> dict[str, UnitProperties | DriftwatchError]:
        """Every unit's properties in one pass: one ListUnitsByNames (which loads them, as
        LoadUnit does) and one manager Get for all; per unit, a full read (GetAll of Unit and
        Service) only when no kept read is provably current, else three one-property Gets
        (InvocationID and MainPID: a restart or a re-executed main process; NeedDaemonReload).
        A unit's error (not found, masked, not a service) comes back as its value."""
        names = list(dict.fromkeys(normalize_unit_name(n) for n in names))
        out: dict[str, UnitProperties | DriftwatchError] = {}
        if not names:
            return out
        rows = self._call(MANAGER_PATH, MANAGER_IFACE, b"ListUnitsByNames", b"as",
                          [[n.encode() for n in names]])
        generation = self._generation()
        manager_env: list[Any] | None = None
        for name, row in zip(names, rows):
            try:
                kept = self._kept.get(name)
                props = self._kept_props(kept, row, generation) if kept is not None else None
                if props is None:
                    props, unit = self._read_full(name, row[6])
                    self._kept[name] = _Kept(props, row[6], bytes(unit.get(b"InvocationID", b"")),
                                             generation if generation is not None else -1)
                elif props.pass_environment:
                    # systemctl set-environment changes it without touching any unit.
                    if manager_env is None:
                        manager_env = self._manager_environment()
                    props = replace(props, manager_environment=tuple(
                        _text(e) for e in manager_env))
                out[name] = props
            except DriftwatchError as exc:   # this unit's problem, never another's
                self._kept.pop(name, None)
                out[name] = exc
        return out

    def keep_only(self, names: Iterable[str]) -> None:
        """Drop the kept reads of units no longer watched (memory stays bounded)."""
        wanted = {normalize_unit_name(n) for n in names}
        for name in [n for n in self._kept if n not in wanted]:
            del self._kept[name]

    def forget(self, name: str | None = None) -> None:
        """Drop the kept read of one unit (or all): its next read is a full one."""
        if name is None:
            self._kept.clear()
        else:
            self._kept.pop(normalize_unit_name(name), None)

    def _generation(self) -> int | None:
        """The manager's UnitsLoadTimestamp (None where systemd lacks it: no kept reads)."""
        try:
            return int(self._get(MANAGER_PATH, MANAGER_IFACE, UNITS_LOAD_TIMESTAMP))
        except (UnitNotFound, AccessDenied, BusUnavailable, TypeError, ValueError):
            return None

    def _kept_props(self, kept: _Kept, row: Sequence[Any],
                    generation: int | None) -> UnitProperties | None:
        """The kept properties brought up to date, or None when a full read is needed."""
        if not still_current(kept, row, generation):
            return None
        path = kept.path
        if bytes(self._get(path, UNIT_IFACE, b"InvocationID")) != kept.invocation:
            return None
        if int(self._get(path, SERVICE_IFACE, b"MainPID") or 0) != kept.props.main_pid:
            return None
        return replace(kept.props, need_daemon_reload=bool(
            self._get(path, UNIT_IFACE, b"NeedDaemonReload")))

    def _manager_environment(self) -> list[Any]:
        return self._get(MANAGER_PATH, MANAGER_IFACE, b"Environment")

    def _read_full(self, name: str, path: bytes) -> tuple[UnitProperties, dict[bytes, Any]]:
        """GetAll of the Unit (and Service) interface of a unit loaded at path."""
        unit = self._get_all(path, UNIT_IFACE)
        load_state = _text(unit.get(b"LoadState", b""))
        if load_state in ("not-found", "masked") and not unit.get(b"FragmentPath"):
            raise UnitNotFound(f"unit {name} not found" if load_state == "not-found"
                               else f"unit {name} is masked")
        if not name.endswith(".service"):
            raise DriftwatchError(f"{name} is not a service unit")
        service = self._get_all(path, SERVICE_IFACE)
        manager_env: list[Any] = []
        if service.get(b"PassEnvironment"):  # values come from the manager's environment
            manager_env = self._manager_environment()
        return unit_properties_from_dbus(name, unit, service, manager_env), unit

    def list_services(self) -> list[tuple[str, str]]:
        """(name, object path) of every loaded service unit."""
        return [(name, path) for name, path, _active in self._list_services()]

    def _list_services(self) -> list[tuple[str, Any, str]]:
        rows = self._call(MANAGER_PATH, MANAGER_IFACE, b"ListUnitsByPatterns", b"asas",
                          [[], [b"*.service"]])
        return [(_text(r[0]), r[6], _text(r[3])) for r in rows if _text(r[2]) == "loaded"]

    def _runs_app_server(self, name: str, path: Any, active: str, generation: int | None,
                         now: float) -> bool:
        """Does this loaded service run an app server? Its ExecStart is asked again only
        after a unit (re)load, when it was not active, or after DISCOVERY_MAX_AGE_SECONDS
        (an active unit that stopped, was garbage-collected, edited and started again
        between two runs without a daemon-reload is the one case this age bounds)."""
        known = self._verdicts.get(name)
        if (known is not None and generation is not None and known[0] == generation
                and active == "active" and now - known[1] < DISCOVERY_MAX_AGE_SECONDS):
            return known[2]
        exec_start = self._get(path, SERVICE_IFACE, b"ExecStart")
        verdict = runs_app_server([ExecCommand(_text(e[0]), tuple(_text(a) for a in e[1]))
                                   for e in exec_start])   # uvicorn too
        if active == "active" and generation is not None:
            self._verdicts[name] = (generation, now, verdict)
        else:
            self._verdicts.pop(name, None)
        return verdict

    def discover(self, names: Iterable[str] = (), patterns: Iterable[str] = (),
                 discover_gunicorn: bool = True) -> list[str]:
        """Units to watch: the named ones plus loaded services running gunicorn or matching.

        Without explicit names, gunicorn.service is watched whenever systemd knows it, running
        or not (a stopped or failed one is what an admin wants to hear about); when nothing at
        all is found it is still returned, so the answer is "not found" rather than silence.
        """
        listed = self._list_services()
        generation = self._generation()
        now = time.monotonic()
        loaded = [(name, self._runs_app_server(name, path, active, generation, now))
                  for name, path, active in listed]
        for gone in set(self._verdicts) - {name for name, _p, _a in listed}:
            del self._verdicts[gone]
        names = [normalize_unit_name(n) for n in names]
        chosen = select_units(loaded, names, patterns, discover_gunicorn)
        if not names:
            if DEFAULT_UNIT in chosen or self.unit_exists(DEFAULT_UNIT) or not chosen:
                chosen = [DEFAULT_UNIT, *(u for u in chosen if u != DEFAULT_UNIT)]
        return chosen

    def unit_exists(self, name: str) -> bool:
        """True when systemd has a unit file (or a loaded unit) of that name."""
        path = self._call(MANAGER_PATH, MANAGER_IFACE, b"LoadUnit", b"s",
                          [normalize_unit_name(name).encode()])
        state = self._call(path, PROPERTIES_IFACE, b"Get", b"ss", [UNIT_IFACE, b"LoadState"])
        return _text(state) not in ("not-found", "masked")

    def restart_unit(self, name: str, mode: str = "replace") -> str:
        """Ask systemd to restart a unit; returns the job path."""
        job = self._call(MANAGER_PATH, MANAGER_IFACE, b"RestartUnit", b"ss",
                         [normalize_unit_name(name).encode(), mode.encode()])
        return _text(job)


def _translate_error(exc: Exception) -> DriftwatchError:
    """Map a pystemd DBusError to driftwatch's exception tree."""
    text = str(exc)
    if "NoSuchUnit" in text or "not loaded" in text:
        return UnitNotFound(text)
    if "AccessDenied" in text or "Permission denied" in text or "InteractiveAuthorization" in text:
        return AccessDenied(f"systemd refused the request: {text}")
    return BusUnavailable(f"D-Bus call failed: {text}")
