"""systemd over D-Bus (pystemd): unit properties as plain data, bytes decoded here."""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable, Mapping
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


class SystemdSource:
    """One shared connection to systemd's D-Bus API, opened lazily, with a call timeout."""

    def __init__(self, timeout_seconds: float = 5.0, address: str | None = None) -> None:
        self.timeout_seconds = timeout_seconds
        self.address = address
        self._bus: Any = None

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
        try:
            return bus.call_method(DESTINATION, path, interface, method,
                                   apply_signature(signature, args) if signature else []).body
        except Exception as exc:
            raise _translate_error(exc) from exc

    def _get_all(self, path: bytes, interface: bytes) -> dict[bytes, Any]:
        return self._call(path, PROPERTIES_IFACE, b"GetAll", b"s", [interface])

    # -- queries -------------------------------------------------------------------------
    def read_unit(self, name: str) -> UnitProperties:
        """All properties driftwatch uses of one service; UnitNotFound when systemd has none."""
        name = normalize_unit_name(name)
        path = self._call(MANAGER_PATH, MANAGER_IFACE, b"LoadUnit", b"s", [name.encode()])
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
            manager_env = self._call(MANAGER_PATH, PROPERTIES_IFACE, b"Get", b"ss",
                                     [MANAGER_IFACE, b"Environment"])
        return unit_properties_from_dbus(name, unit, service, manager_env)

    def list_services(self) -> list[tuple[str, str]]:
        """(name, object path) of every loaded service unit."""
        rows = self._call(MANAGER_PATH, MANAGER_IFACE, b"ListUnitsByPatterns", b"asas",
                          [[], [b"*.service"]])
        return [(_text(r[0]), r[6]) for r in rows if _text(r[2]) == "loaded"]

    def discover(self, names: Iterable[str] = (), patterns: Iterable[str] = (),
                 discover_gunicorn: bool = True) -> list[str]:
        """Units to watch: the named ones plus loaded services running gunicorn or matching.

        Without explicit names, gunicorn.service is watched whenever systemd knows it, running
        or not (a stopped or failed one is what an admin wants to hear about); when nothing at
        all is found it is still returned, so the answer is "not found" rather than silence.
        """
        loaded = []
        for name, path in self.list_services():
            exec_start = self._call(path, PROPERTIES_IFACE, b"Get", b"ss",
                                    [SERVICE_IFACE, b"ExecStart"])
            commands = [ExecCommand(_text(e[0]), tuple(_text(a) for a in e[1]))
                        for e in exec_start]
            loaded.append((name, runs_app_server(commands)))  # uvicorn too
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
