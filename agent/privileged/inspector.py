"""The whole runbook for every watched unit: sources -> context -> checks -> Snapshot."""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections import Counter
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from agent.checks import migrations as migration_checks
from agent.daemon.collector_cache import ALL_UNITS
from agent.checks.schema import drift_findings, drift_items
from agent.checks.unit import UnitFacts, check_code_newer, check_working_directory
from agent.checks.half_applied import LiveObjects, half_applied, half_applied_findings
from agent.checks.mysql_privileges import mysql_privilege_findings
from agent.checks.workers_database import DatabaseSide, mismatch_findings
from agent.errors import DriftwatchError, UnitNotFound
from agent.privileged.inspection import Lookups, UnitReport, inspect_unit
from agent.model import Finding
from agent.privileged.alembic_env import AlembicEnv
from agent.secrets import mask_url
from agent.preflight.plan import stale_workers
from agent.preflight.watch import PreflightWatch
from agent.privileged.dbclient import CURRENT_POOL, user_session
from agent.privileged.sessionpool import SessionPool
from agent.privileged import table_fingerprints
from agent.privileged.probe_runner import ProbeRequest, ProbeResult, fingerprint, run_probe
from agent.snapshot import CheckRun, DriftItem, MigrationState, Snapshot, UnitSnapshot
from agent.privileged.sources import connections, database, files, mysql, pooler, procs, sqlite
from agent.privileged.journal_cursors import CursorFile
from agent.privileged.sources import journal_api
from agent.privileged.sources.journal import ErrorWindow, JournalReader, SharedJournal
from agent.privileged.sources.systemd import SystemdSource, normalize_unit_name
from agent.privileged.state import OK as STATE_OK
from agent.privileged.state import StateStore, store_finding

log = logging.getLogger("driftwatch.inspector")

# Units inspected at once: one. Each unit's checks (its probe, when its app must be loaded
# again) run after the previous unit's, so 20 first inspections never load 20 apps side by
# side on a 2-core host, and a probe's memory limit bounds the run's memory too.
UNITS_AT_ONCE = 1

# Backends whose database driftwatch reads; any other gets backend_not_inspected.
INSPECTED_BACKENDS = frozenset({"postgresql", "sqlite", "mysql", "mariadb"})
# Unit findings that mean "the running processes are not what a restart would give".
# Revision-state findings a running migration explains (it is applying them right now).
IN_PROGRESS_EXPLAINS = {"pending_migrations", "version_table_missing", "version_table_empty"}
RESTART_FINDINGS = {"environment_stale", "venv_mismatch", "cwd_stale", "code_newer_than_process",
                    "needs_daemon_reload"}


@dataclass(frozen=True)
class InspectorSettings:
    """What the inspector needs from the configuration."""

    units: tuple[str, ...] = ()
    unit_patterns: tuple[str, ...] = ()
    discover_gunicorn: bool = True
    probe_timeout_seconds: float = 20.0
    db_timeout_seconds: float = 5.0
    journal_window_seconds: int = 3600
    # Even when nothing seems to have changed, load the app again after this long.
    probe_max_age_seconds: float = 900.0
    state_path: str = "/var/lib/driftwatch/state.db"
    bus_timeout_seconds: float = 5.0
    # Units without User=: the probe and the session run as this user ("" = dynamic user).
    probe_user: str = ""
    probe_memory_max_mb: int = 512

    @classmethod
    def from_config(cls, config: Any) -> "InspectorSettings":
        """Take the fields this class knows from an agent.config.Config."""
        names = cls.__dataclass_fields__
        values = {n: getattr(config, n) for n in names if hasattr(config, n)}
        if hasattr(config, "state_dir") and "state_path" not in values:
            values["state_path"] = f"{config.state_dir.rstrip('/')}/state.db"
        for key in ("units", "unit_patterns"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


@dataclass(frozen=True)
class _ProbeMemo:
    """A probe result and what it depended on."""

    code_fingerprint: str
    schema_fingerprint: str   # of the live database when last compared ("" = not yet known)
    created: float
    result: ProbeResult


@dataclass
class _Timer:
    """Collects CheckRun records for one unit."""

    runs: list[CheckRun] = field(default_factory=list)
    unit: str = ""
    # Told (unit, check, start) when a check starts and None when it ends, so that a scrape
    # served while the inspection still runs can name the check it is stuck in.
    on_check: Callable[[tuple[str, str, float] | None], None] | None = None

    @contextmanager
    def check(self, name: str) -> Iterator[dict[str, Any]]:
        """Time a check; the body sets result['error'] to mark it failed."""
        result: dict[str, Any] = {"error": ""}
        started = time.monotonic()
        if self.on_check is not None:
            self.on_check((self.unit, name, started))
        try:
            yield result
        except Exception as exc:  # a check never raises to the caller
            log.exception("check %s failed", name)
            result["error"] = f"internal error: {type(exc).__name__}: {exc}"
        self.runs.append(CheckRun(name, not result["error"], round(time.monotonic() - started, 4),
                                  result["error"]))
        if self.on_check is not None:
            self.on_check(None)


class Inspector:
    """Inspects units; remembers probe results by fingerprint and journal cursors per unit."""

    def __init__(self, settings: InspectorSettings, systemd: SystemdSource | None = None,
                 state: StateStore | None = None,
                 probe: Callable[..., ProbeResult] = run_probe,
                 cursors: CursorFile | None = None,
                 journal_reader: Callable[..., JournalReader] = JournalReader) -> None:
        self.settings = settings
        self.systemd = systemd or SystemdSource(timeout_seconds=settings.bus_timeout_seconds)
        self._state = state
        self._probe = probe
        self._probe_memo: dict[str, _ProbeMemo] = {}
        self._journals: dict[str, JournalReader] = {}
        self._journal_totals: dict[str, dict[str, int]] = {}
        self._journal_windows: dict[str, ErrorWindow] = {}
        # Per unit: the latest snapshot (for last known values) and when each check succeeded.
        self._last: dict[str, UnitSnapshot] = {}
        self._last_success: dict[str, dict[str, float]] = {}
        # Cursors persisted by the daemon (None for one-shot agentctl runs: they must never
        # move the daemon's cursors).
        self._cursor_file = cursors
        self._journal_reader = journal_reader
        self._saved_cursors = cursors.load() if cursors is not None else {}
        self._restarts: dict[str, int] = {}   # unit -> NRestarts at the last inspection
        # This run's shared D-Bus pass: unit -> its properties, or the error reading it gave.
        self._unit_reads: dict[str, Any] = {}
        # ... and its user and group lookups (None outside a run: looked up each time).
        self._lookups: Lookups | None = None
        # One journal read for all units per run: members' entries of this run (unit ->
        # entries, until its journal check counts them), and the units read alone instead.
        self._shared_journal = SharedJournal()
        self._shared_entries: dict[str, list[dict[str, Any]]] = {}
        self._read_alone: set[str] = set()
        # MySQL/MariaDB: what SHOW GRANTS gave in this inspection (unit -> privileges).
        self._mysql_privileges: dict[str, mysql.MysqlPrivileges] = {}
        # ... and the objects the revisions after the current one name (unit -> objects).
        self._mysql_live: dict[str, LiveObjects] = {}
        # What was read of each running process, by (pid, start time): not read again.
        self._processes = procs.ProcessMemo()
        # The agent's own database sessions, kept between runs (with the real session child
        # only: stand-in probes in unit tests keep the one-session-per-use behaviour).
        self._sessions = SessionPool() if probe is run_probe else None
        self._lock = threading.Lock()
        self.probe_runs = 0
        self.current: tuple[str, str, float] | None = None   # (unit, check, start) running now
        # Told each time `current` changes (the daemon's worker streams it to the daemon).
        self.on_current: Callable[[tuple[str, str, float] | None], None] | None = None
        # The migration preflight (agentctl plan) while revisions are pending; not with a
        # stand-in probe (unit tests), whose contexts cannot run the offline probe.
        self.preflight = PreflightWatch(settings.probe_timeout_seconds,
                                        probe_user=settings.probe_user) \
            if probe is run_probe else None

    # -- public ------------------------------------------------------------------------
    def __call__(self, units: Sequence[str] | None = None) -> Snapshot:
        """Inspect the given units (None: the configured and discovered ones)."""
        return self.inspect(units)

    def inspect(self, units: Sequence[str] | None = None) -> Snapshot:
        """One full inspection run."""
        started = time.monotonic()
        errors: list[str] = []
        discovered = units is None
        with self._lock:
            if units is None:
                # Discovery reads systemd as every unit's "unit" check does: a stuck systemd
                # shows on all of them.
                self._set_current((ALL_UNITS, "unit", time.monotonic()))
                try:
                    units = self.systemd.discover(self.settings.units, self.settings.unit_patterns,
                                                  self.settings.discover_gunicorn)
                except DriftwatchError as exc:
                    errors.append(str(exc))
                    units = list(self.settings.units)
                finally:
                    self._set_current(None)
            snaps = self._pooled(units, discovered)
            if discovered:
                self._prune({u.unit for u in snaps} | set(units))
            self._save_cursors()
        return Snapshot(snaps, taken_at=time.time(),
                        duration_seconds=round(time.monotonic() - started, 4),
                        errors=tuple(errors),
                        state_store=self._state.condition if self._state is not None else "",
                        journal_window_seconds=float(self.settings.journal_window_seconds))

    def _pooled(self, units: Sequence[str], everything: bool) -> tuple[UnitSnapshot, ...]:
        """Every unit inspected, the database sessions borrowed from the pool; afterwards
        the sessions this run did not use are ended (of these units; everything: of all).
        Units are read from systemd in one pass first, share one opened journal, and are
        inspected one at a time (UNITS_AT_ONCE)."""
        self._unit_reads = self._read_units(units)
        self._lookups = Lookups()
        try:
            # One journal opened, and read once, for every unit's journal check of this run.
            with journal_api.shared():
                self._shared_entries = self._shared_journal_step(
                    "before", self._run_journals(units), {normalize_unit_name(u) for u in units})
                self._read_alone = set()
                try:
                    if self._sessions is None:
                        return tuple(self._isolated(name) for name in units)
                    self._sessions.begin()
                    token = CURRENT_POOL.set(self._sessions)
                    try:
                        snaps = tuple(self._isolated(name) for name in units)
                    finally:
                        CURRENT_POOL.reset(token)
                finally:
                    self._shared_journal_step("after", self._run_journals(units),
                                              self._read_alone, set(self._shared_entries))
                    self._shared_entries = {}
        finally:
            self._unit_reads, self._lookups = {}, None
        self._sessions.sweep(None if everything else {u.unit for u in snaps})
        return snaps

    def _run_journals(self, units: Sequence[str]) -> dict[str, JournalReader]:
        """The journal readers of this run's units (those that have one yet)."""
        names = {normalize_unit_name(u) for u in units}
        return {u: r for u, r in self._journals.items() if u in names}

    def _shared_journal_step(self, step: str, *args: Any) -> Any:
        """SharedJournal.before/after; whatever goes wrong there only means every unit
        reads its journal alone (as before the union read existed), never a failed run."""
        try:
            return getattr(self._shared_journal, step)(*args)
        except Exception:
            log.exception("the shared journal read failed; units read their journals alone")
            self._shared_journal = SharedJournal()
            return {}

    def _read_units(self, units: Sequence[str]) -> dict[str, Any]:
        """The run's one D-Bus pass over all units (systemd.read_units); a stuck or absent
        systemd shows on every unit's "unit" check, as during discovery."""
        read_units = getattr(self.systemd, "read_units", None)
        if read_units is None or not units:   # a stand-in with read_unit only (unit tests)
            return {}
        self._set_current((ALL_UNITS, "unit", time.monotonic()))
        try:
            return read_units(units)
        except DriftwatchError as exc:
            return {normalize_unit_name(u): exc for u in units}
        except Exception:   # each unit reads alone then, its failure confined to it
            log.exception("the shared D-Bus pass failed; units are read one by one")
            return {}
        finally:
            self._set_current(None)

    def invalidate(self, unit: str | None = None) -> None:
        """Forget memoised probe results (of one unit, or all): a restart was seen."""
        if unit is None:
            self._probe_memo.clear()
        else:
            self._probe_memo.pop(unit, None)
        self._processes.forget(unit)
        forget = getattr(self.systemd, "forget", None)
        if forget is not None:
            forget(unit)
        if self._sessions is not None:
            self._sessions.close(unit)
        if self.preflight is not None:
            self.preflight.invalidate(unit)

    def _prune(self, alive: set[str]) -> None:
        """Forget what was kept per unit for units no longer watched (removed, renamed)."""
        for cache in (self._probe_memo, self._journals, self._journal_totals, self._journal_windows,
                      self._processes.units):
            for unit in [u for u in cache if u not in alive]:
                del cache[unit]
        keep_only = getattr(self.systemd, "keep_only", None)
        if keep_only is not None:
            keep_only(alive)

    def _set_current(self, running: tuple[str, str, float] | None) -> None:
        self.current = running
        if self.on_current is not None:
            self.on_current(running)

    def close(self) -> None:
        """Release the database sessions, the D-Bus connection and the state store."""
        if self._sessions is not None:
            self._sessions.close()
        self.systemd.close()
        if self._state is not None:
            self._state.close()

    # -- one unit ------------------------------------------------------------------------
    def _isolated(self, name: str) -> UnitSnapshot:
        """inspect_unit, with anything it raises confined to this unit's snapshot.

        Units are independent: whatever one unit's app controls (URL, environment,
        ExecStart, migration files, output) fails that unit's checks, never another's.
        """
        started = time.monotonic()
        try:
            return self.inspect_unit(name)
        except Exception as exc:
            log.exception("inspecting %s failed", name)
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
            reason = mask_url(reason)
            return UnitSnapshot(
                unit=name, timestamp=time.time(), unit_up=False,
                checks=(CheckRun("inspection", False, round(time.monotonic() - started, 4),
                                 f"internal error: {reason}"),),
                findings=(Finding(
                    "inspection_failed", "critical",
                    f"{name} could not be inspected: internal error: {reason}",
                    "this is a driftwatch bug: report it with the agent's log; other units "
                    "are inspected as usual"),))

    def inspect_unit(self, name: str) -> UnitSnapshot:
        """Every check for one unit; never raises."""
        timer = _Timer(unit=name, on_check=self._set_current)
        findings: list[Finding] = []
        report: UnitReport | None = None
        with timer.check("unit") as res:
            try:
                props = self._unit_reads.get(normalize_unit_name(name))
                if isinstance(props, Exception):
                    raise props
                report = inspect_unit(self.systemd, name, self._restarts.get(name),
                                      self._processes, props, self._lookups)
                self._restarts[name] = report.props.n_restarts
            except UnitNotFound as exc:
                res["error"] = str(exc)
                findings.append(Finding("unit_not_found", "critical", str(exc),
                                        "check the unit name (systemctl list-units "
                                        "'gunicorn*') or the agent's configuration"))
            except DriftwatchError as exc:
                res["error"] = str(exc)
        if report is None:
            fresh = UnitSnapshot(unit=name, timestamp=time.time(), unit_up=False,
                                 checks=tuple(timer.runs), findings=tuple(findings))
            last = None if findings else self._last.get(name)  # unit_not_found: gone, not lost
            return self._remember(name, fresh, last_known(fresh, last, whole=True))
        unit = report.props.name
        findings += report.findings
        fields: dict[str, Any] = {
            "unit": unit, "timestamp": time.time(),
            "unit_up": report.props.active_state == "active",
            "active_state": report.props.active_state, "main_pid": report.props.main_pid,
            "started_at": report.props.exec_main_start_timestamp, "venv": report.context.venv,
            "venv_mismatch": any(f.check == "venv_mismatch" for f in report.findings),
            "needs_daemon_reload": report.props.need_daemon_reload,
        }
        fields["stale_environment_variables"] = len(report.stale_variables)
        fields["stale_variable_names"] = tuple(sorted(report.stale_variables))
        fields["unit_file"] = report.props.fragment_path

        missing = next((f for f in report.findings if f.check == "exec_start_missing"), None)
        if missing is not None:
            # Nothing to load the app with: say what is missing instead of probing blind.
            with timer.check("app_load") as res:
                res["error"] = missing.message
            probe = ProbeResult(ok=False, error=missing.message, error_kind="app_load")
        else:
            probe = self._run_probe(report, timer)
        if probe.app_chdir and probe.app_chdir != report.context.app_directory:
            # gunicorn's own config (a chdir in gunicorn.conf.py) knows better than ExecStart.
            findings = [f for f in findings if f.check != "cwd_stale"]
            findings += recheck_working_directory(report, probe.app_chdir)
        url = probe.urls.get("default") or next(iter(probe.urls.values()), "")
        inspection = None
        backend = database.backend_of(url) if url else ""
        fields["backend"] = backend
        if url and backend and backend not in INSPECTED_BACKENDS:
            fields["database"] = database.db_label(url)
            findings.append(not_inspected_finding(unit, backend, fields["database"]))
        elif url:
            fields["database"] = database.db_label(url)
            if backend == "sqlite":
                verdict = None
                self._sqlite_files_check(unit, url, report, timer, fields, findings)
            else:
                verdict = self._connections_check(unit, url, report, timer, fields, findings)
            inspection = self._database_check(unit, url, report, timer, fields, findings,
                                              probe.alembic_env, probe.revisions)
            memo = self._probe_memo.get(unit)
            if (inspection is not None and memo is not None and memo.result is probe
                    and inspection.schema_fingerprint
                    and memo.schema_fingerprint != inspection.schema_fingerprint):
                if memo.schema_fingerprint:
                    # The live schema changed (an upgrade, a manual ALTER): the memoised
                    # schema diff is stale, so compare again.
                    probe = self._run_probe(report, timer, force=True)
                self._probe_memo[unit] = replace(
                    self._probe_memo[unit], schema_fingerprint=inspection.schema_fingerprint)
        fields["app_loaded"] = probe.ok or probe.error_kind in ("migrations", "database")
        probe_finding = probe.finding()
        if inspection is not None:
            self._migration_checks(unit, inspection, probe, timer, fields, findings)
            self._workers_database_check(unit, url, report, probe, verdict, inspection,
                                         timer, fields, findings)
            self._preflight_check(unit, report, timer, fields, findings)
        # The agent's own database check already says "unreachable" more precisely; and while
        # a migration runs, a comparison that gave up on its locks is expected.
        migrating = fields.get("migrations") is not None and fields["migrations"].in_progress
        # A missing ExecStart program already says why the app cannot load: no second,
        # vaguer "interpreter unknown" finding.
        missing_program = any(f.check == "exec_start_missing" for f in findings)
        if probe_finding and not (probe.error_kind == "database" and
                                  (fields.get("db_up") is False or migrating
                                   or (backend and backend not in INSPECTED_BACKENDS))) \
                and not (missing_program and probe.error_kind == "app_load"):
            findings.append(probe_finding)
        self._journal_check(unit, timer, fields, findings)
        if probe.migrations_dir and any(f.check == "code_newer_than_process" for f in findings):
            # Workers never load migration files: an edited revision file is no restart.
            findings = [f for f in findings if f.check != "code_newer_than_process"]
            findings += recheck_code_newer(report, probe.migrations_dir, probe.plain_alembic)
        fields["needs_restart"] = any(f.check in RESTART_FINDINGS for f in findings)
        fresh = UnitSnapshot(**fields, checks=tuple(timer.runs), findings=tuple(findings))
        return self._remember(name, fresh, last_known(fresh, self._last.get(name)))

    def _remember(self, name: str, fresh: UnitSnapshot, merged: UnitSnapshot) -> UnitSnapshot:
        """Stamp when each check last succeeded; keep the merged snapshot as last known."""
        seen = dict(self._last_success.get(name, {}))
        seen.update({c.name: fresh.timestamp for c in fresh.checks if c.success})
        self._last_success[name] = seen
        merged = replace(merged, last_success=dict(seen))
        self._last[name] = merged
        return merged

    def _run_probe(self, report: UnitReport, timer: _Timer, force: bool = False) -> ProbeResult:
        """The probe's result, memoised while its code fingerprint holds and it is young."""
        unit, ctx = report.props.name, report.context
        name = "app_load"
        if force:  # a second, forced run is timed on its own, not as a second app_load
            timer.runs = [r for r in timer.runs if r.name != name]
        with timer.check(name) as res:
            memo = self._probe_memo.get(unit)
            key = fingerprint(ctx, memo.result.migrations_dir if memo else "")
            fresh = memo is not None and not force and memo.code_fingerprint == key and \
                time.monotonic() - memo.created < self.settings.probe_max_age_seconds
            if fresh:
                result = memo.result  # type: ignore[union-attr]
            else:
                # The live schema changed under the same code: the previous comparison's
                # per-table catalog fingerprints let the probe compare only the tables
                # whose catalog changed. A code change or an old memo compares everything.
                previous = table_fingerprints.previous_check(
                    memo.result.table_fingerprints, memo.result.schema_diff) \
                    if force and memo is not None and memo.code_fingerprint == key else None
                request = ProbeRequest(
                    statement_timeout_ms=int(self.settings.db_timeout_seconds * 1000),
                    connect_timeout_s=max(1, int(self.settings.db_timeout_seconds)),
                    probe_user=self.settings.probe_user,
                    memory_max_mb=self.settings.probe_memory_max_mb,
                    previous_check=previous)
                result = self._probe(ctx, request, self.settings.probe_timeout_seconds)
                self.probe_runs += 1
                # Recompute with the migrations dir the probe found, so edits there count.
                self._probe_memo[unit] = _ProbeMemo(
                    fingerprint(ctx, result.migrations_dir),
                    memo.schema_fingerprint if memo else "", time.monotonic(), result)
            if not result.ok and result.error_kind not in ("migrations", "database"):
                res["error"] = result.error
            return result
        return ProbeResult(ok=False, error="internal error", error_kind="internal")

    def _preflight_check(self, unit: str, report: UnitReport, timer: _Timer,
                         fields: dict[str, Any], findings: list[Finding]) -> None:
        """What the pending revisions would lock (agent/preflight/watch.py); its problems
        show in the summary's error, never as a failed check."""
        if self.preflight is None:
            return
        with timer.check("preflight"):
            memo = self._probe_memo.get(unit)
            summary, finding = self.preflight.check(
                unit, report.context, fields.get("migrations"),
                memo.code_fingerprint if memo else "", stale_workers(findings))
            fields["preflight"] = summary
            if finding is not None:
                findings.append(finding)

    def _database_check(self, unit: str, url: str, report: UnitReport, timer: _Timer,
                        fields: dict[str, Any], findings: list[Finding],
                        env: AlembicEnv | None = None,
                        revisions: Sequence[dict[str, Any]] = (),
                        ) -> database.DatabaseInspection | None:
        """One short read-only session: version table, activity, privileges, schema hash.

        The session is held by a child running as the unit's user in the unit's environment
        (libpq reads that user's ~/.pgpass and service files, never root's); root only
        sends the statements and parses the rows.
        """
        timeouts = database.Timeouts(connect_s=max(1, int(self.settings.db_timeout_seconds)))
        env = env or AlembicEnv()
        self._mysql_live.pop(unit, None)  # only this inspection's objects count
        with timer.check("database") as res:
            opener = functools.partial(user_session, report.context,
                                       probe_user=self.settings.probe_user)
            if database.backend_of(url) == "sqlite":
                inspection = sqlite.inspect_sqlite(url, env.version_table, timeouts=timeouts,
                                                   opener=opener)
                if sqlite.is_missing(inspection.error):
                    # Reachable in the only sense a file has: the app would create it, empty.
                    findings.append(missing_file_finding(unit, sqlite.sqlite_file(url)))
                    fields["db_up"] = False
                    return None
            elif database.backend_of(url) in mysql.MYSQL_BACKENDS:
                found = mysql.inspect_mysql(url, env.version_table,
                                            env.version_table_schema or None,
                                            timeouts=timeouts, opener=opener,
                                            revisions=revisions)
                inspection = found.inspection
                self._mysql_privileges[unit] = found.privileges
                if found.live is not None:
                    self._mysql_live[unit] = found.live
            else:
                # The version table env.py names (version_table / version_table_schema).
                inspection = database.inspect(url, env.version_table,
                                              env.version_table_schema or None,
                                              timeouts=timeouts, opener=opener)
            fields["db_up"] = inspection.reachable
            if not inspection.reachable:
                res["error"] = inspection.error
                server = "MySQL/MariaDB" if database.backend_of(url) in mysql.MYSQL_BACKENDS \
                    else "PostgreSQL"
                findings.append(Finding(
                    "database_unreachable", "critical", f"{unit}: {inspection.error}",
                    f"check that {server} runs and that the unit's DATABASE_URL is right"))
                return None
            return inspection
        return None

    def _migration_checks(self, unit: str, inspection: database.DatabaseInspection,
                          probe: ProbeResult, timer: _Timer, fields: dict[str, Any],
                          findings: list[Finding]) -> None:
        """Revision state, migration activity, drift, privileges and integrity."""
        activity = inspection.activity
        version = inspection.version
        in_progress = activity.in_progress
        half_done = False
        # A lock is never a state: the current revision is unknown now, not empty or missing.
        readable = not version.locked
        table = probe.alembic_env.qualified_version_table
        with timer.check("migrations") as res:
            if probe.revisions_error:
                res["error"] = probe.revisions_error
            graph = migration_checks.revisions_from_dicts(probe.revisions)
            current = version.revisions if version.exists else None
            state = migration_checks.evaluate(unit, current, graph, table,
                                              graph_error=probe.revisions_error,
                                              plain_alembic=probe.plain_alembic) \
                if (graph or current) and readable else None
            if probe.revisions_error and not graph and readable and version.exists:
                # The scripts are unreadable (e.g. to a stand-in user), the version table is
                # not: its revision is still worth saying, heads and pending are not known.
                fields["notes"] = (*fields.get("notes", ()), (
                    f"current revision in {table}: {', '.join(version.revisions) or '(none)'}"
                    f"; heads and pending unknown: {probe.revisions_error}"))
            if not readable:
                heads = migration_checks.heads_of(graph)
                fields["migrations"] = MigrationState(
                    version_table_present=True, heads=heads, multiple_heads=len(heads) > 1,
                    in_progress=True, current_readable=False, version_table=table)
            elif state is not None:
                fields["migrations"] = MigrationState(
                    version_table_present=state.version_table_exists, current=state.current,
                    heads=state.heads, pending=state.pending or (),
                    multiple_heads=len(state.heads) > 1, unknown=state.unknown,
                    in_progress=in_progress, version_table=table)
                for finding in state.findings:
                    # A running upgrade explains pending revisions: say so, do not page.
                    if in_progress and finding.check in IN_PROGRESS_EXPLAINS:
                        continue
                    findings.append(finding)
                live = self._mysql_live.pop(unit, None)
                if live is not None and state.pending and not in_progress:
                    partly = half_applied(state.current, probe.revisions, live)
                    if partly:
                        # Said exactly, instead of "pending" (a retry fails) or "drift".
                        half_done = True
                        findings[:] = [f for f in findings if f.check != "pending_migrations"]
                        findings += half_applied_findings(unit, state.current, partly, table,
                                                          len(state.pending),
                                                          probe.plain_alembic)
        if in_progress:
            findings += migration_checks.activity_findings(
                unit, [(s.pid, s.duration_s, s.reason, s.query) for s in activity.sessions],
                locked=version.locked, table=table)
            if fields.get("migrations") is None:
                fields["migrations"] = MigrationState(version_table_present=bool(
                    version.exists), in_progress=True, version_table=table)
        with timer.check("schema") as res:
            if in_progress:
                # Held back: a half-applied migration is not drift (and a comparison that
                # gave up on its locks is not a failure). Nor is the memoised comparison
                # reused afterwards: the next inspection loads the app and compares again.
                fields["schema_drift"] = None
                self._probe_memo.pop(unit, None)
            elif probe.schema_diff is None:
                res["error"] = probe.schema_diff_error or "schema not compared"
            else:
                items = drift_items(probe.schema_diff)
                fields["schema_drift"] = tuple(DriftItem(**i) for i in items)
                pending = len(fields["migrations"].pending) if fields.get("migrations") \
                    else 0
                if not half_done:  # the half-applied finding already names the objects
                    findings += drift_findings(unit, items, pending)
        if fields.get("backend") == "sqlite":
            # No roles or grants in a file: who may migrate is the file's permissions.
            fields["notes"] = tuple(fields.get("notes", ())) + (
                "privileges: not applicable to SQLite (the file's permissions decide who "
                "may migrate)",)
        elif fields.get("backend") in mysql.MYSQL_BACKENDS:
            self._mysql_privileges_check(unit, timer, fields, findings, probe.plain_alembic)
        else:
            self._privileges_check(unit, inspection, timer, fields, findings)
        with timer.check("integrity") as res:
            self._integrity(unit, probe, fields, findings, res)

    def _privileges_check(self, unit: str, inspection: database.DatabaseInspection,
                          timer: _Timer, fields: dict[str, Any],
                          findings: list[Finding]) -> None:
        """May the app's role run migrations (PostgreSQL)."""
        with timer.check("privileges") as res:
            priv = inspection.privileges
            if priv.error:
                res["error"] = priv.error
            else:
                fields["migration_privileges_ok"] = priv.sufficient
                findings += migration_checks.privilege_findings(
                    unit, priv.user, priv.schema, priv.superuser, priv.can_create,
                    priv.not_owned)

    def _mysql_privileges_check(self, unit: str, timer: _Timer, fields: dict[str, Any],
                                findings: list[Finding], plain_alembic: bool = False) -> None:
        """May the app's MySQL user run migrations (SHOW GRANTS on its database)."""
        with timer.check("privileges") as res:
            priv = self._mysql_privileges.pop(unit, None)
            if priv is None or priv.error:
                res["error"] = priv.error if priv else "privileges not read"
                return
            fields["migration_privileges_ok"] = not priv.missing
            findings += mysql_privilege_findings(unit, priv.user, priv.database, priv.missing,
                                                 plain_alembic)

    def _connections_check(self, unit: str, url: str, report: UnitReport, timer: _Timer,
                           fields: dict[str, Any], findings: list[Finding],
                           ) -> connections.ConnectionVerdict | None:
        """Which server the running workers are really connected to (no database access)."""
        verdict = None
        with timer.check("connections") as res:
            host, port = database.url_host_port(url)
            pids = [p.pid for p in report.processes]
            verdict, errors = connections.connection_verdict(
                host, port, pids, known_ports=_env_database_ports(report))
            if errors and verdict.status == "none":
                res["error"] = "; ".join(errors)
            fields["database_mismatch"] = verdict.status == "elsewhere"
            fields["database_connections"] = verdict.message
            if verdict.status == "elsewhere":
                findings.append(Finding(
                    "database_mismatch", "critical",
                    f"the running workers of {unit} are connected to {verdict.message}, not to "
                    f"{fields['database']} that the unit's environment names",
                    f"systemctl restart {unit} (the environment changed since start), then "
                    "check which database was migrated"))
        return verdict

    def _sqlite_files_check(self, unit: str, url: str, report: UnitReport, timer: _Timer,
                            fields: dict[str, Any], findings: list[Finding]) -> None:
        """SQLite's "wrong DATABASE_URL": the workers hold another .db file open than the
        one the unit's environment names (their /proc/PID/fd, read by root: metadata only)."""
        with timer.check("connections") as res:
            path = sqlite.sqlite_file(url)
            held, errors = sqlite.open_databases([p.pid for p in report.processes])
            verdict = sqlite.file_verdict(path, sqlite.stat_identity(path), held)
            if errors and verdict.status == "none":
                res["error"] = "; ".join(errors)
            fields["database_mismatch"] = verdict.status == "elsewhere"
            fields["database_connections"] = verdict.message
            if verdict.status == "elsewhere":
                findings.append(Finding(
                    "database_mismatch", "critical",
                    f"the running workers of {unit} hold {verdict.message} open, not "
                    f"{fields['database']} that the unit's environment names",
                    f"systemctl restart {unit} (the environment changed since start), then "
                    "check which file was migrated"))

    def _workers_database_check(self, unit: str, url: str, report: UnitReport,
                                probe: ProbeResult,
                                verdict: connections.ConnectionVerdict | None,
                                inspection: database.DatabaseInspection, timer: _Timer,
                                fields: dict[str, Any], findings: list[Finding]) -> None:
        """On the right server: the database (and role) the workers use, by name, as the
        server sees them; when it is not the one the environment names, both states."""
        if verdict is None or verdict.status != "connected" or not inspection.identity.database:
            return
        with timer.check("workers_database") as res:
            conns = list(verdict.matching)
            named = connections.name_connections(conns, inspection.sessions, {})
            rest = [c for c in conns if c not in {n.connection for n in named}]
            if rest:  # hidden client addresses, unix sockets: ask who holds the other end
                named += connections.name_connections(rest, inspection.sessions,
                                                      connections.backend_pids(rest))
            configured = inspection.identity.database
            server = inspection.label.rsplit("/", 1)[0]
            by_pooler = None if named else self._through_pooler(url, report, inspection,
                                                                conns, fields)
            if by_pooler is not None:
                # PgBouncer's own names: the database names clients ask it for.
                named, configured, server, suffix = by_pooler
            if not named:
                return
            counts = Counter(n.database for n in named)
            users = {n.database: n.user for n in named}
            described = ", ".join(f"{db} as {users[db] or '?'} ({n})"
                                  for db, n in counts.most_common())
            if by_pooler is not None:
                described += suffix
            fields["database_connections"] = (fields.get("database_connections", "")
                                              + f"; by name: {described}").lstrip("; ")
            others = [db for db in counts if db != configured]
            if not others:
                return
            now_db = max(others, key=lambda db: counts[db])
            env = probe.alembic_env
            graph = migration_checks.revisions_from_dicts(probe.revisions)
            now = self._database_side(unit, now_db, users[now_db], url, report, env, graph)
            version = inspection.version
            restart = DatabaseSide(configured, inspection.privileges.user, error=version.error
                                   or ("the version table is locked" if version.locked
                                       else ""),
                                   state=None if version.locked or version.error else
                                   migration_checks.evaluate(
                                       unit, version.revisions if version.exists else None,
                                       graph))
            if now.error and now.state is None:
                res["error"] = now.error
            fields["database_mismatch"] = True
            findings[:] = [f for f in findings if f.check != "database_mismatch"]
            findings += mismatch_findings(
                unit, server, now, restart, counts[now_db], env.qualified_version_table,
                [db for db in counts if db not in (now_db, configured)])

    def _through_pooler(self, url: str, report: UnitReport,
                        inspection: database.DatabaseInspection,
                        conns: list[connections.ObservedConnection], fields: dict[str, Any],
                        ) -> tuple[list[connections.WorkerSession], str, str, str] | None:
        """The workers reach the server through PgBouncer (the server names none of their
        connections): PgBouncer's own view of them from its admin console, as the unit's user
        with the app's credentials; else an honest "through PgBouncer, per its URL".

        Returns (named sessions, the database the URL asks PgBouncer for, a label for
        PgBouncer, a suffix for the description), or None when no pooler is seen."""
        tcp = [c for c in conns if c.kind == "tcp"]
        if not tcp:
            return None
        addr, port = tcp[0].remote_addr, tcp[0].remote_port
        program = pooler.listener_name(addr, port)
        _host, url_port = database.url_host_port(url)
        moved = bool(inspection.identity.server_port) and inspection.identity.server_port != \
            url_port  # the session landed on another port than the URL names: a proxy
        if not program.startswith("pgbouncer") and not moved:
            return None
        where = f"{addr}:{port}"
        asked = pooler.url_database(url)
        try:
            timeouts = database.Timeouts(connect_s=max(1, int(self.settings.db_timeout_seconds)))
            with user_session(report.context, database.with_database(url, pooler.ADMIN_DATABASE),
                              timeouts, probe_user=self.settings.probe_user,
                              mode="pgbouncer_admin") as conn:
                view = pooler.read_console(conn)
        except database.DatabaseProblem as exc:
            view = pooler.PoolerView(error=str(exc))
        named = [connections.WorkerSession(conn, 0, client.database, client.user,
                                           "PgBouncer console")
                 for conn, client in pooler.name_clients(tcp, view)]
        what = "PgBouncer" if program.startswith("pgbouncer") or not view.error or \
            pooler.refused_by_pgbouncer(view.error) else "a pooler or proxy"
        if not named:
            reason = view.error or "its console lists none of the workers' connections"
            # The URL the running processes were started with says more than the unit's
            # current one (which a restart would use), when they differ.
            started = sorted({pooler.url_database(v) for p in report.processes
                              for v in (p.environ or {}).values()
                              if "://" in v and v.split("://", 1)[0].startswith("postgres")
                              and _same_endpoint(v, port)} - {""})
            per = f"database {asked} per the unit's URL" if started in ([], [asked]) else (
                f"database {', '.join(started)} per the URL the running workers were started "
                f"with (the unit's environment now names {asked})")
            fields["database_connections"] = (
                fields.get("database_connections", "") +
                f"; through {what} at {where}: {per} (the workers' own database not "
                f"confirmed: {reason})").lstrip("; ")
            fields["notes"] = (*fields.get("notes", ()), (
                f"the workers connect through {what} at {where}; which database they use "
                f"is named by PgBouncer's console when the app's role is in its stats_users "
                f"(or admin_users): {reason}"))
            return None
        targets = sorted({f"{n.database} -> {view.target(n.database) or '?'}" for n in named})
        return named, asked, f"PgBouncer at {where}", \
            f" through PgBouncer at {where} ({', '.join(targets)})"

    def _database_side(self, unit: str, name: str, user: str, url: str, report: UnitReport,
                       env: AlembicEnv, graph: list[migration_checks.Revision],
                       ) -> DatabaseSide:
        """The revision state of database `name` on the unit's server: through the URL the
        running processes were started with when it names that database, else the unit's
        URL with the database name replaced (same role and credentials)."""
        backend = database.backend_of(url)
        candidates = [v for p in report.processes for v in (p.environ or {}).values()
                      if "://" in v and database.backend_of(v) == backend
                      and database.db_label(v).rsplit("/", 1)[-1] == name]
        try:
            candidates.append(database.with_database(url, name))
        except Exception:  # the URL was already judged elsewhere; nothing to add here
            pass
        timeouts = database.Timeouts(connect_s=max(1, int(self.settings.db_timeout_seconds)))
        # As the unit's user, like the agent's own session: these URLs are the app's to write.
        opener = functools.partial(user_session, report.context,
                                   probe_user=self.settings.probe_user)
        error = "no URL to reach it"
        for candidate in dict.fromkeys(candidates):
            reader = mysql.read_version_table if backend in mysql.MYSQL_BACKENDS \
                else database.read_version_table
            version = reader(candidate, env.version_table, env.version_table_schema or None,
                             timeouts, opener=opener)
            if version.error:
                error = version.error
                continue
            if version.locked:
                return DatabaseSide(name, user, error="the version table is locked")
            return DatabaseSide(name, user, migration_checks.evaluate(
                unit, version.revisions if version.exists else None, graph))
        return DatabaseSide(name, user, error=error)

    def _integrity(self, unit: str, probe: ProbeResult, fields: dict[str, Any],
                   findings: list[Finding], res: dict[str, Any]) -> None:
        migrations = fields.get("migrations")
        if migrations is None or not probe.revisions:
            return
        hashes = {r["revision"]: r.get("sha256", "") for r in probe.revisions
                  if r.get("sha256")}
        graph = migration_checks.revisions_from_dicts(probe.revisions)
        applied = migration_checks.ancestry(graph, [c for c in migrations.current
                                                    if c not in migrations.unknown])
        store = self._store()
        if store is None:
            res["error"] = "state store unavailable"
            return
        found = store.integrity_findings(unit, hashes)
        fields["modified_migration_files"] = modified_files(probe.revisions,
                                                            store.recorded(unit))
        store.record_applied(unit, hashes, applied)
        fields["applied_migrations_modified"] = len(found)
        findings += found
        if store.condition != STATE_OK:  # read-only or full: said, never "corruption"
            res["error"] = store.detail
            findings.append(store_finding(store.condition, store.detail, store.path.parent))

    def _journal_check(self, unit: str, timer: _Timer, fields: dict[str, Any],
                       findings: list[Finding]) -> None:
        """Schema errors in the journal: the counter only adds entries after the cursor."""
        with timer.check("journal") as res:
            reader = self._journals.get(unit)
            window = self._journal_windows.get(unit)
            baseline_samples: tuple[str, ...] = ()
            if reader is None or window is None:
                reader = self._journal_reader(
                    unit, window_minutes=max(1, self.settings.journal_window_seconds // 60),
                    cursor=self._saved_cursors.get(unit))
                window = ErrorWindow(float(self.settings.journal_window_seconds))
                self._journals[unit], self._journal_windows[unit] = reader, window
                if reader.cursor:  # a restart: history for the gauge, then what is new
                    history = reader.read_window()
                    window.add(history.events)
            shared = self._shared_entries.pop(unit, None)
            if shared is not None:   # from the run's one union read
                scan = reader.take(shared)
            else:
                scan = reader.read()
                if not scan.error and not scan.truncated:
                    self._read_alone.add(unit)
            if scan.error:
                res["error"] = scan.error
            window.add(scan.events)
            totals = self._journal_totals.setdefault(unit, {})
            for kind, count in scan.counts.items():
                # A look-back read is history from before this agent: never a counter increase.
                totals[kind] = totals.get(kind, 0) + (0 if scan.baseline else count)
            fields["journal_schema_errors"] = dict(totals)
            fields["journal_schema_errors_recent"] = window.counts(time.time())
            new = sum(scan.counts.values())
            if scan.baseline:
                baseline_samples = scan.samples
            if new:
                findings.append(Finding(
                    "journal_schema_errors", "critical",
                    f"{new} {'recent' if baseline_samples else 'new'} schema error(s) in the "
                    f"journal of {unit}: " + "; ".join(scan.samples[:3]),
                    "the code expects columns or tables the database lacks: apply the "
                    "pending migrations, then restart"))

    def _save_cursors(self) -> None:
        """Persist the journal cursors (the daemon only); a failing disk is only logged."""
        if self._cursor_file is None:
            return
        cursors = dict(self._saved_cursors)
        cursors.update({u: r.cursor for u, r in self._journals.items() if r.cursor})
        if self._cursor_file.save(cursors):
            self._saved_cursors = cursors

    def _store(self) -> StateStore | None:
        if self._state is None:
            try:
                self._state = StateStore(self.settings.state_path)
            except OSError as exc:
                log.warning("state store %s unavailable: %s", self.settings.state_path, exc)
                return None
        return self._state


# The snapshot fields each check produces: while it fails (or cannot run because the
# database, D-Bus or the app cannot be read) they keep their last known values, so an outage
# never reads as "fixed" to Prometheus. driftwatch_check_staleness_seconds says how old they are.
CHECK_FIELDS: dict[str, tuple[str, ...]] = {
    "migrations": ("migrations",),
    "schema": ("schema_drift",),
    "privileges": ("migration_privileges_ok",),
    "integrity": ("applied_migrations_modified", "modified_migration_files"),
    "connections": ("database_mismatch", "database_connections"),
}
# Everything a failed unit read (D-Bus) leaves unknown.
UNIT_FIELDS = ("unit_up", "active_state", "main_pid", "started_at", "venv", "venv_mismatch",
               "stale_environment_variables", "stale_variable_names", "unit_file",
               "needs_daemon_reload", "needs_restart",
               "app_loaded", "db_up", "database", "journal_schema_errors",
               "journal_schema_errors_recent")


def last_known(fresh: UnitSnapshot, last: UnitSnapshot | None,
               whole: bool = False) -> UnitSnapshot:
    """Pure: fresh, with the fields of every check that did not succeed taken from last.

    whole=True: the unit itself could not be read, so every field is the last known one.
    """
    if last is None:
        return fresh
    succeeded = {c.name for c in fresh.checks if c.success}
    carried: dict[str, Any] = {}
    for check, names in CHECK_FIELDS.items():
        if whole or check not in succeeded:
            carried.update({n: getattr(last, n) for n in names})
    if whole:
        carried.update({n: getattr(last, n) for n in UNIT_FIELDS})
    elif not fresh.database and "app_load" not in succeeded:
        carried["database"] = last.database  # the app could not say which database: keep it
    return replace(fresh, **carried)


def modified_files(revisions: list[dict[str, Any]],
                   recorded: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """Pure: (revision, file name) of every applied revision whose file changed since it ran."""
    return tuple(sorted(
        (str(r["revision"]), os.path.basename(str(r.get("path", ""))))
        for r in revisions
        if r.get("revision") in recorded and r.get("sha256")
        and recorded[r["revision"]] != r["sha256"]))


def recheck_code_newer(report: UnitReport, migrations_dir: str,
                       plain_alembic: bool = False) -> list[Finding]:
    """The code-newer check again, blind to the migrations directory (workers never load it)."""
    app_dir = report.context.app_directory
    if not app_dir or app_dir == "/":
        return []
    facts = UnitFacts(newest_code=files.newest_file(app_dir, skip=(migrations_dir,)),
                      now=time.time())
    return check_code_newer(report.context, report.processes, report.props, facts,
                            plain_alembic)


def recheck_working_directory(report: UnitReport, app_directory: str) -> list[Finding]:
    """The cwd check again, against the directory gunicorn's own configuration chose."""
    ctx = replace(report.context, launch=replace(report.context.launch, chdir=app_directory))
    paths = {app_directory, *(p.cwd for p in report.processes if p.cwd)}
    facts = UnitFacts(realpaths={p: files.realpath(p) for p in paths})
    return check_working_directory(ctx, report.processes, facts)


def not_inspected_finding(unit: str, backend: str, label: str) -> Finding:
    """Pure: the one honest finding for a backend driftwatch does not read."""
    return Finding(
        "backend_not_inspected", "warning",
        f"{unit}: backend {backend or 'unknown'} is not inspected ({label}): no revision "
        "state, drift or migration activity is known for it",
        "run `flask db current` / `flask db check` by hand (agentctl exec); driftwatch "
        "inspects PostgreSQL and SQLite")


def missing_file_finding(unit: str, path: str) -> Finding:
    """Pure: the SQLite file the app names does not exist (it was not created)."""
    return Finding(
        "database_file_missing", "critical",
        f"{unit}: the SQLite database file {path} does not exist: the app would create it "
        "empty on first use",
        "check the unit's DATABASE_URL (a relative path is taken in Flask's instance folder "
        "or the working directory), or create it with `flask db upgrade`")


def _env_database_ports(report: UnitReport) -> set[int]:
    """Ports of database URLs in the running processes' environment (they may be stale)."""
    ports = set()
    for proc in report.processes:
        for value in (proc.environ or {}).values():
            if "://" in value and value.split("://", 1)[0].startswith(
                    ("postgres", "mysql", "mariadb")):
                try:
                    ports.add(database.url_host_port(value)[1])
                except Exception:  # a malformed URL in the environment is not our problem
                    continue
    return ports


def _same_endpoint(url: str, port: int) -> bool:
    """A URL naming the given port (the pooler's), malformed URLs never."""
    try:
        return database.url_host_port(url)[1] == port
    except Exception:  # a malformed URL in the environment is not our problem
        return False


def make_inspector(config: Any) -> Inspector:
    """The daemon's factory: an Inspector configured from an agent.config.Config."""
    settings = InspectorSettings.from_config(config)
    state_dir = os.path.dirname(settings.state_path) or "."
    return Inspector(settings, cursors=CursorFile(state_dir))
