"""agentctl: the admin's view of what driftwatch sees."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from typing import TextIO

from agent import __version__
from agent.errors import AccessDenied, DriftwatchError
from agent.inspection import UnitReport, inspect_unit
from agent.secrets import mask_value
from agent.snapshot import UnitSnapshot
from agent.sources.systemd import SystemdSource, normalize_unit_name

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
    check.add_argument("--probe-timeout", type=float, default=20.0, metavar="SECONDS",
                       help="how long the app may take to load (default 20)")
    check.add_argument("--db-timeout", type=float, default=5.0, metavar="SECONDS",
                       help="database connect/statement timeout (default 5)")
    check.add_argument("--state-dir", default="/var/lib/driftwatch", metavar="DIR",
                       help="where applied-migration hashes are remembered")
    return parser


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


def cmd_check(args: argparse.Namespace, systemd: SystemdSource, out: TextIO) -> int:
    """agentctl check [UNIT...]."""
    from agent.inspector import Inspector, InspectorSettings

    settings = InspectorSettings(probe_timeout_seconds=args.probe_timeout,
                                 db_timeout_seconds=args.db_timeout,
                                 state_path=f"{args.state_dir.rstrip('/')}/state.db",
                                 bus_timeout_seconds=args.bus_timeout)
    inspector = Inspector(settings, systemd=systemd)
    try:
        snapshot = inspector.inspect(args.units or None)
    finally:
        inspector.close()
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


COMMANDS = {"env": cmd_env, "context": cmd_context, "check": cmd_check}


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

