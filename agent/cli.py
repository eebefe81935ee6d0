"""agentctl: the admin's view of what driftwatch sees."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

from agent import __version__
from agent.config import DEFAULT_CONFIG_PATH
from agent.errors import AccessDenied, ConfigError, DriftwatchError
from agent.inspection import UnitReport, inspect_unit
from agent.checks.schema import describe as describe_drift
from agent.secrets import mask_value
from agent.snapshot import Snapshot, UnitSnapshot
from agent.sources.systemd import SystemdSource, normalize_unit_name

if TYPE_CHECKING:
    from agent.inspector import Inspector

EXIT_OK, EXIT_PROBLEMS, EXIT_ERROR = 0, 1, 2
SEVERITY_MARK = {"critical": "✗", "warning": "!", "info": "·"}


def build_parser() -> argparse.ArgumentParser:
    """The agentctl command line."""
    parser = argparse.ArgumentParser(
        prog="agentctl",
        description="Inspect gunicorn units the way the 'migrations not applied' runbook does.")
    parser.add_argument("--version", action="version", version=f"agentctl {__version__}")
    parser.add_argument("--bus-timeout", type=float, default=5.0, metavar="SECONDS",
                        help="timeout of each D-Bus call (default 5)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    env = sub.add_parser("env", help="the environment a new process of UNIT would get")
    env.add_argument("unit")
    env.add_argument("--json", action="store_true", help="machine-readable output")
    env.add_argument("--reveal", action="store_true",
                     help="show secret values (root only)")

    ctx = sub.add_parser("context", help="the unit's rebuilt context and its findings")
    ctx.add_argument("unit")
    ctx.add_argument("--json", action="store_true", help="machine-readable output")

    check = sub.add_parser(
        "check", help="run every check once, no daemon needed (exit 0 ok, 1 problems, "
                      "2 could not inspect)")
    check.add_argument("units", nargs="*", metavar="UNIT",
                       help="units to check (default: gunicorn.service and every discovered "
                            "gunicorn service)")
    check.add_argument("--json", action="store_true", help="machine-readable output")
    add_inspection_options(check)

    status = sub.add_parser(
        "status", help="the running agent's latest snapshot, or one local check when no "
                       "agent answers (exit codes as check)")
    status.add_argument("unit", nargs="?", metavar="UNIT", help="only this unit")
    status.add_argument("--json", action="store_true", help="the snapshot as JSON")
    status.add_argument("--web.listen-address", dest="listen_address", metavar="[HOST]:PORT",
                        help="where the agent listens (default: listen_address of the "
                             "config file, else :9410)")
    status.add_argument("--config.file", dest="config_file", metavar="PATH", default=None,
                        help=f"the agent's config file (default {DEFAULT_CONFIG_PATH})")
    status.add_argument("--timeout", type=float, default=2.0, metavar="SECONDS",
                        help="how long to wait for the agent (default 2)")
    status.add_argument("--local", action="store_true",
                        help="do not ask the agent; check locally")
    add_inspection_options(status)

    exe = sub.add_parser(
        "exec", help="run CMD in UNIT's exact context (user, groups, environment, app dir, "
                     "venv first on PATH); exits with CMD's exit code",
        usage="agentctl exec UNIT -- CMD [ARG...]")
    exe.add_argument("unit")
    exe.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD",
                     help="the command and its arguments, after --")

    upgrade = sub.add_parser(
        "upgrade", help="check, show the plan, run flask db upgrade in UNIT's context, "
                        "verify the head, optionally restart (exit 0 done or nothing to do, "
                        "1 refused by the migration state, 2 could not inspect, not "
                        "confirmed or failed)")
    upgrade.add_argument("unit")
    upgrade.add_argument("--restart", action="store_true",
                         help="restart the unit afterwards (only once the head is verified)")
    upgrade.add_argument("--yes", "-y", action="store_true",
                         help="do not ask for confirmation (needed without a terminal)")
    upgrade.add_argument("--restart-timeout", type=float, default=60.0, metavar="SECONDS",
                         help="how long the restarted unit may take to be active (default 60)")
    add_inspection_options(upgrade)
    return parser


def add_inspection_options(parser: argparse.ArgumentParser) -> None:
    """The options of a local inspection run (check, status without agent, upgrade)."""
    parser.add_argument("--probe-timeout", type=float, default=20.0, metavar="SECONDS",
                        help="how long the app may take to load (default 20)")
    parser.add_argument("--db-timeout", type=float, default=5.0, metavar="SECONDS",
                        help="database connect/statement timeout (default 5)")
    parser.add_argument("--state-dir", default="/var/lib/driftwatch", metavar="DIR",
                        help="where applied-migration hashes are remembered")


def cmd_env(args: argparse.Namespace, systemd: SystemdSource, out: TextIO) -> int:
    """agentctl env UNIT."""
    if args.reveal and os.geteuid() != 0:
        raise AccessDenied("--reveal shows secrets and is for root only")
    report = inspect_unit(systemd, args.unit)
    ctx = report.context
    shown = {name: value if args.reveal else mask_value(name, value)
             for name, value in ctx.environment.items()}
    if args.json:
        json.dump({"unit": ctx.unit, "revealed": bool(args.reveal),
                   "environment": [{"name": n, "value": v,
                                    "source": ctx.environment_sources.get(n, "")}
                                   for n, v in shown.items()],
                   "environment_files": [f.as_dict() for f in ctx.environment_files]},
                  out, indent=2)
        out.write("\n")
        return EXIT_OK
    note = "secrets revealed" if args.reveal else "secrets masked; --reveal (root) shows them"
    out.write(f"# {ctx.unit}: environment of a new process, in systemd's order ({note})\n")
    for state in ctx.environment_files:
        status = "present" if state.exists else (state.error or "missing")
        out.write(f"# EnvironmentFile={'-' if state.optional else ''}{state.path} ({status})\n")
    width = max((len(f"{n}={shlex.quote(v)}") for n, v in shown.items()), default=0)
    for name, value in shown.items():
        line = f"{name}={shlex.quote(value)}"
        out.write(f"{line:<{min(width, 70)}}  # {ctx.environment_sources.get(name, '')}\n")
    for finding in report.findings:
        if finding.check.startswith("env_file"):
            out.write(f"# {SEVERITY_MARK[finding.severity]} {finding.message}\n")
    return EXIT_OK


def cmd_context(args: argparse.Namespace, systemd: SystemdSource, out: TextIO) -> int:
    """agentctl context UNIT."""
    report = inspect_unit(systemd, args.unit)
    if args.json:
        json.dump(report.as_dict(), out, indent=2)
        out.write("\n")
    else:
        render_context(report, out)
    return EXIT_PROBLEMS if has_problems(report) else EXIT_OK


def has_problems(report: UnitReport) -> bool:
    """True when any finding is a warning or worse."""
    return any(f.severity in ("critical", "warning") for f in report.findings)


def render_context(report: UnitReport, out: TextIO) -> None:
    """The human form of agentctl context, in the spirit of systemctl status."""
    p, c = report.props, report.context
    since = (f" since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(p.exec_main_start_timestamp))}"
             if p.exec_main_start_timestamp and p.active_state == "active" else "")
    rows: list[tuple[str, str]] = [
        ("state", f"{p.active_state} ({p.sub_state}){since}"),
        ("unit file", p.fragment_path + "".join(f"\n+ {d}" for d in p.drop_in_paths)),
        ("user", (c.user or "root") + (f", group {c.group}" if c.group else "")
         + (f", groups {' '.join(c.supplementary_groups)}" if c.supplementary_groups else "")),
        ("working dir", c.working_directory + (" (optional)" if c.working_directory_optional
                                               else "")),
        ("exec start", shlex.join(c.exec_start)),
        ("app", c.launch.app_spec or "?"),
        ("venv", f"{c.venv} ({c.venv_source})" if c.venv else "none found"),
        ("python", c.python or "?"),
    ]
    for state in c.environment_files:
        status = "present" if state.exists else (state.error or "missing")
        rows.append(("env file", f"{'-' if state.optional else ''}{state.path}: {status}"
                     + (f", {len(state.variables)} variables" if state.exists else "")))
    rows.append(("environment", ", ".join(c.environment) or "(none)"))
    rows.append(("main pid", str(c.main_pid or "-")))
    for proc in report.processes:
        detail = f"{proc.role} {proc.pid}: venv {proc.venv or '?'}, cwd {proc.cwd or '?'}"
        rows.append(("process", detail + (f" ({proc.error})" if proc.error else "")))
    out.write(f"● {c.unit}\n")
    for label, value in rows:
        lines = value.splitlines() or [""]
        out.write(f"  {label:>12}: {lines[0]}\n")
        for extra in lines[1:]:
            out.write(f"  {'':>12}  {extra}\n")
    if not report.findings:
        out.write("  findings: none\n")
        return
    out.write("  findings:\n")
    for finding in report.findings:
        out.write(f"    {SEVERITY_MARK[finding.severity]} [{finding.severity}] "
                  f"{finding.check}: {finding.message}\n")
        if finding.remedy:
            out.write(f"        fix: {finding.remedy}\n")


def make_inspector(args: argparse.Namespace, systemd: SystemdSource) -> Inspector:
    """An Inspector with the command line's timeouts and state directory."""
    from agent.inspector import Inspector, InspectorSettings

    settings = InspectorSettings(probe_timeout_seconds=args.probe_timeout,
                                 db_timeout_seconds=args.db_timeout,
                                 state_path=f"{args.state_dir.rstrip('/')}/state.db",
                                 bus_timeout_seconds=args.bus_timeout)
    return Inspector(settings, systemd=systemd)


def local_snapshot(args: argparse.Namespace, systemd: SystemdSource,
                   units: Sequence[str] | None) -> Snapshot:
    """One inspection run here and now, no daemon involved."""
    inspector = make_inspector(args, systemd)
    try:
        return inspector.inspect(units)
    finally:
        inspector.close()


def cmd_check(args: argparse.Namespace, systemd: SystemdSource, out: TextIO) -> int:
    """agentctl check [UNIT...]."""
    snapshot = local_snapshot(args, systemd, args.units or None)
    if snapshot.errors and not snapshot.units:
        raise DriftwatchError("; ".join(snapshot.errors))
    if args.json:
        json.dump({"units": [check_json(u) for u in snapshot.units],
                   "errors": list(snapshot.errors)}, out, indent=2)
        out.write("\n")
    else:
        render_check(snapshot.units, out)
    return exit_code(snapshot.units)


def exit_code(units: Sequence[UnitSnapshot]) -> int:
    """2 when a unit could not be inspected, 1 when any has problems, else 0."""
    if any(not_inspectable(u) for u in units):
        return EXIT_ERROR
    return EXIT_PROBLEMS if any(u.has_problems for u in units) else EXIT_OK


def not_inspectable(unit: UnitSnapshot) -> bool:
    """The unit, its app or its database could not be looked at."""
    return any(not c.success for c in unit.checks
               if c.name in ("unit", "app_load", "database", "migrations"))


def check_json(u: UnitSnapshot) -> dict[str, object]:
    """The documented JSON shape of one unit in agentctl check --json."""
    m = u.migrations
    return {
        "unit": u.unit, "active_state": u.active_state, "database": u.database,
        "app_loaded": u.app_loaded, "db_up": u.db_up,
        "migrations": None if m is None else {
            "current": list(m.current), "heads": list(m.heads), "pending": list(m.pending),
            "multiple_heads": m.multiple_heads, "unknown": list(m.unknown),
            "version_table": m.version_table_present, "in_progress": m.in_progress},
        "schema_drift": None if u.schema_drift is None else {
            "count": len(u.schema_drift),
            "items": [{"kind": d.kind, "table": d.table, "name": d.name}
                      for d in u.schema_drift]},
        "needs_restart": u.needs_restart, "database_mismatch": u.database_mismatch,
        "database_connections": u.database_connections,
        "migration_privileges_ok": u.migration_privileges_ok,
        "checks": [{"name": c.name, "success": c.success, "seconds": c.duration_seconds,
                    "error": c.error} for c in u.checks],
        "findings": [f.as_dict() for f in u.findings],
    }


def render_check(units: Sequence[UnitSnapshot], out: TextIO) -> None:
    """A compact table, then each finding with its remedy."""
    header = ("UNIT", "DATABASE", "CURRENT", "HEAD", "PENDING", "DRIFT", "RESTART", "STATE")
    rows = [header]
    for u in units:
        m = u.migrations
        rows.append((
            u.unit, u.database or "-",
            ",".join(m.current) or "(none)" if m else "?",
            ",".join(m.heads) or "-" if m else "?",
            str(len(m.pending)) if m and not m.unknown else ("?" if m is None else "unknown"),
            "?" if u.schema_drift is None else str(len(u.schema_drift)),
            "yes" if u.needs_restart else "no",
            "cannot inspect" if not_inspectable(u) else
            ("problems" if u.has_problems else "ok")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for row in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() + "\n")
    for u in units:
        for check in u.checks:
            if not check.success:
                out.write(f"{u.unit}: could not run check {check.name}: {check.error}\n")
        for finding in u.findings:
            out.write(f"{u.unit}: {SEVERITY_MARK[finding.severity]} [{finding.severity}] "
                      f"{finding.check}: {finding.message}\n")
            if finding.remedy:
                out.write(f"    fix: {finding.remedy}\n")


# -- status -------------------------------------------------------------------------------

def cmd_status(args: argparse.Namespace, systemd: SystemdSource, out: TextIO) -> int:
    """agentctl status [UNIT]: the agent's snapshot, or a local check when none answers."""
    data, source = status_data(args, systemd)
    units = data.get("units") or []
    if not units and data.get("errors"):
        raise DriftwatchError("; ".join(data["errors"]))
    if args.json:
        json.dump({**data, "source": source}, out, indent=2, sort_keys=True)
        out.write("\n")
    else:
        render_status(data, source, out, now=time.time())
    return exit_code_of_dicts(units)


def status_address(args: argparse.Namespace) -> tuple[str, int]:
    """The client address of the agent, from the flag or the config file."""
    from agent.statusclient import client_address

    listen = args.listen_address
    if not listen:
        from agent.config import load_config
        listen = load_config(args.config_file).listen_address
    try:
        return client_address(listen)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def status_data(args: argparse.Namespace, systemd: SystemdSource,
                ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(snapshot as JSON-ready dict, where it came from)."""
    from agent.server import mask_strings
    from agent.statusclient import display_address, fetch_status

    reason = "--local given"
    address = ""
    if not args.local:
        host, port = status_address(args)
        address = display_address(host, port)
        reply = fetch_status(host, port, args.unit, timeout=args.timeout)
        if reply.ok:
            return reply.data, {"kind": "agent", "address": reply.address}
        reason = reply.reason
    snapshot = local_snapshot(args, systemd, [args.unit] if args.unit else None)
    # The snapshot holds no secrets; masking anyway keeps /status and status alike.
    return mask_strings(snapshot.as_dict()), {"kind": "local", "address": address,
                                              "reason": reason}


def format_age(seconds: float) -> str:
    """A short human age: '4s', '2m 5s', '3h 10m', '2d 4h'."""
    s = max(0, int(seconds))
    for size, unit, sub_size, sub_unit in ((86400, "d", 3600, "h"), (3600, "h", 60, "m"),
                                           (60, "m", 1, "s")):
        if s >= size:
            rest = (s % size) // sub_size
            return f"{s // size}{unit}" + (f" {rest}{sub_unit}" if rest else "")
    return f"{s}s"


def _checks_failed(unit: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in unit.get("checks") or [] if not c.get("success")]


def exit_code_of_dicts(units: Sequence[dict[str, Any]]) -> int:
    """exit_code() for snapshot dicts (as /status serves them)."""
    if any(c.get("name") in ("unit", "app_load", "database", "migrations")
           for u in units for c in _checks_failed(u)):
        return EXIT_ERROR
    if any(f.get("severity") in ("critical", "warning") for u in units
           for f in u.get("findings") or []):
        return EXIT_PROBLEMS
    return EXIT_OK


def unit_state_word(unit: dict[str, Any]) -> str:
    """'ok', 'problems' or 'cannot inspect', as in the check table."""
    code = exit_code_of_dicts([unit])
    return {EXIT_OK: "ok", EXIT_PROBLEMS: "problems", EXIT_ERROR: "cannot inspect"}[code]


def status_rows(unit: dict[str, Any], now: float) -> list[tuple[str, str]]:
    """Label/value rows of one unit: revisions, drift, venv, environment, database, age."""
    rows: list[tuple[str, str]] = []
    state = unit.get("active_state") or ("?" if not unit.get("unit_up") else "active")
    if unit.get("main_pid"):
        state += f" (MainPID {unit['main_pid']}"
        if unit.get("started_at"):
            state += f", up {format_age(now - unit['started_at'])}"
        state += ")"
    rows.append(("state", state))
    m = unit.get("migrations")
    if m is None:
        rows.append(("revision", "unknown"))
    else:
        current = ", ".join(m["current"]) or "(none)"
        heads = ", ".join(m["heads"]) or "(none)"
        if m.get("in_progress"):
            pend = "a migration is running now"
        elif m.get("unknown"):
            pend = f"unknown to the code: {', '.join(m['unknown'])}"
        elif m["pending"]:
            pend = f"{len(m['pending'])} pending ({', '.join(m['pending'])})"
        else:
            pend = "up to date"
        extra = " [multiple heads]" if m.get("multiple_heads") else ""
        table = "" if m.get("version_table_present", True) else " [no alembic_version table]"
        rows.append(("revision", f"{current}, head {heads}: {pend}{extra}{table}"))
    drift = unit.get("schema_drift")
    if drift is None:
        rows.append(("drift", "not compared"))
    elif not drift:
        rows.append(("drift", "none (schema matches the models)"))
    else:
        names = ", ".join(describe_drift(d) for d in drift[:3])
        rows.append(("drift", f"{len(drift)} difference(s): {names}"
                              + (", ..." if len(drift) > 3 else "")))
    venv = unit.get("venv") or "none found"
    rows.append(("venv", venv + (" (the running processes use another)"
                                 if unit.get("venv_mismatch") else "")))
    stale = unit.get("stale_environment_variables") or 0
    env = (f"{stale} variable(s) changed since the processes started" if stale
           else "as the running processes have it")
    if unit.get("needs_daemon_reload"):
        env += "; unit file changed on disk (daemon-reload needed)"
    if unit.get("needs_restart"):
        env += "; restart needed"
    rows.append(("environment", env))
    db = unit.get("database") or "unknown"
    up = unit.get("db_up")
    db += "" if up is None else (", reachable" if up else ", UNREACHABLE")
    if unit.get("database_mismatch"):
        db += f"; workers connected elsewhere: {unit.get('database_connections', '')}"
    rows.append(("database", db))
    if unit.get("timestamp"):
        rows.append(("last check", f"{format_age(now - unit['timestamp'])} ago"))
    return rows


def render_status(data: dict[str, Any], source: dict[str, Any], out: TextIO,
                  now: float) -> None:
    """systemctl-status-like blocks, one per unit, each finding with its remedy."""
    if source["kind"] == "agent":
        agent = data.get("agent") or {}
        version = f" {agent['version']}" if agent.get("version") else ""
        taken = (f", snapshot taken {format_age(now - data['taken_at'])} ago"
                 if data.get("taken_at") else "")
        out.write(f"from the driftwatch agent{version} on {source['address']}{taken}\n")
    else:
        out.write(f"{source['reason']}; checked locally\n")
    for error in data.get("errors") or []:
        out.write(f"error: {error}\n")
    for unit in data.get("units") or []:
        mark = {"ok": "●", "problems": "✗", "cannot inspect": "?"}[unit_state_word(unit)]
        out.write(f"{mark} {unit['unit']} - {unit_state_word(unit)}\n")
        for label, value in status_rows(unit, now):
            out.write(f"  {label:>11}: {value}\n")
        for check in _checks_failed(unit):
            out.write(f"  {'':>11}  could not run check {check['name']}: {check['error']}\n")
        findings = unit.get("findings") or []
        out.write(f"  {'findings':>11}: {'none' if not findings else len(findings)}\n")
        for f in findings:
            out.write(f"    {SEVERITY_MARK.get(f['severity'], '?')} [{f['severity']}] "
                      f"{f['check']}: {f['message']}\n")
            if f.get("remedy"):
                out.write(f"        fix: {f['remedy']}\n")


# -- exec and upgrade -------------------------------------------------------------------

def cmd_exec(args: argparse.Namespace, systemd: SystemdSource, out: TextIO) -> int:
    """agentctl exec UNIT -- CMD...: replaces agentctl by CMD in the unit's context."""
    from agent.unitexec import EXIT_EXEC_FAILED, ExecError, exec_replace, plan_exec

    try:
        ctx = inspect_unit(systemd, args.unit).context
        plan = plan_exec(ctx, args.cmd, os.geteuid())
        systemd.close()  # nothing of agentctl's may leak into the command
        out.flush()
        sys.stderr.flush()
        exec_replace(plan)
    except DriftwatchError as exc:
        # Our own failures use 125-127 so they cannot be mistaken for CMD's exit codes.
        if not isinstance(exc, ExecError):
            exc.exit_code = EXIT_EXEC_FAILED
        raise


def cmd_upgrade(args: argparse.Namespace, systemd: SystemdSource, out: TextIO) -> int:
    """agentctl upgrade UNIT [--restart] [--yes]."""
    from agent.upgrade import Upgrader, UpgradeOptions, unit_snapshot

    inspector = make_inspector(args, systemd)

    def inspect(name: str) -> UnitSnapshot:
        inspector.invalidate(name)  # after an upgrade the memoised schema diff is stale
        return unit_snapshot(inspector.inspect([name]).units, name)

    options = UpgradeOptions(unit=args.unit, restart=args.restart, assume_yes=args.yes,
                             restart_timeout=args.restart_timeout)
    confirm = ask_on_terminal if sys.stdin.isatty() else None
    try:
        return Upgrader(options, systemd, inspect, confirm, out, os.geteuid()).run()
    finally:
        inspector.close()


def ask_on_terminal(prompt: str) -> bool:
    """y/yes on the terminal means yes; anything else, or end of input, means no."""
    try:
        return input(prompt).strip().lower() in ("y", "yes")
    except EOFError:
        return False


COMMANDS = {"env": cmd_env, "context": cmd_context, "check": cmd_check, "status": cmd_status,
            "exec": cmd_exec, "upgrade": cmd_upgrade}


def main(argv: Sequence[str] | None = None, out: TextIO | None = None,
         systemd: SystemdSource | None = None) -> int:
    """Entry point of agentctl; returns the exit code."""
    out = out or sys.stdout
    args = build_parser().parse_args(argv)
    if getattr(args, "unit", None):
        args.unit = normalize_unit_name(args.unit)
    if getattr(args, "units", None):
        args.units = [normalize_unit_name(u) for u in args.units]
    systemd = systemd or SystemdSource(timeout_seconds=args.bus_timeout)
    try:
        return COMMANDS[args.command](args, systemd, out)
    except DriftwatchError as exc:
        print(f"agentctl: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        return EXIT_OK
    finally:
        systemd.close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

