"""Pure: findings on a unit against its running processes (the runbook's "restart after")."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from agent.checks.commands import alembic_cli
from agent.context import AppContext
from agent.model import Finding, ProcessInfo, UnitProperties

# Variables systemd or the kernel adds to every service; never "stale".
SYSTEMD_ADDED = {
    "PATH", "LANG", "LANGUAGE", "HOME", "LOGNAME", "USER", "SHELL", "INVOCATION_ID",
    "JOURNAL_STREAM", "SYSTEMD_EXEC_PID", "NOTIFY_SOCKET", "WATCHDOG_PID", "WATCHDOG_USEC",
    "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "MAINPID", "MANAGERPID", "TERM",
    "RUNTIME_DIRECTORY", "STATE_DIRECTORY", "CACHE_DIRECTORY", "LOGS_DIRECTORY",
    "CONFIGURATION_DIRECTORY", "CREDENTIALS_DIRECTORY", "MONITOR_SERVICE_RESULT",
    "MONITOR_EXIT_CODE", "MONITOR_EXIT_STATUS", "MONITOR_INVOCATION_ID", "MONITOR_UNIT",
    "TRIGGER_UNIT", "TRIGGER_PATH", "TRIGGER_TIMER_REALTIME_USEC",
    "TRIGGER_TIMER_MONOTONIC_USEC", "PIDFILE", "SERVICE_RESULT", "EXIT_CODE", "EXIT_STATUS",
}

# Variables a shell wrapper (sh -c '. venv/bin/activate && exec gunicorn ...') adds on its own.
SHELL_ADDED = {"PWD", "OLDPWD", "SHLVL", "_", "PS1", "VIRTUAL_ENV", "VIRTUAL_ENV_PROMPT",
               "_OLD_VIRTUAL_PATH", "_OLD_VIRTUAL_PS1", "_OLD_VIRTUAL_PYTHONHOME"}


@dataclass(frozen=True)
class UnitFacts:
    """Filesystem facts about the unit gathered at the edge, for the pure checks."""

    # path -> its realpath now (working directory, venvs, process cwds).
    realpaths: Mapping[str, str] = field(default_factory=dict)
    # The newest code or migration file under the app directory and its mtime.
    newest_code: tuple[str, float] | None = None
    now: float = field(default_factory=time.time)
    # path -> whether it exists: ExecStart programs and their '#!' interpreters.
    exists: Mapping[str, bool] = field(default_factory=dict)
    # NRestarts seen by the previous inspection of this unit (None: first look).
    previous_restarts: int | None = None


# A first look (a one-shot agentctl run, or the daemon's first inspection: no NRestarts
# remembered) at a unit that is up between two automatic restarts: a loop when systemd
# restarted it at least LOOP_RESTARTS times since it was last started by hand (a start or
# restart by hand sets NRestarts to 0) and the current start is younger than a few
# RestartSec, bounded below by the app's own start-up time and above so a slow loop's long
# quiet run is not taken for one. A unit that crashed long ago is up longer than that.
LOOP_RESTARTS = 3
LOOP_WINDOW_RESTARTS = 3
LOOP_WINDOW_MIN = 10.0
LOOP_WINDOW_MAX = 60.0
UP_STATES = ("active", "activating", "reloading")


def loop_window(restart_sec: float) -> float:
    """Seconds since the current start within which restarts still count as a loop."""
    return min(max(LOOP_WINDOW_RESTARTS * restart_sec, LOOP_WINDOW_MIN), LOOP_WINDOW_MAX)


def _up_between_restarts(props: UnitProperties, now: float | None) -> float | None:
    """Seconds the unit has been up since its latest automatic restart, when that looks like
    a pause in a loop (see LOOP_RESTARTS), else None."""
    started = props.exec_main_start_timestamp
    if (now is None or started is None or props.n_restarts < LOOP_RESTARTS
            or props.active_state not in UP_STATES):
        return None
    age = now - started
    # A clock stepped back makes the start look in the future: not evidence of a loop.
    return age if -1.0 <= age < loop_window(props.restart_sec) else None


def _crash_loop(props: UnitProperties, previous_restarts: int | None,
                now: float | None = None) -> Finding | None:
    """systemd restarting the unit again and again: in the auto-restart pause, given up
    (start-limit-hit), NRestarts risen since the last inspection, or (at a first look) up
    only briefly after many automatic restarts."""
    up = _up_between_restarts(props, now) if previous_restarts is None else None
    if props.sub_state == "auto-restart":
        what = (f"its main process exited ({props.result or 'unknown'}) and systemd restarts it "
                f"again and again ({props.n_restarts} automatic restart(s) so far)")
    elif props.active_state == "failed" and props.result == "start-limit-hit":
        what = (f"systemd gave up after {props.n_restarts} automatic restart(s) "
                "(start-limit-hit)")
    elif previous_restarts is not None and props.n_restarts > previous_restarts:
        what = (f"it restarted {props.n_restarts - previous_restarts} time(s) since the last "
                f"inspection ({props.n_restarts} in all)")
    elif up is not None:
        what = (f"systemd restarted it {props.n_restarts} time(s) since it was last started by "
                f"hand, the latest {max(0, int(up))}s ago (up between two restarts)")
    else:
        return None
    return Finding(
        "unit_crash_loop", "critical", f"{props.name} is crash-looping: {what}",
        f"journalctl -u {props.name} -n 100 (the same error on every start); fix the cause, "
        f"then systemctl restart {props.name}")


def check_exec_start(props: UnitProperties, ctx: AppContext, facts: UnitFacts) -> list[Finding]:
    """An ExecStart program (or the '#!' interpreter of a script) that does not exist: the
    next start fails with 203/EXEC; said as such, not as an unknown interpreter."""
    findings = []
    for command in props.exec_start:
        if facts.exists.get(command.path) is False:
            findings.append(Finding(
                "exec_start_missing", "critical",
                f"ExecStart program {command.path} of {props.name} does not exist: the unit "
                "cannot start (status=203/EXEC)",
                f"restore {command.path} (was the virtualenv rebuilt or removed?) or fix "
                f"ExecStart= of {props.name}"))
    program, interpreter = ctx.launch.program, ctx.python
    if (not findings and interpreter and facts.exists.get(program) is not False
            and facts.exists.get(interpreter) is False):
        findings.append(Finding(
            "exec_start_missing", "critical",
            f"the Python interpreter {interpreter} of {program} ({props.name}'s ExecStart) "
            "does not exist (a dangling venv link?): the unit cannot start (status=203/EXEC)",
            f"recreate the virtualenv of {program} or fix ExecStart= of {props.name}"))
    return findings


def check_unit_state(props: UnitProperties, previous_restarts: int | None = None,
                     now: float | None = None) -> list[Finding]:
    """Crash-looping, not active, failed, or needing a daemon-reload."""
    findings = []
    loop = _crash_loop(props, previous_restarts, now)
    if loop is not None:
        findings.append(loop)
    elif props.active_state == "failed":
        findings.append(Finding(
            "unit_failed", "critical",
            f"{props.name} has failed (result: {props.result or 'unknown'})",
            f"journalctl -u {props.name} -n 100; fix the cause, then systemctl restart "
            f"{props.name}"))
    elif props.active_state not in ("active", "reloading"):
        findings.append(Finding(
            "unit_not_active", "critical",
            f"{props.name} is {props.active_state} ({props.sub_state})",
            f"systemctl start {props.name}"))
    if props.need_daemon_reload:
        findings.append(Finding(
            "needs_daemon_reload", "warning",
            f"the unit file of {props.name} changed on disk but systemd has not reloaded it; "
            "what runs and what the file says differ",
            f"systemctl daemon-reload && systemctl restart {props.name}"))
    return findings


def check_environment_files(ctx: AppContext) -> list[Finding]:
    """A missing required EnvironmentFile= stops the next start; malformed lines are ignored."""
    findings = []
    for state in ctx.environment_files:
        if not state.exists and not state.optional:
            findings.append(Finding(
                "env_file_missing", "critical",
                f"EnvironmentFile {state.path} is required but {state.error or 'missing'}: "
                f"the next start of {ctx.unit} will fail",
                f"restore {state.path} or mark it optional with a '-' prefix"))
        elif state.error.startswith("invalid:"):
            findings.append(Finding(
                "env_file_invalid", "warning" if state.optional else "critical",
                f"EnvironmentFile {state.path} is {state.error}"
                + (" (skipped as a whole, it is optional)" if state.optional
                   else f": the next start of {ctx.unit} will fail"),
                f"fix {state.path}"))
        elif state.error and state.exists:
            findings.append(Finding(
                "env_file_unreadable", "critical",
                f"EnvironmentFile {state.path} cannot be read: {state.error}",
                f"check the permissions of {state.path}"))
        for warning in state.warnings:
            findings.append(Finding(
                "env_file_malformed", "warning",
                f"{state.path}: {warning} (systemd ignores that line)",
                f"fix the line in {state.path}"))
    return findings


def ignored_variables(ctx: AppContext) -> frozenset[str]:
    """Variables the launch itself adds or rewrites, which are never stale."""
    return frozenset(SHELL_ADDED) if ctx.launch.shell_wrapped else frozenset()


def stale_variables(unit_env: Mapping[str, str], process_env: Mapping[str, str],
                    ignore: frozenset[str] = frozenset(),
                    ) -> tuple[list[str], list[str], list[str]]:
    """(changed, added to the unit, removed from the unit) variable names, sorted."""
    changed = sorted(n for n in unit_env if n in process_env and process_env[n] != unit_env[n]
                     and n not in ignore)
    added = sorted(n for n in unit_env if n not in process_env and n not in ignore)
    removed = sorted(n for n in process_env
                     if n not in unit_env and n not in SYSTEMD_ADDED and n not in ignore
                     and not n.startswith("LC_"))
    return changed, added, removed


def check_environment_drift(ctx: AppContext, procs: Sequence[ProcessInfo]) -> list[Finding]:
    """The running master's environment against the one a new process would get (names only)."""
    master = _master(procs)
    if master is None or master.environ is None:
        return []
    changed, added, removed = stale_variables(ctx.environment, master.environ,
                                              ignored_variables(ctx))
    if not (changed or added or removed):
        return []
    parts = []
    if changed:
        parts.append(f"changed: {', '.join(changed)}")
    if added:
        parts.append(f"new in the unit: {', '.join(added)}")
    if removed:
        parts.append(f"gone from the unit: {', '.join(removed)}")
    return [Finding(
        "environment_stale", "warning",
        f"the running processes of {ctx.unit} have an old environment ({'; '.join(parts)})",
        f"systemctl restart {ctx.unit}")]


def check_interpreter(ctx: AppContext, procs: Sequence[ProcessInfo],
                      facts: UnitFacts) -> list[Finding]:
    """The venv the unit declares against the one every running process really uses."""
    if not ctx.venv:
        return []
    declared = facts.realpaths.get(ctx.venv, ctx.venv)
    wrong = []
    for proc in procs:
        if not proc.venv:
            continue
        running = facts.realpaths.get(proc.venv, proc.venv)
        if running != declared:
            wrong.append(f"{proc.role} {proc.pid} uses {proc.venv}")
    if not wrong:
        return []
    return [Finding(
        "venv_mismatch", "critical",
        f"{ctx.unit} declares virtualenv {ctx.venv} but " + "; ".join(wrong),
        f"systemctl restart {ctx.unit} (ExecStart changed since the processes started), or fix "
        "ExecStart to the intended venv")]


def check_working_directory(ctx: AppContext, procs: Sequence[ProcessInfo],
                            facts: UnitFacts) -> list[Finding]:
    """Process cwd against today's realpath of the app directory (a switched 'current' link)."""
    expected_dir = ctx.app_directory
    if not expected_dir:
        return []
    expected = facts.realpaths.get(expected_dir, expected_dir)
    stale = [p for p in procs if p.cwd and p.cwd != expected
             and facts.realpaths.get(p.cwd, p.cwd) != expected]
    if not stale:
        return []
    cwds = sorted({p.cwd for p in stale})
    return [Finding(
        "cwd_stale", "warning",
        f"{len(stale)} process(es) of {ctx.unit} run in {', '.join(cwds)} but "
        f"{expected_dir} now resolves to {expected} (a release symlink switched?)",
        f"systemctl restart {ctx.unit}")]


def check_code_newer(ctx: AppContext, procs: Sequence[ProcessInfo],
                     props: UnitProperties, facts: UnitFacts,
                     plain_alembic: bool = False) -> list[Finding]:
    """The main process started before the newest change to the app's code or migrations."""
    master = _master(procs)
    started = (master.create_time if master and master.create_time
               else props.exec_main_start_timestamp)
    if not started or facts.newest_code is None:
        return []
    path, mtime = facts.newest_code
    # One second of slack: create_time and mtimes come from different clocks' rounding.
    if mtime <= started + 1.0:
        return []
    return [Finding(
        "code_newer_than_process", "warning",
        f"{path} changed {_ago(facts.now - mtime)} ago, after {ctx.unit} started "
        f"{_ago(facts.now - started)} ago: the workers run old code",
        f"systemctl restart {ctx.unit} (after {alembic_cli(plain_alembic)} upgrade if "
        "migrations changed)")]


def unit_findings(props: UnitProperties, ctx: AppContext, procs: Sequence[ProcessInfo],
                  facts: UnitFacts) -> list[Finding]:
    """Every unit-level finding, in runbook order."""
    findings = check_unit_state(props, facts.previous_restarts, facts.now)
    findings += check_exec_start(props, ctx, facts)
    findings += check_environment_files(ctx)
    if props.active_state in ("active", "reloading") and procs:
        findings += check_environment_drift(ctx, procs)
        findings += check_interpreter(ctx, procs, facts)
        findings += check_working_directory(ctx, procs, facts)
        findings += check_code_newer(ctx, procs, props, facts)
    return findings


def _master(procs: Sequence[ProcessInfo]) -> ProcessInfo | None:
    return next((p for p in procs if p.role == "master"), None)


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"
