"""The snapshot: everything one inspection run learnt, shared by metrics, /status and agentctl."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from agent.model import Finding


@dataclass(frozen=True)
class CheckRun:
    """One check's outcome for one unit: did it manage to look, and how long it took."""

    name: str
    success: bool
    duration_seconds: float
    error: str = ""


@dataclass(frozen=True)
class DriftItem:
    """One object where the live schema differs from the app's models."""

    kind: str      # add_table, remove_column, modify_type, ...
    table: str
    name: str
    detail: str = ""


@dataclass(frozen=True)
class MigrationState:
    """Where the database stands against the revision graph of the deployed code."""

    version_table_present: bool
    current: tuple[str, ...] = ()
    heads: tuple[str, ...] = ()
    pending: tuple[str, ...] = ()       # in upgrade order
    multiple_heads: bool = False
    unknown: tuple[str, ...] = ()       # database revisions the code does not know
    in_progress: bool = False
    # False while a migration holds the version table: current/pending are not known now.
    current_readable: bool = True
    version_table: str = "alembic_version"   # as env.py names it ("schema.table" if set)


@dataclass(frozen=True)
class UnitSnapshot:
    """One watched unit at one moment. None means 'could not be determined'."""

    unit: str
    timestamp: float
    unit_up: bool
    active_state: str = ""
    main_pid: int = 0
    started_at: float | None = None
    database: str = ""                   # host:port/dbname, never credentials
    # The database's SQLAlchemy backend: postgresql, sqlite, mysql, ... ("" = no URL known).
    backend: str = ""
    # Checks that do not apply to this unit and why (e.g. privileges on SQLite).
    notes: tuple[str, ...] = ()
    app_loaded: bool | None = None
    db_up: bool | None = None
    migrations: MigrationState | None = None
    schema_drift: tuple[DriftItem, ...] | None = None
    venv: str = ""
    venv_mismatch: bool = False
    stale_environment_variables: int = 0
    # Names (never values) of the first stale variables, for the alert's description.
    stale_variable_names: tuple[str, ...] = ()
    unit_file: str = ""                  # the fragment systemd loaded the unit from
    needs_daemon_reload: bool = False
    needs_restart: bool = False
    database_mismatch: bool | None = None
    database_connections: str = ""      # what the workers' sockets say, in words
    migration_privileges_ok: bool | None = None
    applied_migrations_modified: int = 0
    # (revision, file name) of the applied migrations whose file changed since they ran.
    modified_migration_files: tuple[tuple[str, str], ...] = ()
    journal_schema_errors: dict[str, int] = field(default_factory=dict)  # kind -> total
    # agentctl plan's preflight (agent/preflight/watch.py summary): risk, counts per level,
    # one line per pending revision; None when it did not run
    preflight: dict[str, Any] | None = None
    # kind -> errors within the look-back window, including those before the agent started.
    journal_schema_errors_recent: dict[str, int] = field(default_factory=dict)
    # check -> when it last succeeded (seconds since the epoch); values of a check that failed
    # now are the last known ones, carried over.
    last_success: dict[str, float] = field(default_factory=dict)
    checks: tuple[CheckRun, ...] = ()
    findings: tuple[Finding, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (no secrets are ever stored in a snapshot)."""
        return asdict(self)

    @property
    def has_problems(self) -> bool:
        """True when any finding is a warning or worse."""
        return any(f.severity in ("critical", "warning") for f in self.findings)

    @property
    def could_not_inspect(self) -> bool:
        """True when a check that matters failed to look (exit code 2 territory)."""
        return any(not c.success for c in self.checks)


@dataclass(frozen=True)
class Snapshot:
    """All watched units at one moment."""

    units: tuple[UnitSnapshot, ...]
    taken_at: float = field(default_factory=time.time)
    duration_seconds: float = 0.0
    errors: tuple[str, ...] = ()         # e.g. systemd unreachable, discovery failed
    state_store: str = ""                # ok, read_only, full, error ("" = not used yet)
    journal_window_seconds: float = 0.0  # the look-back window of the journal gauge

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form, the body of /status."""
        return {"taken_at": self.taken_at, "duration_seconds": self.duration_seconds,
                "errors": list(self.errors), "state_store": self.state_store,
                "journal_window_seconds": self.journal_window_seconds,
                "units": [u.as_dict() for u in self.units]}
