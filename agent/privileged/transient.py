"""Per-unit work as a transient systemd service carrying the app unit's execution settings.

systemd itself then builds the child's context exactly as for the app: User=/Group=/
SupplementaryGroups=/DynamicUser=, Environment=/EnvironmentFile=/UnsetEnvironment=/
PassEnvironment=, WorkingDirectory=, LoadCredential=/SetCredential=, PrivateTmp=,
ProtectSystem=/ProtectHome=, Read*Paths=/BindPaths=, UMask= (see CARRIED_SETTINGS in
agent/privileged/sources/systemd.py). Limits of our own are added (MemoryMax=, TasksMax=, LimitAS=,
RuntimeMaxSec=), and a stop kills the whole cgroup with SIGKILL, so nothing the app started
(a grandchild in its own session included) outlives the probe. The child's stdin, stdout and
stderr are file descriptors passed over D-Bus (StandardInputFileDescriptor= and friends),
so requests and JSON reports still travel over pipes root owns.

Units without User= (and without DynamicUser=) run as a dynamic user, or as probe_user
when one is configured: app code never runs as root.
"""

from __future__ import annotations

import os
import secrets as pysecrets
import selectors
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

SYSTEMD_RUNTIME_DIR = "/run/systemd/system"
# Signatures pystemd does not know yet (systemd's dbus-execute.c).
EXTRA_SIGNATURES = {
    b"LoadCredential": b"a(ss)", b"LoadCredentialEncrypted": b"a(ss)",
    b"SetCredential": b"a(say)", b"SetCredentialEncrypted": b"a(say)", b"UMask": b"u",
    b"CollectMode": b"s",
}
SIGKILL = 9
TAIL_BYTES = 4096


class TransientError(Exception):
    """The transient unit could not be started."""


@dataclass(frozen=True)
class Limits:
    """The probe's own bounds, whatever the app's unit says."""

    runtime_max_s: float = 20.0
    memory_max_bytes: int = 512 * 1024 * 1024
    # Address space (RLIMIT_AS): holds where no memory controller is delegated (cgroup v1).
    address_space_bytes: int = 2 * 1024 * 1024 * 1024
    tasks_max: int = 64


def available(settings: Mapping[str, Any]) -> bool:
    """True when systemd is the service manager here, we are root, and the unit was read
    from systemd (so there are settings to carry)."""
    return bool(settings) and os.geteuid() == 0 and os.path.isdir(SYSTEMD_RUNTIME_DIR)


def _b(value: Any) -> Any:
    """Back to D-Bus form: str -> bytes (surrogateescape, lossless), recursively."""
    if isinstance(value, str):
        return value.encode("utf-8", errors="surrogateescape")
    if isinstance(value, tuple):  # a D-Bus struct
        return tuple(_b(v) for v in value)
    if isinstance(value, list):
        return [_b(v) for v in value]
    return value


def transient_properties(settings: Mapping[str, Any], *, description: str,
                         extra_env: Mapping[str, str], limits: Limits, probe_user: str = "",
                         allow_root: bool = False) -> dict[bytes, Any]:
    """Pure: the transient unit's properties: the app's settings, then ours.

    allow_root (agentctl exec/upgrade resolving gunicorn's settings of a unit that runs as
    root, no app import): keep the unit's own root instead of a stand-in user.
    """
    props: dict[bytes, Any] = {}
    for name, value in settings.items():
        if name == "WorkingDirectory" and isinstance(value, str) and value.startswith("!"):
            value = "-" + value[1:]  # systemd 252 shows "-/x" as "!/x" on D-Bus
        if name in ("BindPaths", "BindReadOnlyPaths"):
            value = [(s, d, bool(i), int(f)) for s, d, i, f in value]
        elif name in ("EnvironmentFiles",):
            value = [(p, bool(o)) for p, o in value]
        elif name in ("SetCredential", "SetCredentialEncrypted"):
            value = [(n, _b(d) if isinstance(d, str) else bytes(d)) for n, d in value]
        elif name in ("LoadCredential", "LoadCredentialEncrypted", "TemporaryFileSystem"):
            value = [(a, b) for a, b in value]
        props[name.encode()] = _b(value)
    if not settings.get("User") and not settings.get("DynamicUser") and not allow_root:
        # Never as root: a configured probe user, else one systemd allocates for this run.
        if probe_user:
            props[b"User"] = _b(probe_user)
        else:
            props[b"DynamicUser"] = True
    env = list(props.get(b"Environment") or [])
    env += [_b(f"{k}={v}") for k, v in extra_env.items()]
    if env:
        props[b"Environment"] = env
    props.update({
        b"Description": _b(description),
        b"Type": b"exec",
        b"RemainAfterExit": False,
        b"KillMode": b"control-group",
        b"KillSignal": SIGKILL,
        b"SendSIGKILL": True,
        b"RuntimeMaxUSec": int(limits.runtime_max_s * 1_000_000),
        b"MemoryAccounting": True,
        b"MemoryMax": int(limits.memory_max_bytes),
        b"LimitAS": int(limits.address_space_bytes),
        b"LimitASSoft": int(limits.address_space_bytes),
        b"TasksAccounting": True,
        b"TasksMax": int(limits.tasks_max),
        b"Restart": b"no",
    })
    return props


def unit_name(app_unit: str, kind: str = "probe") -> str:
    """A fresh, valid name for one run: driftwatch-<kind>-<app>-<random>.service."""
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in
                   app_unit.removesuffix(".service"))[:80]
    return f"driftwatch-{kind}-{stem}-{pysecrets.token_hex(4)}.service"


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")


@dataclass(frozen=True)
class UnitState:
    """What systemd says about a started transient unit."""

    active: str
    returncode: int | None = None
    result: str = ""   # "success", "oom-kill", "signal", "timeout", "exit-code" ...


class TransientUnit:
    """One started transient service: its state, and a stop that kills the whole cgroup."""

    def __init__(self, source: Any, name: str) -> None:
        self.source = source
        self.name = name
        self._path: bytes | None = None

    def _unit_path(self) -> bytes:
        if self._path is None:
            from agent.privileged.sources.systemd import MANAGER_IFACE, MANAGER_PATH
            self._path = self.source._call(MANAGER_PATH, MANAGER_IFACE, b"LoadUnit", b"s",
                                           [self.name.encode()])
        return self._path

    def state(self) -> UnitState:
        """The unit's state; active "gone" once systemd forgot it."""
        from agent.errors import DriftwatchError
        from agent.privileged.sources.systemd import PROPERTIES_IFACE, SERVICE_IFACE, UNIT_IFACE
        try:
            path = self._unit_path()
            unit = self.source._call(path, PROPERTIES_IFACE, b"GetAll", b"s", [UNIT_IFACE])
            service = self.source._call(path, PROPERTIES_IFACE, b"GetAll", b"s",
                                        [SERVICE_IFACE])
        except DriftwatchError:
            return UnitState("gone")
        if _str(unit.get(b"LoadState")) == "not-found":
            return UnitState("gone")
        code, status = int(service.get(b"ExecMainCode", 0)), int(service.get(b"ExecMainStatus", 0))
        # CLD_EXITED (1): an exit status; CLD_KILLED/CLD_DUMPED: a signal number.
        returncode = None if code == 0 else status if code == 1 else -status
        return UnitState(_str(unit.get(b"ActiveState")), returncode,
                         _str(service.get(b"Result")))

    def finished(self) -> bool:
        """True once the service's processes are all gone."""
        return self.state().active in ("inactive", "failed", "gone")

    def _manager(self, method: bytes, sig: bytes, args: list[Any]) -> None:
        from agent.errors import DriftwatchError
        from agent.privileged.sources.systemd import MANAGER_IFACE, MANAGER_PATH
        try:
            self.source._call(MANAGER_PATH, MANAGER_IFACE, method, sig, args)
        except DriftwatchError:
            pass  # already gone

    def kill(self) -> None:
        """SIGKILL every process of the unit's cgroup, stop it, wait until nothing is left,
        and make systemd forget it (a failed unit would stay loaded until reset)."""
        if not self.finished():
            self._manager(b"KillUnit", b"ssi", [self.name.encode(), b"all", SIGKILL])
            self._manager(b"StopUnit", b"ss", [self.name.encode(), b"replace"])
            self.wait_gone()
        self._manager(b"ResetFailedUnit", b"s", [self.name.encode()])

    def wait_gone(self, timeout: float = 5.0) -> bool:
        """Wait until systemd reports no process left (True) or timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.finished():
                return True
            time.sleep(0.05)
        return False


def start(source: Any, name: str, argv: Sequence[str], props: dict[bytes, Any],
          stdin_fd: int, stdout_fd: int, stderr_fd: int) -> TransientUnit:
    """StartTransientUnit with argv and the given fds as the service's stdio."""
    from agent.errors import DriftwatchError
    from agent.pystemd_lite import start_transient_unit, unit_signatures

    unit_signatures().KNOWN_UNIT_SIGNATURES.update(EXTRA_SIGNATURES)
    full = dict(props)
    full[b"ExecStart"] = [(_b(argv[0]), [_b(a) for a in argv], False)]
    full[b"StandardInputFileDescriptor"] = stdin_fd
    full[b"StandardOutputFileDescriptor"] = stdout_fd
    full[b"StandardErrorFileDescriptor"] = stderr_fd
    try:
        # A plain call: pystemd's Manager object would introspect, with lxml (~6 MiB).
        start_transient_unit(source.bus, name.encode(), b"fail", full)
    except DriftwatchError as exc:
        raise TransientError(str(exc)) from None
    except Exception as exc:  # pystemd's DBusError: a refused property, no systemd
        raise TransientError(f"systemd refused the transient unit: {exc}") from None
    return TransientUnit(source, name)


def collect(unit: TransientUnit, report_fd: int, output_fd: int, deadline: float,
            max_report: int) -> tuple[bytes, bytes, bool]:
    """Read the report and the output tail until the unit's processes are gone or the
    deadline passes; (report, tail, timed_out). The caller kills the unit afterwards."""
    report, tail = bytearray(), bytearray()
    open_fds = {report_fd: "report", output_fd: "out"}
    with selectors.DefaultSelector() as sel:
        for fd, tag in open_fds.items():
            sel.register(fd, selectors.EVENT_READ, tag)
        last_check = 0.0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return bytes(report), bytes(tail), True
            ready = sel.select(min(remaining, 0.1)) if sel.get_map() else []
            for key, _ in ready:
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fd)
                elif key.data == "report":
                    if len(report) + len(chunk) > max_report:
                        sel.unregister(key.fd)
                        report.clear()
                    else:
                        report += chunk
                else:
                    tail += chunk
                    del tail[:-TAIL_BYTES]
            if not sel.get_map():
                return bytes(report), bytes(tail), False
            now = time.monotonic()
            if not ready and now - last_check > 0.1:
                last_check = now
                if unit.finished():
                    # Processes gone: drain what is already in the pipes, then stop.
                    for key in list(sel.get_map().values()):
                        while True:
                            r, _, _ = select_one(key.fd)
                            if not r:
                                break
                            chunk = os.read(key.fd, 65536)
                            if not chunk:
                                break
                            if key.data == "report":
                                report += chunk
                            else:
                                tail += chunk
                                del tail[:-TAIL_BYTES]
                    return bytes(report), bytes(tail), False


def select_one(fd: int) -> tuple[list[int], list[int], list[int]]:
    """select() on one fd without waiting."""
    import select
    return select.select([fd], [], [], 0)
