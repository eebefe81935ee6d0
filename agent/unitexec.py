"""Run a command in a unit's exact context: its user, groups, environment, app dir and venv."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from agent.context import AppContext
from agent.errors import AccessDenied, DriftwatchError
from agent.probe.runner import (
    ProbeSetupError,
    ResolvedConfig,
    build_unit_env,
    privilege_plan,
    resolve_gunicorn_config,
    resolve_identity,
    scrub,
    secret_values,
)

# Conventions of env(1), chroot(1) and docker run: the command's own codes stay free.
EXIT_EXEC_FAILED, EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND = 125, 126, 127
# How long gunicorn's configuration may take to resolve (the probe's default timeout).
RESOLVE_TIMEOUT = 20.0

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


def _drop_privileges(drop: Mapping[str, Any]) -> None:
    """Become the unit's user: groups first, then gid, then uid (the only order that works)."""
    if not drop:
        return
    os.setgroups(list(drop["extra_groups"]))
    os.setresgid(drop["group"], drop["group"], drop["group"])
    os.setresuid(drop["user"], drop["user"], drop["user"])


def exec_replace(plan: ExecPlan) -> NoReturn:
    """Replace this process by the command, so stdio, signals and exit code are the command's own."""
    try:
        _drop_privileges(plan.drop)
        # After the drop, so a directory the unit's user cannot enter fails as it would for it.
        os.chdir(plan.cwd)
    except OSError as exc:
        raise ExecError(plan.scrub(f"cannot enter {plan.cwd} as {plan.user}: "
                                   f"{exc.strerror or exc}")) from None
    program = resolve_command(plan.argv[0], plan.env.get("PATH", ""))
    try:
        os.execve(program, list(plan.argv), plan.env)
    except OSError as exc:
        code = EXIT_NOT_FOUND if isinstance(exc, FileNotFoundError) else EXIT_NOT_EXECUTABLE
        raise _exit_error(plan.scrub(f"cannot run {program} as {plan.user}: "
                                     f"{exc.strerror or exc}"), code) from None


@dataclass(frozen=True)
class CapturedRun:
    """A finished command: exit code (128+N for signal N) and the masked tail of its output."""

    returncode: int
    tail: tuple[str, ...]


def run_captured(plan: ExecPlan, on_line: Callable[[str], None] | None = None,
                 tail_lines: int = 20) -> CapturedRun:
    """Run the command to the end, stdout and stderr merged, each line masked before it is shown."""
    program = resolve_command(plan.argv[0], plan.env.get("PATH", ""))
    tail: deque[str] = deque(maxlen=tail_lines)
    try:
        proc = subprocess.Popen([program, *plan.argv[1:]], cwd=plan.cwd, env=plan.env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, **plan.drop)
    except OSError as exc:
        raise ExecError(plan.scrub(f"cannot start {program} as {plan.user} in {plan.cwd}: "
                                   f"{exc.strerror or exc}")) from None
    assert proc.stdout is not None
    with proc.stdout:
        for raw in proc.stdout:
            line = plan.scrub(raw.decode("utf-8", "replace").rstrip("\n"))
            tail.append(line)
            if on_line is not None:
                on_line(line)
    code = proc.wait()
    return CapturedRun(code if code >= 0 else 128 - code, tuple(tail))


def describe_returncode(code: int) -> str:
    """'exited with status 1' or 'was killed by SIGTERM' for a CapturedRun code."""
    if code > 128 and code - 128 in signal.Signals._value2member_map_:
        return f"was killed by {signal.Signals(code - 128).name}"
    return f"exited with status {code}"
