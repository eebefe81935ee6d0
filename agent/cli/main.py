"""agentctl: the admin's view of what driftwatch sees."""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

from agent import __version__
from agent.config import DEFAULT_CONFIG_PATH, seconds_argument
from agent.errors import AccessDenied, ConfigError, DriftwatchError
from agent.privileged.inspection import inspect_unit
from agent.secrets import mask_url, mask_value
from agent.cli.render import (
    EXIT_ERROR,
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
from agent.privileged.sources.systemd import SystemdSource, normalize_unit_name

if TYPE_CHECKING:
    from agent.privileged.inspector import Inspector



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
    status.add_argument("--socket", dest="socket", metavar="PATH", default=None,
                        help="the agent's root-only unix socket, asked first (default "
                             "/run/driftwatch/agent.sock; '' to skip it)")
    status.add_argument("--timeout", type=float, default=6.0, metavar="SECONDS",
                        help="how long to wait for the agent (default 6: it answers within "
                             "its scrape_wait_seconds)")
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
        "upgrade", help="check, show the plan, run flask db upgrade (plain Alembic apps: "
                        "alembic upgrade) in UNIT's context, "
                        "verify the head, optionally restart (exit 0 done or nothing to do, "
                        "1 refused by the migration state, 2 could not inspect, not "
                        "confirmed or failed)")
    upgrade.add_argument("unit")
    upgrade.add_argument("rev", nargs="?", default="", metavar="REV",
                         help="the revision to upgrade to, as shown and confirmed (default: "
                              "the one head shown); refused if it is not pending")
    upgrade.add_argument("--restart", action="store_true",
                         help="restart the unit afterwards (only once the head is verified)")
    upgrade.add_argument("--yes", "-y", action="store_true",
                         help="do not ask for confirmation (needed without a terminal)")
    upgrade.add_argument("--restart-timeout", type=float, default=60.0, metavar="SECONDS",
                         help="how long the restarted unit may take to be active (default 60)")
    upgrade.add_argument("--lock-timeout", type=positive_seconds, default=None,
                         metavar="SECONDS", help="lock_timeout of the migration's database "
                                                 "sessions (default: upgrade_lock_timeout_"
                                                 "seconds of the config file, else 5)")
    upgrade.add_argument("--lock-retries", type=int, choices=range(0, 101), default=None,
                         metavar="N", help="attempts after one gave up waiting for a lock "
                                           "(default: upgrade_lock_retries, else 3; at most "
                                           "100)")
    upgrade.add_argument("--timeout", type=positive_seconds, default=None, metavar="SECONDS",
                         help="stop the upgrade command after this long (default: "
                              "upgrade_timeout_seconds, else 600)")
    upgrade.add_argument("--config.file", dest="config_file", metavar="PATH", default=None,
                         help=f"the agent's config file (default {DEFAULT_CONFIG_PATH})")
    upgrade.add_argument("--accept-risk", action="store_true",
                         help="upgrade even when the preflight rates a revision critical")
    add_inspection_options(upgrade)

    plan = sub.add_parser(
        "plan", help="before the upgrade: what each pending migration will lock, for how "
                     "long, and what it breaks (PostgreSQL; exit 0 low or nothing pending, "
                     "1 a high or critical revision, 2 could not plan)")
    plan.add_argument("unit")
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    add_inspection_options(plan)
    return parser


def positive_seconds(text: str) -> float:
    """A finite number of seconds above 0 (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds above 0: {text}")
    return value


def add_inspection_options(parser: argparse.ArgumentParser) -> None:
    """The options of a local inspection run (check, status without agent, upgrade)."""
    parser.add_argument("--probe-timeout", type=seconds_argument, default=20.0, metavar="SECONDS",
                        help="how long the app may take to load (default 20)")
    parser.add_argument("--db-timeout", type=seconds_argument, default=5.0, metavar="SECONDS",
                        help="database connect/statement timeout (default 5)")
    parser.add_argument("--state-dir", default="/var/lib/driftwatch", metavar="DIR",
                        help="where applied-migration hashes are remembered")
    parser.add_argument("--probe-user", default="", metavar="USER",
                        help="units without User=: probe as this user (default: a systemd "
                             "dynamic user)")


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
                   "environment_files": [f.as_dict() for f in ctx.environment_files],
                   "unset_environment": list(ctx.unset_variables)},
                  out, indent=2)
        out.write("\n")
        return EXIT_OK
    note = "secrets revealed" if args.reveal else "secrets masked; --reveal (root) shows them"
    out.write(f"# {ctx.unit}: environment of a new process, in systemd's order ({note})\n")
    for state in ctx.environment_files:
        status = "present" if state.exists else (state.error or "missing")
        out.write(escape_terminal(f"# EnvironmentFile={'-' if state.optional else ''}"
                                  f"{state.path} ({status})") + "\n")
    if ctx.unset_variables:
        out.write(escape_terminal(f"# UnsetEnvironment={' '.join(ctx.unset_variables)} "
                                  "(removed last)") + "\n")
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
    from agent.privileged.inspector import Inspector, InspectorSettings

    settings = InspectorSettings(probe_timeout_seconds=args.probe_timeout,
                                 db_timeout_seconds=args.db_timeout,
                                 state_path=f"{args.state_dir.rstrip('/')}/state.db",
                                 bus_timeout_seconds=args.bus_timeout,
                                 probe_user=getattr(args, "probe_user", ""))
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
    from agent.cli.statusclient import client_address

    listen = args.listen_address
    if not listen:
        from agent.config import load_config
        listen = load_config(args.config_file).listen_address
    try:
        return client_address(listen)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def agent_reply(args: argparse.Namespace) -> tuple[Any, str]:
    """(AgentReply or None, why none): the root-only unix socket first; TCP only when the
    socket cannot be used, said so, and never from a listener that is not root's."""
    from agent.cli.statusclient import (
        DEFAULT_SOCKET,
        display_address,
        fetch_status,
        fetch_status_unix,
        untrusted_listener,
    )

    path = DEFAULT_SOCKET if args.socket is None else args.socket
    socket_note = "no unix socket asked"
    if path:
        reply, socket_note = fetch_status_unix(path, args.unit, timeout=args.timeout)
        if reply is not None:
            return reply, ""
    host, port = status_address(args)
    stranger = untrusted_listener(host, port)
    if stranger:
        return None, stranger
    reply = fetch_status(host, port, args.unit, timeout=args.timeout)
    tcp = f"{display_address(host, port)} over TCP ({socket_note}"
    tcp += "; detail redacted: run as root for it)" if reply.data.get("redacted") else ")"
    return AgentReplyView(reply, tcp), ""


class AgentReplyView:
    """An AgentReply with the address shown as it was reached."""

    def __init__(self, reply: Any, address: str) -> None:
        self.ok, self.data, self.reason = reply.ok, reply.data, reply.reason
        self.address = address if reply.ok else reply.address


def status_data(args: argparse.Namespace, systemd: SystemdSource,
                ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(snapshot as JSON-ready dict, where it came from)."""
    from agent.daemon.server import mask_strings

    reason = "--local given"
    address = ""
    if not args.local:
        reply, reason = agent_reply(args)
        if reply is not None and reply.ok:
            return reply.data, {"kind": "agent", "address": reply.address}
        if reply is not None:
            reason, address = reply.reason, reply.address
    snapshot = local_snapshot(args, systemd, [args.unit] if args.unit else None)
    # The snapshot holds no secrets; masking anyway keeps /status and status alike.
    return mask_strings(snapshot.as_dict()), {"kind": "local", "address": address,
                                              "reason": reason}


# -- exec and upgrade -------------------------------------------------------------------

def cmd_exec(args: argparse.Namespace, systemd: SystemdSource, out: TextIO) -> int:
    """agentctl exec UNIT -- CMD...: CMD in the unit's context, in its own session, scope and
    (when interactive) pseudo-terminal relayed by agentctl; exits with CMD's exit code."""
    from agent.cli.unitexec import EXIT_EXEC_FAILED, ExecError, plan_exec, run_exec

    try:
        ctx = inspect_unit(systemd, args.unit).context
        plan = plan_exec(ctx, args.cmd, os.geteuid())
        out.flush()
        sys.stderr.flush()
        done = run_exec(plan, systemd)
    except DriftwatchError as exc:
        # Our own failures use 125-127 so they cannot be mistaken for CMD's exit codes.
        if not isinstance(exc, ExecError):
            exc.exit_code = EXIT_EXEC_FAILED
        raise
    if done.leftovers:
        print(f"agentctl: stopped {done.leftovers} process(es) the command left behind",
              file=sys.stderr)
    return done.returncode


def cmd_upgrade(args: argparse.Namespace, systemd: SystemdSource, out: TextIO) -> int:
    """agentctl upgrade UNIT [--restart] [--yes]."""
    from agent.config import load_config
    from agent.cli.unitexec import default_resolver
    from agent.cli.upgrade import Upgrader, UpgradeOptions, unit_snapshot

    config = load_config(args.config_file)  # the upgrade_* keys; flags win over them
    inspector = make_inspector(args, systemd)

    def inspect(name: str) -> UnitSnapshot:
        inspector.invalidate(name)  # after an upgrade the memoised schema diff is stale
        return unit_snapshot(inspector.inspect([name]).units, name)

    from agent.preflight.command import upgrade_preflight

    inspector.preflight = None  # the Upgrader runs it once, before asking
    options = UpgradeOptions(
        unit=args.unit, restart=args.restart, assume_yes=args.yes,
        restart_timeout=args.restart_timeout, target=args.rev,
        lock_timeout=pick(args.lock_timeout, config.upgrade_lock_timeout_seconds),
        lock_retries=pick(args.lock_retries, config.upgrade_lock_retries),
        timeout=pick(args.timeout, config.upgrade_timeout_seconds),
        accept_risk=args.accept_risk)
    confirm = ask_on_terminal if sys.stdin.isatty() else None
    try:
        return Upgrader(options, systemd, inspect, confirm, out, os.geteuid(),
                        resolve=default_resolver(args.probe_timeout),
                        preflight=upgrade_preflight(systemd, args.probe_timeout)).run()
    finally:
        inspector.close()


def cmd_plan(args: argparse.Namespace, systemd: SystemdSource, out: TextIO) -> int:
    """agentctl plan UNIT [--json]: the migration preflight (agent/preflight/)."""
    from agent.preflight.command import plan_unit, write_plan
    from agent.cli.upgrade import unit_snapshot

    inspector = make_inspector(args, systemd)
    inspector.preflight = None  # rendered once, below, not also inside the inspection
    try:
        snapshot = unit_snapshot(inspector.inspect([args.unit]).units, args.unit)
        return write_plan(plan_unit(snapshot, systemd, args.probe_timeout), args.json, out)
    finally:
        inspector.close()


def pick(flag: Any, configured: Any) -> Any:
    """The command-line value when given, else the config file's."""
    return configured if flag is None else flag


def ask_on_terminal(prompt: str) -> bool:
    """y/yes on the terminal means yes; anything else, or end of input, means no."""
    try:
        return input(prompt).strip().lower() in ("y", "yes")
    except EOFError:
        return False


COMMANDS = {"env": cmd_env, "context": cmd_context, "check": cmd_check, "status": cmd_status,
            "exec": cmd_exec, "upgrade": cmd_upgrade, "plan": cmd_plan}


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
    saved = _unwind_on_termination()
    try:
        return COMMANDS[args.command](args, systemd, out)
    except DriftwatchError as exc:
        print(f"agentctl: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        return EXIT_OK
    except Exception as exc:  # never a traceback: one line, and the "cannot inspect" code
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        print(f"agentctl: internal error: {mask_url(reason)}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        systemd.close()
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def _unwind_on_termination() -> dict[int, Any]:
    """SIGTERM and SIGHUP unwind agentctl like an exception (exit 128+N), so the finally
    blocks run: the probe's process group is killed, not left running. Returns the handlers
    it replaced (none outside the main thread, where signals cannot be handled)."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def unwind(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    return {signum: signal.signal(signum, unwind) for signum in (signal.SIGTERM,
                                                                 signal.SIGHUP)}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

