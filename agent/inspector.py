"""The whole runbook for every watched unit: sources -> context -> checks -> Snapshot."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from agent.checks import migrations as migration_checks
from agent.checks.schema import drift_findings, drift_items
from agent.checks.unit import UnitFacts, check_working_directory
from agent.errors import DriftwatchError, UnitNotFound
from agent.inspection import UnitReport, inspect_unit
from agent.model import Finding
from agent.probe.runner import ProbeRequest, ProbeResult, fingerprint, run_probe
from agent.snapshot import CheckRun, DriftItem, MigrationState, Snapshot, UnitSnapshot
from agent.sources import connections, database, files
from agent.sources.journal import JournalReader
from agent.sources.systemd import SystemdSource
from agent.state import StateStore

log = logging.getLogger("driftwatch.inspector")

# Unit findings that mean "the running processes are not what a restart would give".
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

    @contextmanager
    def check(self, name: str) -> Iterator[dict[str, Any]]:
        """Time a check; the body sets result['error'] to mark it failed."""
        result: dict[str, Any] = {"error": ""}
        started = time.monotonic()
        try:
            yield result
        except Exception as exc:  # a check never raises to the caller
            log.exception("check %s failed", name)
            result["error"] = f"internal error: {type(exc).__name__}: {exc}"
        self.runs.append(CheckRun(name, not result["error"], round(time.monotonic() - started, 4),
                                  result["error"]))


class Inspector:
    """Inspects units; remembers probe results by fingerprint and journal cursors per unit."""

    def __init__(self, settings: InspectorSettings, systemd: SystemdSource | None = None,
                 state: StateStore | None = None,
                 probe: Callable[..., ProbeResult] = run_probe) -> None:
        self.settings = settings
        self.systemd = systemd or SystemdSource(timeout_seconds=settings.bus_timeout_seconds)
        self._state = state
        self._probe = probe
        self._probe_memo: dict[str, _ProbeMemo] = {}
        self._journals: dict[str, JournalReader] = {}
        self._journal_totals: dict[str, dict[str, int]] = {}
        self._restarts: dict[str, int] = {}   # unit -> NRestarts at the last inspection
        self._lock = threading.Lock()
        self.probe_runs = 0

    # -- public ------------------------------------------------------------------------
    def __call__(self, units: Sequence[str] | None = None) -> Snapshot:
        """Inspect the given units (None: the configured and discovered ones)."""
        return self.inspect(units)

    def inspect(self, units: Sequence[str] | None = None) -> Snapshot:
        """One full inspection run."""
        started = time.monotonic()
        errors: list[str] = []
        with self._lock:
            if units is None:
                try:
                    units = self.systemd.discover(self.settings.units, self.settings.unit_patterns,
                                                  self.settings.discover_gunicorn)
                except DriftwatchError as exc:
                    errors.append(str(exc))
                    units = list(self.settings.units)
            snaps = tuple(self.inspect_unit(name) for name in units)
        return Snapshot(snaps, taken_at=time.time(),
                        duration_seconds=round(time.monotonic() - started, 4),
                        errors=tuple(errors))

    def invalidate(self, unit: str | None = None) -> None:
        """Forget memoised probe results (of one unit, or all): a restart was seen."""
        if unit is None:
            self._probe_memo.clear()
        else:
            self._probe_memo.pop(unit, None)

    def close(self) -> None:
        """Release the D-Bus connection and the state store."""
        self.systemd.close()
        if self._state is not None:
            self._state.close()

    # -- one unit ------------------------------------------------------------------------
    def inspect_unit(self, name: str) -> UnitSnapshot:
        """Every check for one unit; never raises."""
        timer = _Timer()
        findings: list[Finding] = []
        report: UnitReport | None = None
        with timer.check("unit") as res:
            try:
                report = inspect_unit(self.systemd, name, self._restarts.get(name))
                self._restarts[name] = report.props.n_restarts
            except UnitNotFound as exc:
                res["error"] = str(exc)
                findings.append(Finding("unit_not_found", "critical", str(exc),
                                        "check the unit name (systemctl list-units "
                                        "'gunicorn*') or the agent's configuration"))
            except DriftwatchError as exc:
                res["error"] = str(exc)
        if report is None:
            return UnitSnapshot(unit=name, timestamp=time.time(), unit_up=False,
                                checks=tuple(timer.runs), findings=tuple(findings))
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
        if url:
            fields["database"] = database.db_label(url)
            self._connections_check(unit, url, report, timer, fields, findings)
            inspection = self._database_check(unit, url, timer, fields, findings)
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
        # The agent's own database check already says "unreachable" more precisely.
        # A missing ExecStart program already says why the app cannot load: no second,
        # vaguer "interpreter unknown" finding.
        missing_program = any(f.check == "exec_start_missing" for f in findings)
        if probe_finding and not (probe.error_kind == "database" and fields.get("db_up") is False) \
                and not (missing_program and probe.error_kind == "app_load"):
            findings.append(probe_finding)
        self._journal_check(unit, timer, fields, findings)
        fields["needs_restart"] = any(f.check in RESTART_FINDINGS for f in findings)
        return UnitSnapshot(**fields, checks=tuple(timer.runs), findings=tuple(findings))

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
                request = ProbeRequest(
                    statement_timeout_ms=int(self.settings.db_timeout_seconds * 1000),
                    connect_timeout_s=max(1, int(self.settings.db_timeout_seconds)))
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

    def _database_check(self, unit: str, url: str, timer: _Timer, fields: dict[str, Any],
                        findings: list[Finding]) -> database.DatabaseInspection | None:
        """One short read-only session: version table, activity, privileges, schema hash."""
        timeouts = database.Timeouts(connect_s=max(1, int(self.settings.db_timeout_seconds)))
        with timer.check("database") as res:
            inspection = database.inspect(url, timeouts=timeouts)
            fields["db_up"] = inspection.reachable
            if not inspection.reachable:
                res["error"] = inspection.error
                findings.append(Finding(
                    "database_unreachable", "critical", f"{unit}: {inspection.error}",
                    "check that PostgreSQL runs and that the unit's DATABASE_URL is right"))
                return None
            return inspection
        return None

    def _migration_checks(self, unit: str, inspection: database.DatabaseInspection,
                          probe: ProbeResult, timer: _Timer, fields: dict[str, Any],
                          findings: list[Finding]) -> None:
        """Revision state, migration activity, drift, privileges and integrity."""
        activity = inspection.activity
        in_progress = activity.in_progress
        with timer.check("migrations") as res:
            if probe.revisions_error:
                res["error"] = probe.revisions_error
            graph = migration_checks.revisions_from_dicts(probe.revisions)
            version = inspection.version
            current = version.revisions if version.exists else None
            if version.locked and not version.revisions:
                current = None if version.exists is False else current
            state = migration_checks.evaluate(unit, current, graph,
                                              graph_error=probe.revisions_error) \
                if graph or current else None
            if state is not None:
                fields["migrations"] = MigrationState(
                    version_table_present=state.version_table_exists, current=state.current,
                    heads=state.heads, pending=state.pending or (),
                    multiple_heads=len(state.heads) > 1, unknown=state.unknown,
                    in_progress=in_progress)
                for finding in state.findings:
                    # A running upgrade explains pending revisions: say so, do not page.
                    if in_progress and finding.check in ("pending_migrations",
                                                         "version_table_missing"):
                        continue
                    findings.append(finding)
        if in_progress:
            findings += migration_checks.activity_findings(
                unit, [(s.pid, s.duration_s, s.reason, s.query) for s in activity.sessions],
                locked=inspection.version.locked)
            if fields.get("migrations") is None:
                fields["migrations"] = MigrationState(version_table_present=bool(
                    inspection.version.exists), in_progress=True)
        with timer.check("schema") as res:
            if probe.schema_diff is None:
                res["error"] = probe.schema_diff_error or "schema not compared"
            else:
                items = drift_items(probe.schema_diff)
                fields["schema_drift"] = tuple(DriftItem(**i) for i in items)
                if not in_progress:
                    pending = len(fields["migrations"].pending) if fields.get("migrations") \
                        else 0
                    findings += drift_findings(unit, items, pending)
        with timer.check("privileges") as res:
            priv = inspection.privileges
            if priv.error:
                res["error"] = priv.error
            else:
                fields["migration_privileges_ok"] = priv.sufficient
                findings += migration_checks.privilege_findings(
                    unit, priv.user, priv.schema, priv.superuser, priv.can_create,
                    priv.not_owned)
        with timer.check("integrity") as res:
            self._integrity(unit, probe, fields, findings, res)

    def _connections_check(self, unit: str, url: str, report: UnitReport, timer: _Timer,
                           fields: dict[str, Any], findings: list[Finding]) -> None:
        """Which server the running workers are really connected to (no database access)."""
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
        store.record_applied(unit, hashes, applied)
        fields["applied_migrations_modified"] = len(found)
        findings += found

    def _journal_check(self, unit: str, timer: _Timer, fields: dict[str, Any],
                       findings: list[Finding]) -> None:
        with timer.check("journal") as res:
            reader = self._journals.get(unit)
            if reader is None:
                reader = JournalReader(
                    unit, window_minutes=max(1, self.settings.journal_window_seconds // 60))
                self._journals[unit] = reader
            scan = reader.read()
            if scan.error:
                res["error"] = scan.error
            totals = self._journal_totals.setdefault(unit, {})
            for kind, count in scan.counts.items():
                totals[kind] = totals.get(kind, 0) + count
            fields["journal_schema_errors"] = dict(totals)
            new = sum(scan.counts.values())
            if new:
                findings.append(Finding(
                    "journal_schema_errors", "critical",
                    f"{new} new schema error(s) in the journal of {unit}: "
                    + "; ".join(scan.samples[:3]),
                    "the code expects columns or tables the database lacks: apply the "
                    "pending migrations, then restart"))

    def _store(self) -> StateStore | None:
        if self._state is None:
            try:
                self._state = StateStore(self.settings.state_path)
            except OSError as exc:
                log.warning("state store %s unavailable: %s", self.settings.state_path, exc)
                return None
        return self._state


def recheck_working_directory(report: UnitReport, app_directory: str) -> list[Finding]:
    """The cwd check again, against the directory gunicorn's own configuration chose."""
    ctx = replace(report.context, launch=replace(report.context.launch, chdir=app_directory))
    paths = {app_directory, *(p.cwd for p in report.processes if p.cwd)}
    facts = UnitFacts(realpaths={p: files.realpath(p) for p in paths})
    return check_working_directory(ctx, report.processes, facts)


def _env_database_ports(report: UnitReport) -> set[int]:
    """Ports of database URLs in the running processes' environment (they may be stale)."""
    ports = set()
    for proc in report.processes:
        for value in (proc.environ or {}).values():
            if "://" in value and value.split("://", 1)[0].startswith("postgres"):
                try:
                    ports.add(database.url_host_port(value)[1])
                except Exception:  # a malformed URL in the environment is not our problem
                    continue
    return ports


def make_inspector(config: Any) -> Inspector:
    """The daemon's factory: an Inspector configured from an agent.config.Config."""
    return Inspector(InspectorSettings.from_config(config))
