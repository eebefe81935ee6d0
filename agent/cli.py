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
from agent.config import DEFAULT_CONFIG_PATH, seconds_argument
from agent.errors import AccessDenied, ConfigError, DriftwatchError
from agent.inspection import inspect_unit
from agent.secrets import mask_value
from agent.render import (
    EXIT_OK,
    EXIT_PROBLEMS,
    SEVERITY_MARK,
    check_json,
    escape_terminal,
    exit_code,
    exit_code_of_dicts,
    has_problems,
    render_check,
    render_context,
    render_status,
)
from agent.snapshot import Snapshot, UnitSnapshot
from agent.sources.systemd import SystemdSource, normalize_unit_name

if TYPE_CHECKING:
    from agent.inspector import Inspector



def build_parser() -> argparse.ArgumentParser:
    """The agentctl command line."""
    parser = argparse.ArgumentParser(
        prog="agentctl",
        description="Inspect gunicorn units the way the 'migrations not applied' runbook does.")
    parser.add_argument("--version", action="version", version=f"agentctl {__version__}")
    parser.add_argument("--bus-timeout", type=seconds_argument, default=5.0, metavar="SECONDS",
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
    parser.add_argument("--probe-timeout", type=seconds_argument, default=20.0, metavar="SECONDS",
                        help="how long the app may take to load (default 20)")
    parser.add_argument("--db-timeout", type=seconds_argument, default=5.0, metavar="SECONDS",
                        help="database connect/statement timeout (default 5)")
    parser.add_argument("--state-dir", default="/var/lib/driftwatch", metavar="DIR",
                        help="where applied-migration hashes are remembered")


def cmd_env(args: argparse.Namespace, systemd: SystemdSource, out: TextIO) -> int:
    """agentctl env UNIT."""
    if args.reveal and os.geteuid() != 0:
        raise AccessDenied("--reveal shows secrets and is for root only")
    report = inspect_unit(systemd, args.unit)
    ctx = report.context
    unreadable = [f.path for f in ctx.environment_files if f.error == "permission denied"]
    if unreadable:
        # Without them the answer would be wrong, not just incomplete.
        raise AccessDenied(f"cannot read {', '.join(unreadable)}: permission denied "
                           "(run agentctl as root)")
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
        out.write(escape_terminal(f"# EnvironmentFile={'-' if state.optional else ''}"
                                  f"{state.path} ({status})") + "\n")
    width = max((len(escape_terminal(f"{n}={shlex.quote(v)}")) for n, v in shown.items()),
                default=0)
    for name, value in shown.items():
        # Values come from files the app's user may write: never raw control characters.
        line = escape_terminal(f"{name}={shlex.quote(value)}")
        source = escape_terminal(ctx.environment_sources.get(name, ""))
        out.write(f"{line:<{min(width, 70)}}  # {source}\n")
    for finding in report.findings:
        if finding.check.startswith("env_file"):
            out.write(f"# {SEVERITY_MARK[finding.severity]} {escape_terminal(finding.message)}\n")
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
    from agent.unitexec import default_resolver
    from agent.upgrade import Upgrader, UpgradeOptions, unit_snapshot

    inspector = make_inspector(args, systemd)

    def inspect(name: str) -> UnitSnapshot:
        inspector.invalidate(name)  # after an upgrade the memoised schema diff is stale
        return unit_snapshot(inspector.inspect([name]).units, name)

    options = UpgradeOptions(unit=args.unit, restart=args.restart, assume_yes=args.yes,
                             restart_timeout=args.restart_timeout)
    confirm = ask_on_terminal if sys.stdin.isatty() else None
    try:
        return Upgrader(options, systemd, inspect, confirm, out, os.geteuid(),
                        resolve=default_resolver(args.probe_timeout)).run()
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

