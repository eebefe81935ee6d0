"""agentctl upgrade: check, plan, confirm, `flask db upgrade` (or, for a plain Alembic app,
`alembic upgrade`) in the unit's context, verify, restart."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

from agent.context import AppContext
from agent.errors import DriftwatchError
from agent.privileged.inspection import inspect_unit
from agent.preflight.command import Preflight
from agent.preflight.command import refusal as preflight_refusal
from agent.preflight.plan import render as render_preflight
from agent.snapshot import MigrationState, UnitSnapshot
from agent.privileged.sources.systemd import SystemdSource
from agent.cli.unitexec import (
    GunicornConfigError,
    Resolver,
    describe_returncode,
    plan_exec,
    run_captured,
)

EXIT_OK, EXIT_PROBLEMS, EXIT_ERROR = 0, 1, 2
# The session-level advisory lock every agentctl upgrade holds while it migrates:
# pg_advisory_lock(7239384051653697892), the bigint of b"dwupgrad". An app's env.py (or any
# deploy script) that takes the same lock is serialised with agentctl upgrade.
UPGRADE_LOCK_KEY = int.from_bytes(b"dwupgrad", "big")
# The upgrade child's exit code when another session holds the lock (EX_TEMPFAIL).
LOCKED_EXIT = 75
CHILD_MARK = "driftwatch-upgrade:"
CHILD_SOURCE = Path(__file__).resolve().parent.parent / "asuser" / "upgrade_child.py"
# The two tools agentctl upgrade runs (agent/asuser/upgrade_child.py's MODE "flask" / "alembic").
FLASK_TOOL, ALEMBIC_TOOL = "flask db upgrade", "alembic upgrade"
# Checks without which nobody can say what an upgrade would do.
ESSENTIAL_CHECKS = ("unit", "app_load", "database", "migrations")


class UpgradeError(DriftwatchError):
    """The upgrade was refused or stopped; exit_code says which kind (1 state, 2 could not)."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Decision:
    """What upgrade should do for a unit, decided from its snapshot alone."""

    action: str                    # "refuse", "nothing" or "upgrade"
    reason: str = ""
    exit_code: int = EXIT_OK
    pending: tuple[str, ...] = ()  # in upgrade order
    warnings: tuple[str, ...] = ()
    target: str = ""               # what flask db upgrade is given: never "head(s)"


def decide(unit: UnitSnapshot, target: str = "") -> Decision:
    """Pure: refuse, do nothing, or upgrade through these revisions up to target (default:
    the one head shown)."""
    for check in unit.checks:
        if check.name in ESSENTIAL_CHECKS and not check.success:
            return Decision("refuse", f"cannot inspect {unit.unit} ({check.name}): "
                                      f"{check.error}", EXIT_ERROR)
    m = unit.migrations
    if m is None:
        return Decision("refuse", f"the migration state of {unit.unit} is unknown "
                                  "(no revisions found and no version table read)", EXIT_ERROR)
    where = unit.database or "the database"
    if m.in_progress:
        return Decision("refuse", f"a migration is already running on {where}: wait for it "
                                  "to finish (agentctl status shows it)", EXIT_PROBLEMS)
    if m.multiple_heads:
        return Decision("refuse", f"the deployed code has {len(m.heads)} migration heads "
                                  f"({', '.join(m.heads)}): merge them first "
                                  "(flask db merge heads) and deploy that", EXIT_PROBLEMS)
    if m.unknown:
        return Decision("refuse", f"{where} is at revision {', '.join(m.unknown)}, which the "
                                  "deployed code does not know (newer code migrated it, or "
                                  "the code was rolled back): deploy matching code first",
                        EXIT_PROBLEMS)
    if not m.heads:
        return Decision("refuse", f"the code of {unit.unit} has no migration revisions",
                        EXIT_PROBLEMS)
    if target and target not in m.pending:
        if target in m.current:
            return Decision("nothing", f"{where} is already at {target}; nothing to upgrade")
        return Decision("refuse", f"{target} is not a pending revision of {unit.unit} "
                                  f"(pending: {', '.join(m.pending) or 'none'}; head "
                                  f"{', '.join(m.heads)})", EXIT_PROBLEMS)
    if not m.pending:
        return Decision("nothing", f"{where} is at head {', '.join(m.heads)}; nothing to "
                                   "upgrade")
    warnings = () if m.version_table_present else (
        f"{where} has no alembic_version table: every revision will be applied, as for a "
        "new database; make sure this is the database you mean",)
    target = target or m.heads[0]
    pending = tuple(m.pending[:m.pending.index(target) + 1]) if target in m.pending \
        else tuple(m.pending)
    return Decision("upgrade", pending=pending, warnings=warnings, target=target)


def upgrade_tool(has_alembic_ini: bool, environment: Mapping[str, str]) -> str:
    """Pure: which command migrates the unit's app. A plain Alembic project (alembic.ini in
    the app's directory, as the probe finds it) gets `alembic upgrade`, unless the unit names
    a Flask app (FLASK_APP): Flask-Migrate apps keep alembic.ini under migrations/."""
    if has_alembic_ini and not environment.get("FLASK_APP"):
        return ALEMBIC_TOOL
    return FLASK_TOOL


def render_plan(unit: UnitSnapshot, decision: Decision, restart: bool,
                tool: str = FLASK_TOOL) -> str:
    """The plan shown before asking: database, revisions in order, and the restart."""
    m = unit.migrations
    current = ", ".join(m.current) if m and m.current else "(empty)"
    lines = [f"Upgrade plan for {unit.unit}:",
             f"  database:  {unit.database or '?'}",
             f"  current:   {current}",
             f"  head:      {', '.join(m.heads) if m else '?'}",
             f"  pending:   {len(decision.pending)} revision(s), applied in this order:"]
    lines += [f"    {n}. {rev}" for n, rev in enumerate(decision.pending, 1)]
    if decision.target:
        lines.append(f"  target:    {decision.target} (pinned: {tool} "
                     f"{decision.target}; refused if the revisions change before it runs)")
    lines.append(f"  then:      {'restart ' + unit.unit if restart else 'no restart (--restart not given)'}")
    lines += [f"  warning:   {w}" for w in decision.warnings]
    return "\n".join(lines) + "\n"


def flask_app_value(ctx: AppContext, env: Mapping[str, str] | None = None,
                    app_uri: str | None = None) -> str:
    """FLASK_APP as the command's environment has it (the unit's, ExecStart -e and gunicorn's
    raw_env, in gunicorn's order), else the app gunicorn loads (Flask reads the same syntax).

    env and app_uri come from the exec plan; without them, the unit's environment, ExecStart's
    -e values and ExecStart's app spec.
    """
    if env is not None and env.get("FLASK_APP"):
        return env["FLASK_APP"]
    for assignment in ctx.launch.gunicorn_env:
        name, _, value = assignment.partition("=")
        if name == "FLASK_APP":
            return value
    if ctx.environment.get("FLASK_APP"):
        return ctx.environment["FLASK_APP"]
    spec = app_uri if app_uri is not None else ctx.launch.app_spec
    if not spec:
        raise UpgradeError(f"{ctx.unit}: FLASK_APP is unset and the gunicorn app spec is "
                           "unknown; set FLASK_APP in the unit's environment")
    # 'module:app' and 'module:create_app()' mean the same to Flask; a bare module too.
    return spec


@dataclass(frozen=True)
class UpgradeOptions:
    """What the admin asked for."""

    unit: str
    restart: bool = False
    assume_yes: bool = False
    restart_timeout: float = 60.0
    target: str = ""                 # the revision confirmed; "" = the one head shown
    lock_timeout: float = 5.0        # lock_timeout of the migration's sessions (seconds)
    lock_retries: int = 3            # upgrade attempts after one gave up waiting for a lock
    retry_delay: float = 1.0         # first pause between attempts, doubled each time
    timeout: float = 600.0           # the whole flask db upgrade, then it is stopped
    accept_risk: bool = False  # go on even when the preflight rates a revision critical


Inspect = Callable[[str], UnitSnapshot]
Confirm = Callable[[str], bool]


class Upgrader:
    """The sequence; every step that fails stops it with a one-line reason."""

    def __init__(self, options: UpgradeOptions, systemd: SystemdSource, inspect: Inspect,
                 confirm: Confirm | None, out: TextIO, euid: int,
                 resolve: Resolver | None = None, preflight: Preflight | None = None,
                 tool: str | None = None) -> None:
        self.options, self.systemd, self.inspect = options, systemd, inspect
        self.confirm, self.out, self.euid = confirm, out, euid
        self.resolve = resolve  # gunicorn's config resolution (None: the real one)
        self.preflight = preflight  # agentctl plan's preflight (None: not shown)
        self.tool = tool  # flask db upgrade / alembic upgrade (None: found from the unit)

    def run(self) -> int:
        """check -> plan -> confirm -> still as shown? -> flask db upgrade TARGET -> verify
        -> restart."""
        unit = self.inspect(self.options.unit)
        decision = decide(unit, self.options.target)
        if decision.action == "refuse":
            raise UpgradeError(f"refusing to upgrade {unit.unit}: {decision.reason}",
                               decision.exit_code)
        if decision.action == "nothing":
            self.out.write(f"{unit.unit}: {decision.reason}.\n")
            if self.options.restart and unit.needs_restart:
                self.out.write(f"{unit.unit}: the running processes are stale; restarting.\n")
                self._restart(unit.main_pid)
            return EXIT_OK
        self.out.write(render_plan(unit, decision, self.options.restart, self._tool()))
        self._preflight(unit)
        self._confirm(unit.unit)
        self._still_as_shown(unit)
        self._flask_upgrade(unit, decision.target)
        after = self.inspect(self.options.unit)
        m = after.migrations
        if m is None or m.unknown or tuple(m.current) != (decision.target,):
            now = ", ".join(m.current) if m else "unknown"
            raise UpgradeError(f"{self._tool()} finished but {after.database or 'the database'}"
                               f" is at {now or '(empty)'}, not at {decision.target}; "
                               "not restarting")
        where = "head " if decision.target in m.heads else ""
        self.out.write(f"{after.unit}: {after.database} is now at {where}{decision.target}.\n")
        if self.options.restart:
            self._restart(after.main_pid or unit.main_pid)
        return EXIT_OK

    def _preflight(self, unit: UnitSnapshot) -> None:
        """Show what each pending revision locks; refuse a critical one unless accepted."""
        if self.preflight is None:
            return
        plan = self.preflight(unit)
        self.out.write(render_preflight(plan, verbose=False))
        reason = preflight_refusal(plan, self.options.accept_risk)
        if reason:
            raise UpgradeError(reason, EXIT_PROBLEMS)

    def _confirm(self, name: str) -> None:
        if self.options.assume_yes:
            return
        if self.confirm is None:
            raise UpgradeError("not confirmed: no terminal to ask on; pass --yes to upgrade "
                               "without asking", EXIT_ERROR)
        if not self.confirm(f"Apply these migrations to the database of {name}? [y/N] "):
            raise UpgradeError("not confirmed; nothing changed", EXIT_ERROR)

    def _still_as_shown(self, shown: UnitSnapshot) -> None:
        """Refuse when the revisions changed between the plan shown and now (a deploy, or
        another upgrade, while the admin read it)."""
        now = self.inspect(self.options.unit)
        before, after = shown.migrations, now.migrations
        if before is None or after is None or after.in_progress or (
                before.heads, before.current, before.pending) != (
                after.heads, after.current, after.pending):
            def state(m: MigrationState | None) -> str:
                if m is None:
                    return "unknown"
                running = ", a migration running" if m.in_progress else ""
                return (f"heads {', '.join(m.heads) or '-'}, current "
                        f"{', '.join(m.current) or '(empty)'}{running}")
            raise UpgradeError(f"refusing to upgrade {shown.unit}: its migrations changed "
                               f"since the plan was shown (then {state(before)}; now "
                               f"{state(after)}); nothing changed: run agentctl upgrade again",
                               EXIT_PROBLEMS)

    def _tool(self) -> str:
        """flask db upgrade or alembic upgrade for the unit, found once: alembic.ini in the
        directory the unit's app runs in (a stat, nothing read)."""
        if self.tool is None:
            ctx = inspect_unit(self.systemd, self.options.unit).context
            has_ini = os.path.lexists(os.path.join(ctx.app_directory or "/", "alembic.ini"))
            self.tool = upgrade_tool(has_ini, ctx.environment)
        return self.tool

    def _flask_upgrade(self, unit: UnitSnapshot, target: str) -> None:
        """Run the upgrade to target: flask db upgrade, or alembic upgrade for plain Alembic."""
        o = self.options
        tool = self._tool()
        ctx = inspect_unit(self.systemd, o.unit).context
        lock_ms = max(1, int(o.lock_timeout * 1000))
        mode = "alembic" if tool == ALEMBIC_TOOL else "flask"
        # The child is sent as -c text: the unit's user never reads this checkout.
        argv = ("python", "-c", CHILD_SOURCE.read_text(), target, str(lock_ms),
                str(o.lock_retries), str(o.retry_delay), str(UPGRADE_LOCK_KEY),
                f"driftwatch upgrade {o.unit}", mode)
        try:
            plan = plan_exec(ctx, argv, self.euid, resolve=self.resolve)
        except GunicornConfigError as exc:
            raise UpgradeError(f"{exc}; nothing changed", EXIT_ERROR) from None
        env = dict(plan.env)
        if mode == "flask":
            # FLASK_APP after gunicorn's raw_env is applied: a config file may set it, or
            # wsgi_app.
            env["FLASK_APP"] = flask_app_value(
                ctx, plan.env,
                plan.app_uri if plan.config_source == "gunicorn config" else None)
        elif not os.path.lexists(os.path.join(plan.cwd, "alembic.ini")):
            # gunicorn's config file moved the app elsewhere than the plan said.
            raise UpgradeError(f"refusing to upgrade {unit.unit}: no alembic.ini in "
                               f"{plan.cwd}, where {unit.unit}'s app runs; nothing changed",
                               EXIT_ERROR)
        # Also SET and checked on each connection by the child: options= in a URL
        # replaces PGOPTIONS entirely.
        env["PGOPTIONS"] = with_lock_timeout(env.get("PGOPTIONS", ""), lock_ms)
        plan = replace(plan, env=env)
        self.out.write(f"Running {tool} {target} as {plan.user} in {plan.cwd} "
                       f"(lock_timeout {o.lock_timeout:g} s, {o.lock_retries} retries, "
                       f"stopped after {o.timeout:g} s):\n")
        self.out.flush()
        events: list[dict[str, Any]] = []

        def on_line(line: str) -> None:
            event = child_event(line)
            if event is None:
                self.out.write(f"  | {line}\n")
                return
            events.append(event)
            note = describe_event(event)
            if note:
                self.out.write(f"  driftwatch: {note}\n")

        result = run_captured(plan, on_line=on_line, systemd=self.systemd, timeout=o.timeout)
        tail = "\n".join(f"  | {line}" for line in result.tail[-10:]
                         if child_event(line) is None)
        last = f". Last output:\n{tail}" if tail else ""
        if result.timed_out:
            raise UpgradeError(f"{tool} did not finish within {o.timeout:g} s and "
                               f"was stopped ({stopped_note(unit.backend)}); "
                               f"{unit.database} was not verified and {unit.unit} was not "
                               f"restarted{last}")
        locked = [e for e in events if e.get("kind") == "locked"]
        if result.returncode == LOCKED_EXIT and locked:
            holders = describe_holders(locked[-1].get("holders") or [],
                                       file_lock=bool(locked[-1].get("path")))
            raise UpgradeError(f"refusing to upgrade {unit.unit}: another upgrade holds the "
                               f"upgrade lock on {unit.database} ({holders}); "
                               "nothing changed", EXIT_PROBLEMS)
        if result.returncode != 0:
            raise UpgradeError(f"{tool} {describe_returncode(result.returncode)}; "
                               f"{unit.database} was not verified and {unit.unit} was not "
                               f"restarted{last}")

    def _restart(self, old_pid: int) -> None:
        name = self.options.unit
        self.systemd.restart_unit(name)
        started = time.monotonic()
        deadline = started + self.options.restart_timeout
        props = self.systemd.read_unit(name)
        while time.monotonic() < deadline:
            props = self.systemd.read_unit(name)
            if props.active_state == "active" and props.main_pid and props.main_pid != old_pid:
                self.out.write(f"{name}: restarted, active with MainPID {props.main_pid} "
                               f"(was {old_pid or '-'}).\n")
                return
            # A unit that was failed before still shows it until the job starts.
            if props.active_state == "failed" and time.monotonic() - started > 2:
                break
            time.sleep(0.2)
        raise UpgradeError(f"{name} did not come back after the restart: {props.active_state} "
                           f"({props.sub_state}), MainPID {props.main_pid or '-'}; see "
                           f"journalctl -u {name}")


def with_lock_timeout(pgoptions: str, lock_ms: int) -> str:
    """PGOPTIONS with lock_timeout appended (a later -c wins in PostgreSQL)."""
    ours = f"-c lock_timeout={lock_ms}"
    return f"{pgoptions.strip()} {ours}" if pgoptions.strip() else ours


def child_event(line: str) -> dict[str, Any] | None:
    """The upgrade child's own report in a line of output, else None."""
    if not line.startswith(CHILD_MARK):
        return None
    try:
        event = json.loads(line[len(CHILD_MARK):])
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


def stopped_note(backend: str) -> str:
    """What became of a migration stopped at the overall timeout, per backend."""
    if backend == "sqlite":
        return ("Alembic's SQLite DDL is not one transaction: a revision stopped half-way "
                "is not undone, agentctl check shows where it stopped")
    if backend in ("mysql", "mariadb"):
        return ("MySQL/MariaDB DDL commits as it goes: a revision stopped half-way is not "
                "undone, agentctl check names what it left (half_applied_revision)")
    return "PostgreSQL rolls back its open transaction"


def describe_holders(holders: Sequence[Mapping[str, Any]], file_lock: bool = False) -> str:
    """'held by pid 4242 (application_name 'x', user app, since 2026-...)' for each holder
    of PostgreSQL's advisory lock; 'held by pid 4242 (flock)' for a SQLite file's flock."""
    if not holders:
        return ("held by a process /proc/locks does not show" if file_lock else
                "held by a session that has since ended")
    if all("connection" in h for h in holders):   # MySQL/MariaDB's GET_LOCK
        return "; ".join(f"held by connection {h.get('connection')}" + (
            f" (user {h.get('user')}, host {h.get('host') or '?'}, for {h.get('seconds') or 0} s)"
            if h.get("user") else " (another user's: its details need the PROCESS privilege)")
            for h in holders)
    if all("command" in h for h in holders):
        return "; ".join(f"held by pid {h.get('pid') or '?'} ({h.get('command') or '?'})"
                         for h in holders)
    return "; ".join(f"held by pid {h.get('pid')} (application_name "
                     f"{str(h.get('application_name') or '')!r}, user {h.get('user') or '?'}, "
                     f"since {h.get('since') or '?'})" for h in holders)


def describe_event(event: Mapping[str, Any]) -> str:
    """One line for the admin about what the child did, '' for nothing worth saying."""
    kind = event.get("kind")
    if kind == "locked_by_us" and event.get("path"):
        return f"holding the upgrade lock flock({event.get('path')}) in pid {event.get('pid')}"
    if kind == "locked_by_us" and event.get("lock"):
        return f"holding the upgrade lock {event.get('lock')} in connection {event.get('pid')}"
    if kind == "locked_by_us":
        return (f"holding the upgrade lock pg_advisory_lock({event.get('key')}) in backend "
                f"pid {event.get('pid')}")
    if kind == "sqlite_locked":
        return (f"the SQLite database stayed locked longer than busy_timeout "
                f"({event.get('wait_ms')} ms); not retried: Alembic's SQLite DDL is not one "
                "transaction")
    if kind == "lock_timeout":
        return (f"a migration waited longer than lock_timeout ({event.get('wait_ms')} ms); "
                f"attempt {event.get('attempt')} of {event.get('of')} rolled back, retrying "
                f"in {event.get('retry_in')} s")
    if kind == "no_lock":
        return f"no upgrade lock taken: {event.get('reason')}"
    return ""


def unit_snapshot(snapshots: Sequence[UnitSnapshot], name: str) -> UnitSnapshot:
    """The one unit asked for out of an inspection run."""
    for snap in snapshots:
        if snap.unit == name:
            return snap
    if len(snapshots) == 1:
        return snapshots[0]
    raise UpgradeError(f"{name} was not inspected")
