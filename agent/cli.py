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


COMMANDS = {"env": cmd_env, "context": cmd_context}


def main(argv: Sequence[str] | None = None, out: TextIO | None = None,
         systemd: SystemdSource | None = None) -> int:
    """Entry point of agentctl; returns the exit code."""
    out = out or sys.stdout
    args = build_parser().parse_args(argv)
    if getattr(args, "unit", None):
        args.unit = normalize_unit_name(args.unit)
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

