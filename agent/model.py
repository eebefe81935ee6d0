"""Plain data passed from the I/O edges to the pure logic: no behaviour, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ExecCommand:
    """One ExecStart= command line as systemd stores it."""

    path: str
    argv: tuple[str, ...]


@dataclass(frozen=True)
class UnitProperties:
    """What systemd says about a service unit, decoded to str at the D-Bus edge."""

    name: str
    load_state: str
    active_state: str
    sub_state: str
    fragment_path: str = ""
    drop_in_paths: tuple[str, ...] = ()
    environment: tuple[str, ...] = ()
    # (path, optional): optional is the "-" prefix of EnvironmentFile=.
    environment_files: tuple[tuple[str, bool], ...] = ()
    working_directory: str = ""
    root_directory: str = ""
    exec_start: tuple[ExecCommand, ...] = ()
    user: str = ""
    group: str = ""
    supplementary_groups: tuple[str, ...] = ()
    main_pid: int = 0
    control_pid: int = 0
    need_daemon_reload: bool = False
    # Seconds since the epoch, None when the main process never started.
    exec_main_start_timestamp: float | None = None
    result: str = ""
    # Automatic restarts since the unit was last started by hand (systemd's NRestarts).
    n_restarts: int = 0
    # RestartSec= in seconds: the pause before each automatic restart.
    restart_sec: float = 0.0
    unit_file_state: str = ""
    description: str = ""
    # UnsetEnvironment= entries ("VAR" or "VAR=value") and PassEnvironment= names.
    unset_environment: tuple[str, ...] = ()
    pass_environment: tuple[str, ...] = ()
    # The service manager's own environment, where PassEnvironment= takes its values from.
    manager_environment: tuple[str, ...] = field(default=(), repr=False)
    dynamic_user: bool = False
    # Execution settings as D-Bus gives them (name -> value), carried to the probe's
    # transient unit (agent/privileged/transient.py); never shown.
    exec_settings: dict[str, object] = field(default_factory=dict, repr=False, compare=False,
                                             hash=False)

    @property
    def loaded(self) -> bool:
        """True when systemd found and parsed the unit."""
        return self.load_state == "loaded"


@dataclass(frozen=True)
class Finding:
    """One problem seen on a unit, phrased for an admin, with what to do about it."""

    check: str
    severity: str  # "critical", "warning" or "info"
    message: str
    remedy: str = ""

    def as_dict(self) -> dict[str, str]:
        """JSON-ready form."""
        return {"check": self.check, "severity": self.severity,
                "message": self.message, "remedy": self.remedy}


@dataclass(frozen=True)
class ProcessInfo:
    """One running process of a unit, as read from /proc through psutil."""

    pid: int
    ppid: int
    role: str  # "master" or "worker"
    argv: tuple[str, ...]
    exe: str
    cwd: str
    create_time: float
    username: str
    # Variable names only: values never leave the process-reading edge.
    environ_names: frozenset[str] | None = None
    # Values are kept only to compare with the unit's; as_dict() never shows them.
    environ: dict[str, str] | None = field(default=None, repr=False, compare=False)
    venv: str | None = None
    venv_evidence: str = ""
    error: str = ""

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form, without environment values."""
        return {"pid": self.pid, "ppid": self.ppid, "role": self.role, "argv": list(self.argv),
                "exe": self.exe, "cwd": self.cwd, "create_time": self.create_time,
                "user": self.username, "venv": self.venv, "venv_evidence": self.venv_evidence,
                "error": self.error}
