"""Every metric name, help text and label in one place, and the collector built on Snapshot."""

from __future__ import annotations

import platform
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from typing import TYPE_CHECKING

from agent import __version__
from agent.checks.schema import KINDS as schema_kinds
from agent.snapshot import Snapshot, UnitSnapshot

# The same values as agent.privileged.sources.journal.KINDS and agent.privileged.state.CONDITIONS
# (tests/unit/test_metrics.py checks): importing those modules would load the sd-journal
# bindings and sqlite3 into the daemon serving HTTP, which never reads a journal or the store.
JOURNAL_KINDS = ("undefined_column", "undefined_table")
STATE_STORE_CONDITIONS = ("ok", "read_only", "full", "error")

if TYPE_CHECKING:
    from prometheus_client.core import Metric

PREFIX = "driftwatch_"


@dataclass(frozen=True)
class Spec:
    """Name (without prefix, counters without _total), help, labels and type of one metric."""

    name: str
    help: str
    labels: tuple[str, ...] = ("unit",)
    counter: bool = False

    @property
    def full_name(self) -> str:
        """The exposed name (counters get _total from prometheus_client)."""
        return PREFIX + self.name + ("_total" if self.counter else "")

    def family(self) -> Metric:
        """A fresh, empty metric family: new objects on every scrape, never stale labels."""
        # Imported here: the inspection worker imports this module (the cache's stats) but
        # never renders, and prometheus_client loads http.server, wsgiref, ... (~11 MiB).
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        cls = CounterMetricFamily if self.counter else GaugeMetricFamily
        return cls(PREFIX + self.name, self.help, labels=list(self.labels))


# -- the agent itself -----------------------------------------------------------------------
BUILD_INFO = Spec("build_info", "Agent version and Python version; value is always 1.",
                  ("version", "python"))
SCRAPE_DURATION = Spec("scrape_collection_duration_seconds",
                       "Time this scrape spent collecting, including waiting for an inspection.",
                       ())
INSPECTIONS = Spec("inspections", "Inspection runs actually executed (cached scrapes do not count).",
                   (), counter=True)
INSPECTION_FAILURES = Spec("inspection_failures",
                           "Inspection runs that raised instead of returning a snapshot.",
                           (), counter=True)
INSPECTION_SUCCESS = Spec("inspection_success",
                          "1 if the latest inspection run returned a snapshot, 0 if it failed.", ())
INSPECTION_DURATION = Spec("inspection_duration_seconds",
                           "How long the inspection behind the served snapshot took.", ())
SNAPSHOT_TIMESTAMP = Spec("snapshot_timestamp_seconds",
                          "When the served snapshot was taken (seconds since the epoch).", ())
INSPECTION_ERRORS = Spec("inspection_errors",
                         "Agent-wide problems in the served snapshot (e.g. systemd unreachable).",
                         ())
UNITS_WATCHED = Spec("units_watched", "Number of units in the served snapshot.", ())
STATE_STORE = Spec("state_store_condition",
                   "1 for the agent's state store condition (ok, read_only, full, error), "
                   "0 for the others; read_only/full: migration-file hashes are not recorded.",
                   ("condition",))

# -- per unit -------------------------------------------------------------------------------
UNIT_UP = Spec("unit_up", "1 if systemd reports the unit active, 0 otherwise.")
CHECK_SUCCESS = Spec("check_success",
                     "1 if the check managed to look (whatever it found), 0 if it failed to run.",
                     ("unit", "check"))
CHECK_DURATION = Spec("check_duration_seconds", "How long the check took.", ("unit", "check"))
UNIT_START_TIMESTAMP = Spec("unit_start_timestamp_seconds",
                            "When the unit's main process started (seconds since the epoch); "
                            "changes on every restart.")
LAST_CHECK_TIMESTAMP = Spec("last_check_timestamp_seconds",
                            "When the unit was last inspected (seconds since the epoch).")
APP_LOAD_SUCCESS = Spec("app_load_success",
                        "1 if the app could be loaded in the unit's exact context, 0 otherwise.")
DB_UP = Spec("db_up", "1 if the app's database answered, 0 if not; absent when not tried.")
DATABASE_INFO = Spec("database_info",
                     "The database the app is configured for (host:port/dbname, or "
                     "sqlite:/path) and its backend (postgresql, sqlite, mysql, ...); value "
                     "is 1.",
                     ("unit", "database", "backend"))
VERSION_TABLE_PRESENT = Spec("version_table_present",
                             "1 if the database has an alembic_version table.")
REVISION_INFO = Spec("revision_info",
                     "Current database revision(s) and code head revision(s), comma-separated "
                     "(one series per unit); value is 1, empty label when there is none.",
                     ("unit", "current", "head"))
PENDING_REVISIONS = Spec("pending_revisions",
                         "Migrations in the deployed code not yet applied to the database.")
MIGRATION_HEADS = Spec("migration_heads", "Number of head revisions in the deployed code.")
DB_REVISION_UNKNOWN = Spec("db_revision_unknown",
                           "1 if the database is at a revision the deployed code does not know.")
MIGRATION_IN_PROGRESS = Spec("migration_in_progress",
                             "1 if a migration appears to be running right now.")
HALF_APPLIED_REVISION = Spec("half_applied_revision",
                             "1 if the revision after the database's current one ran in part "
                             "and failed (MySQL/MariaDB: its objects exist, the version table "
                             "does not say so); a retried upgrade fails.")
SCHEMA_DRIFT_OBJECTS = Spec("schema_drift_objects",
                            "Schema objects that differ between the database and the models.",
                            ("unit", "kind"))
APPLIED_MIGRATION_MODIFIED = Spec("applied_migration_modified",
                                  "Already-applied migration files changed since they ran.")
MODIFIED_MIGRATION = Spec("applied_migration_modified_info",
                          "An applied migration whose file changed since it ran (revision id and "
                          "file name); value is 1, at most 8 per unit.",
                          ("unit", "revision", "file"))
VENV_MISMATCH = Spec("venv_mismatch",
                     "1 if running processes use another virtualenv than the unit's ExecStart.")
STALE_ENV = Spec("environment_stale_variables",
                 "Variables whose value in the running processes differs from the unit's.")
STALE_VARIABLE = Spec("environment_stale_variable_info",
                      "Name of a variable whose running value differs from the unit's (never "
                      "the value); value is 1, at most 8 per unit.", ("unit", "variable"))
UNIT_FILE = Spec("unit_file_info", "The file systemd loaded the unit from; value is 1.",
                 ("unit", "path"))
NEEDS_DAEMON_RELOAD = Spec("needs_daemon_reload",
                           "1 if the unit file changed and systemctl daemon-reload is due.")
NEEDS_RESTART = Spec("needs_restart",
                     "1 if code, environment or schema changed after the processes started.")
DATABASE_MISMATCH = Spec("database_mismatch",
                         "1 if the running workers use another database than the configured one.")
MIGRATION_PRIVILEGES_OK = Spec("migration_privileges_ok",
                               "1 if the app's database role may run its migrations.")
JOURNAL_SCHEMA_ERRORS = Spec("journal_schema_errors",
                             "Schema errors (kind undefined_column, undefined_table) logged in the "
                             "unit's journal after the agent started; the journal cursor is kept "
                             "in the state directory, so a restart neither re-counts nor loses.",
                             ("unit", "kind"), counter=True)
JOURNAL_SCHEMA_ERRORS_RECENT = Spec("journal_schema_errors_recent",
                                    "Schema errors in the unit's journal within the look-back "
                                    "window (driftwatch_journal_window_seconds), including those "
                                    "logged before the agent started.", ("unit", "kind"))
JOURNAL_WINDOW = Spec("journal_window_seconds",
                      "The look-back window of driftwatch_journal_schema_errors_recent.", ())
CHECK_STALENESS = Spec("check_staleness_seconds",
                       "Seconds since the check last succeeded for the unit (0: it just did); "
                       "while it fails, the unit's gauges from it keep their last known values.",
                       ("unit", "check"))
FINDINGS = Spec("findings", "Problems found on the unit, by severity.", ("unit", "severity"))
PENDING_MIGRATION_RISK = Spec("pending_migration_risk",
                              "Pending migrations by preflight risk level (low, high, critical).",
                              ("unit", "level"))

ALL_SPECS: tuple[Spec, ...] = tuple(v for v in list(globals().values()) if isinstance(v, Spec))

# Always exposed (as 0 when absent) so dashboards and alerts see a stable series per kind.
# The admin-facing kinds of agent.checks.schema; the common ones always exported (0 if none)
# so that series stay stable across scrapes.
DRIFT_KINDS = ("missing_table", "extra_table", "missing_column", "extra_column", "column_type",
               "column_nullable", "missing_index", "extra_index")
SEVERITIES = ("critical", "warning", "info")
RISK_LEVELS = ("low", "high", "critical")  # agent/preflight/risk.py LEVELS
# The checks of agent.privileged.inspector, each a `check` label value.
CHECKS = ("unit", "app_load", "database", "migrations", "schema", "privileges", "connections",
          "workers_database", "integrity", "journal", "inspection", "preflight")
# Every value a bounded label can take, per metric: what alert rules and their tests may match.
LABEL_VALUES: dict[Spec, dict[str, tuple[str, ...]]] = {
    CHECK_SUCCESS: {"check": CHECKS},
    CHECK_DURATION: {"check": CHECKS},
    CHECK_STALENESS: {"check": CHECKS},
    SCHEMA_DRIFT_OBJECTS: {"kind": tuple(dict.fromkeys((*DRIFT_KINDS, *schema_kinds.values(),
                                                        "other")))},
    JOURNAL_SCHEMA_ERRORS: {"kind": JOURNAL_KINDS},
    JOURNAL_SCHEMA_ERRORS_RECENT: {"kind": JOURNAL_KINDS},
    FINDINGS: {"severity": SEVERITIES},
    PENDING_MIGRATION_RISK: {"level": RISK_LEVELS},
}
# Variable names as systemd accepts them; bounded in number, so no unit floods the series.
_VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
MAX_NAMES = 8
# Revision ids and file names come from the app's files (hostile input): short, plain ones only.
_REVISION = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_FILE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_DSN_NOISE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://|\?.*$")


def safe_database_label(database: str) -> str:
    """host:port/dbname at most: drops scheme, credentials and query even if a caller slipped."""
    text = _DSN_NOISE.sub("", database)
    return text.rsplit("@", 1)[-1]


REVISION_LABEL_IDS = 5
REVISION_LABEL_CHARS = 200


def revision_label(revisions: tuple[str, ...]) -> str:
    """Pure: sorted ids joined by ',', at most REVISION_LABEL_IDS and REVISION_LABEL_CHARS."""
    ids = sorted(revisions)
    text = ",".join(ids[:REVISION_LABEL_IDS])
    if len(ids) > REVISION_LABEL_IDS:
        text += f",+{len(ids) - REVISION_LABEL_IDS} more"
    return text if len(text) <= REVISION_LABEL_CHARS else text[:REVISION_LABEL_CHARS - 1] + "…"


def _b(value: bool) -> float:
    return 1.0 if value else 0.0


def _unit_samples(u: UnitSnapshot) -> Iterator[tuple[Spec, tuple[str, ...], float]]:
    """(spec, label values, value) for one unit; None in the snapshot -> no sample."""
    n = u.unit
    yield UNIT_UP, (n,), _b(u.unit_up)
    yield LAST_CHECK_TIMESTAMP, (n,), u.timestamp
    if u.started_at:
        yield UNIT_START_TIMESTAMP, (n,), u.started_at
    for check in u.checks:
        yield CHECK_SUCCESS, (n, check.name), _b(check.success)
        yield CHECK_DURATION, (n, check.name), check.duration_seconds
    for check, when in sorted(u.last_success.items()):
        yield CHECK_STALENESS, (n, check), round(max(0.0, u.timestamp - when), 3)
    # A success gauge is 0 when unknown: "could not load" must not vanish from alerts.
    yield APP_LOAD_SUCCESS, (n,), _b(bool(u.app_loaded))
    if u.db_up is not None:
        yield DB_UP, (n,), _b(u.db_up)
    if u.database:
        yield DATABASE_INFO, (n, safe_database_label(u.database), u.backend), 1.0
    m = u.migrations
    if m is not None:
        yield VERSION_TABLE_PRESENT, (n,), _b(m.version_table_present)
        if m.current_readable:  # a locked version table is not "no revision, all pending"
            # One series per unit whatever the version table holds (rows are the app's to write).
            yield REVISION_INFO, (n, revision_label(m.current), revision_label(m.heads)), 1.0
            yield PENDING_REVISIONS, (n,), float(len(m.pending))
        yield MIGRATION_HEADS, (n,), float(len(m.heads))
        yield DB_REVISION_UNKNOWN, (n,), _b(bool(m.unknown))
        yield MIGRATION_IN_PROGRESS, (n,), _b(m.in_progress)
        yield HALF_APPLIED_REVISION, (n,), _b(any(f.check == "half_applied_revision"
                                                  for f in u.findings))
    if u.schema_drift is not None:
        counts = Counter(item.kind for item in u.schema_drift)
        for kind in (*DRIFT_KINDS, *sorted(set(counts) - set(DRIFT_KINDS))):
            yield SCHEMA_DRIFT_OBJECTS, (n, kind), float(counts.get(kind, 0))
    yield APPLIED_MIGRATION_MODIFIED, (n,), float(u.applied_migrations_modified)
    for revision, name in u.modified_migration_files[:MAX_NAMES]:
        if _REVISION.fullmatch(revision) and _FILE_NAME.fullmatch(name):
            yield MODIFIED_MIGRATION, (n, revision, name), 1.0
    yield VENV_MISMATCH, (n,), _b(u.venv_mismatch)
    yield STALE_ENV, (n,), float(u.stale_environment_variables)
    for name in [v for v in u.stale_variable_names if _VARIABLE_NAME.fullmatch(v)][:MAX_NAMES]:
        yield STALE_VARIABLE, (n, name), 1.0
    if u.unit_file:
        yield UNIT_FILE, (n, u.unit_file), 1.0
    yield NEEDS_DAEMON_RELOAD, (n,), _b(u.needs_daemon_reload)
    yield NEEDS_RESTART, (n,), _b(u.needs_restart)
    if u.database_mismatch is not None:
        yield DATABASE_MISMATCH, (n,), _b(u.database_mismatch)
    if u.migration_privileges_ok is not None:
        yield MIGRATION_PRIVILEGES_OK, (n,), _b(u.migration_privileges_ok)
    for kind, total in sorted(u.journal_schema_errors.items()):
        yield JOURNAL_SCHEMA_ERRORS, (n, kind), float(total)
    if u.preflight is not None and not u.preflight.get("error"):
        counts = u.preflight.get("counts") or {}
        for level in RISK_LEVELS:  # always all three: stable series, bounded labels
            yield PENDING_MIGRATION_RISK, (n, level), float(counts.get(level, 0))
    for kind, recent in sorted(u.journal_schema_errors_recent.items()):
        yield JOURNAL_SCHEMA_ERRORS_RECENT, (n, kind), float(recent)
    severities = Counter(f.severity for f in u.findings)
    for severity in (*SEVERITIES, *sorted(set(severities) - set(SEVERITIES))):
        yield FINDINGS, (n, severity), float(severities.get(severity, 0))


def snapshot_families(snapshot: Snapshot | None) -> list[Metric]:
    """Pure: fresh metric families for one snapshot (None = no inspection succeeded yet)."""
    families: dict[Spec, Metric] = {}

    def add(spec: Spec, labels: tuple[str, ...], value: float) -> None:
        if spec not in families:
            families[spec] = spec.family()
        families[spec].add_metric(list(labels), value)

    if snapshot is not None:
        add(INSPECTION_DURATION, (), snapshot.duration_seconds)
        add(SNAPSHOT_TIMESTAMP, (), snapshot.taken_at)
        add(INSPECTION_ERRORS, (), float(len(snapshot.errors)))
        add(UNITS_WATCHED, (), float(len(snapshot.units)))
        if snapshot.state_store:  # "" until an inspection used the store
            for condition in STATE_STORE_CONDITIONS:
                add(STATE_STORE, (condition,), float(condition == snapshot.state_store))
        if snapshot.journal_window_seconds:
            add(JOURNAL_WINDOW, (), snapshot.journal_window_seconds)
        for unit in snapshot.units:
            for spec, labels, value in _unit_samples(unit):
                add(spec, labels, value)
    return list(families.values())


@dataclass(frozen=True)
class CollectorStats:
    """Counters of the cache behind the collector."""

    inspections_total: int = 0
    failures_total: int = 0
    last_success: bool | None = None


class DriftwatchCollector:
    """Reads the latest Snapshot on every scrape and turns it into fresh metric families."""

    def __init__(self, get_snapshot: Callable[[], Snapshot | None],
                 stats: Callable[[], CollectorStats] = CollectorStats,
                 version: str = __version__) -> None:
        self._get_snapshot = get_snapshot
        self._stats = stats
        self._version = version
        # The families of the last snapshot: an unchanged snapshot hands out the same
        # objects, so the exposition reuses their rendered text (agent/daemon/exposition.py).
        self._last: tuple[Snapshot | None, list[Metric]] | None = None

    def describe(self) -> Iterable[Metric]:
        """Nothing: registering must never trigger an inspection."""
        return []

    def collect(self) -> Iterator[Metric]:
        """One scrape: get (maybe cached) snapshot, emit families, then the scrape duration."""
        start = time.perf_counter()
        build = BUILD_INFO.family()
        build.add_metric([self._version, platform.python_version()], 1.0)
        yield build
        snapshot = self._get_snapshot()
        last = self._last
        if last is None or last[0] is not snapshot:
            last = self._last = (snapshot, snapshot_families(snapshot))
        yield from last[1]
        stats = self._stats()
        for spec, value in ((INSPECTIONS, stats.inspections_total),
                            (INSPECTION_FAILURES, stats.failures_total)):
            family = spec.family()
            family.add_metric([], float(value))
            yield family
        if stats.last_success is not None:
            family = INSPECTION_SUCCESS.family()
            family.add_metric([], _b(stats.last_success))
            yield family
        duration = SCRAPE_DURATION.family()
        duration.add_metric([], time.perf_counter() - start)
        yield duration
