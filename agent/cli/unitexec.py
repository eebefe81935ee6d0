"""Run a command in a unit's exact context: its user, groups, environment, app dir and venv."""

from __future__ import annotations

import os
import shutil
import signal
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.context import AppContext
from agent.errors import AccessDenied, DriftwatchError
from agent.privileged.probe_runner import (
    ProbeSetupError,
    ResolvedConfig,
    build_unit_env,
    privilege_plan,
    resolve_gunicorn_config,
    resolve_identity,
    scrub,
    secret_values,
)
from agent.cli.session import Finished, Launch, SessionError, run_interactive, run_output

# Conventions of env(1), chroot(1) and docker run: the command's own codes stay free.
EXIT_EXEC_FAILED, EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND = 125, 126, 127
# How long gunicorn's configuration may take to resolve (the probe's default timeout).
RESOLVE_TIMEOUT = 20.0
# Output without a newline is shown in pieces of this size.
MAX_LINE_BYTES = 65536

# (ctx, allow_root) -> gunicorn's resolved settings, or None when there are none to apply.
Resolver = Callable[[AppContext, bool], "ResolvedConfig | None"]


class ExecError(DriftwatchError):
    """The command could not be started in the unit's context."""

    exit_code = EXIT_EXEC_FAILED


class GunicornConfigError(ExecError):
    """The unit's gunicorn configuration (config file, GUNICORN_CMD_ARGS) failed to resolve."""


@dataclass(frozen=True)
class ExecPlan:
    """Everything needed to start one command as a new process of the unit would start."""

    unit: str
    argv: tuple[str, ...]
    cwd: str
    env: dict[str, str] = field(repr=False)
    user: str
    uid: int
    # Popen-style keyword arguments (user, group, extra_groups); {} = stay who we are.
    drop: dict[str, Any] = field(default_factory=dict)
    secrets: tuple[str, ...] = field(default=(), repr=False)
    # The app as gunicorn resolves it (positional app or wsgi_app), else ExecStart's spec.
    app_uri: str = ""
    # Where chdir/pythonpath/raw_env came from: "gunicorn config" or "ExecStart".
    config_source: str = "ExecStart"

    def scrub(self, text: str) -> str:
        """text with URL passwords and the unit's secret values masked."""
        return scrub(text, self.secrets)


def unit_environment(ctx: AppContext, identity: Any) -> dict[str, str]:
    """The unit's environment with the venv first on PATH (no probe-only read-only settings)."""
    return build_unit_env(ctx, identity)


def default_resolver(timeout: float = RESOLVE_TIMEOUT) -> Resolver:
    """gunicorn's own resolution, in a resolve-only probe child as the unit's user."""
    def resolve(ctx: AppContext, allow_root: bool) -> ResolvedConfig | None:
        return resolve_gunicorn_config(ctx, timeout, allow_root=allow_root)
    return resolve


def prepend_path(value: str, entries: Sequence[str]) -> str:
    """entries first on a colon-separated path, then value's own entries not among them."""
    rest = [p for p in value.split(":") if p and p not in entries]
    return ":".join([*dict.fromkeys(entries), *rest])


def apply_gunicorn_config(env: Mapping[str, str], cwd: str, resolved: ResolvedConfig | None,
                          ) -> tuple[dict[str, str], str]:
    """Pure: the unit's environment and directory with gunicorn's resolved settings applied
    as gunicorn applies them: raw_env over the process environment, pythonpath entries first
    (here: first on PYTHONPATH), the final chdir as the directory. Without gunicorn's own
    resolution (None, or the ExecStart fallback), env and cwd stand as they are."""
    merged = dict(env)
    if resolved is None or not resolved.from_gunicorn:
        return merged, cwd
    merged.update(resolved.raw_env)
    if resolved.pythonpath:
        merged["PYTHONPATH"] = prepend_path(merged.get("PYTHONPATH", ""), resolved.pythonpath)
    return merged, resolved.chdir or cwd


def plan_exec(ctx: AppContext, argv: Sequence[str], euid: int,
              extra_env: Mapping[str, str] | None = None,
              resolve: Resolver | None = None) -> ExecPlan:
    """Who, where and with what environment argv runs for this unit (raises ExecError).

    resolve (default: gunicorn's own resolution in a probe child) gives the config file's
    chdir, pythonpath and raw_env; a broken configuration raises GunicornConfigError.
    """
    if not argv:
        raise ExecError("no command given: agentctl exec UNIT -- CMD [ARGS...]")
    secrets = tuple(secret_values(ctx.environment))
    try:
        identity = resolve_identity(ctx.user, ctx.group, ctx.supplementary_groups)
    except ProbeSetupError as exc:
        raise ExecError(f"{ctx.unit}: {exc}") from None
    if euid not in (0, identity.uid):
        # Checked here, not left to privilege_plan, to name the unit and the way out.
        raise AccessDenied(f"{ctx.unit} runs as User={identity.name} (uid {identity.uid}) and "
                           f"you are uid {euid}: run agentctl as root (sudo agentctl ...)")
    try:
        # The unit itself runs as root when it has no User=: then so does its command.
        drop = privilege_plan(identity, euid, allow_root=True)
    except ProbeSetupError as exc:
        raise AccessDenied(str(exc)) from None
    # gunicorn's config file runs as whoever the unit runs as (root only for a root unit).
    resolved = (resolve or default_resolver())(ctx, identity.uid == 0)
    if resolved is not None and resolved.error:
        raise GunicornConfigError(scrub(f"{ctx.unit}: {resolved.error}", secrets))
    env, cwd = apply_gunicorn_config(unit_environment(ctx, identity),
                                     ctx.app_directory or "/", resolved)
    env.update(extra_env or {})
    if resolved is not None and resolved.raw_env:  # a config file's passwords, masked too
        secrets = tuple(sorted(set(secrets) | set(secret_values(resolved.raw_env)),
                               key=len, reverse=True))
    gunicorn = resolved is not None and resolved.from_gunicorn
    return ExecPlan(unit=ctx.unit, argv=tuple(argv), cwd=cwd, env=env, user=identity.name,
                    uid=identity.uid, drop=drop, secrets=secrets,
                    app_uri=(resolved.app_uri if gunicorn and resolved is not None
                             else ctx.launch.app_spec),
                    config_source="gunicorn config" if gunicorn else "ExecStart")


def resolve_command(name: str, path: str) -> str:
    """name looked up on the unit's PATH (not ours), as execvp would, or ExecError 127."""
    if "/" in name:
        return name
    found = shutil.which(name, path=path)
    if not found:
        raise _exit_error(f"{name}: command not found on the unit's PATH ({path})",
                          EXIT_NOT_FOUND)
    return found


def _exit_error(message: str, code: int) -> ExecError:
    error = ExecError(message)
    error.exit_code = code
    return error


def launch_of(plan: ExecPlan, verb: str = "exec") -> Launch:
    """What the launcher needs to run the plan (messages masked here, in the parent)."""
    program = resolve_command(plan.argv[0], plan.env.get("PATH", ""))
    return Launch(program=program, argv=plan.argv, env=dict(plan.env), cwd=plan.cwd,
                  drop=dict(plan.drop),
                  cwd_message=plan.scrub(f"cannot enter {plan.cwd} as {plan.user}"),
                  exec_message=plan.scrub(f"cannot run {program} as {plan.user}"),
                  # Seen by anyone in systemctl's list: the unit, never the argv.
                  label=f"agentctl {verb} {plan.unit}")


def run_exec(plan: ExecPlan, systemd: Any = None) -> Finished:
    """Run the command to its end in its own session, scope and (when interactive) pty.

    agentctl stays as the relay: the command never shares its terminal (TIOCSTI).
    """
    launch = launch_of(plan)
    try:
        return run_interactive(launch, systemd)
    except SessionError as exc:
        raise ExecError(plan.scrub(str(exc))) from None


@dataclass(frozen=True)
class CapturedRun:
    """A finished command: exit code (128+N for signal N) and the masked tail of its output."""

    returncode: int
    tail: tuple[str, ...]
    leftovers: int = 0  # processes it left behind, stopped after it ended
    timed_out: bool = False  # stopped at the overall deadline


class _Lines:
    """Bytes in, masked lines out (a pty ends lines with CR LF, a pipe with LF)."""

    def __init__(self, plan: ExecPlan, on_line: Callable[[str], None] | None,
                 tail: deque[str]) -> None:
        self.plan, self.on_line, self.tail, self.pending = plan, on_line, tail, b""

    def feed(self, data: bytes) -> None:
        *lines, self.pending = (self.pending + data).split(b"\n")
        for raw in lines:
            self.emit(raw)
        if len(self.pending) > MAX_LINE_BYTES:  # megabytes without a newline: cut, not hoard
            self.emit(self.pending)
            self.pending = b""

    def emit(self, raw: bytes) -> None:
        line = self.plan.scrub(raw.decode("utf-8", "replace").rstrip("\r"))
        self.tail.append(line)
        if self.on_line is not None:
            self.on_line(line)

    def close(self) -> None:
        if self.pending:
            self.emit(self.pending)
            self.pending = b""


def run_captured(plan: ExecPlan, on_line: Callable[[str], None] | None = None,
                 tail_lines: int = 20, systemd: Any = None,
                 use_pty: bool | None = None, timeout: float | None = None) -> CapturedRun:
    """Run the command to the end, stdout and stderr merged, each line masked before it is
    shown; in its own session and scope, through a fresh pty when agentctl's stdin is a
    terminal (use_pty None), never on agentctl's terminal."""
    tail: deque[str] = deque(maxlen=tail_lines)
    lines = _Lines(plan, on_line, tail)
    launch = launch_of(plan, "upgrade")
    try:
        done = run_output(launch, systemd, lines.feed,
                          use_pty=os.isatty(0) if use_pty is None else use_pty,
                          timeout=timeout)
    except SessionError as exc:
        raise ExecError(plan.scrub(f"{exc} (as {plan.user} in {plan.cwd})")) from None
    lines.close()
    return CapturedRun(done.returncode, tuple(tail), done.leftovers, done.timed_out)


def describe_returncode(code: int) -> str:
    """'exited with status 1' or 'was killed by SIGTERM' for a CapturedRun code."""
    if code > 128 and code - 128 in signal.Signals._value2member_map_:
        return f"was killed by {signal.Signals(code - 128).name}"
    return f"exited with status {code}"
