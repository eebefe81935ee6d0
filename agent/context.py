"""Pure: unit properties + file contents -> the app's exact context (env, cwd, user, venv)."""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.envfile import EnvFileError, parse_env_file
from agent.execstart import LaunchSpec, analyse_exec_start, split_env_assignment
from agent.model import UnitProperties
from agent.secrets import mask_argv, mask_environment


@dataclass(frozen=True)
class EnvFileState:
    """One EnvironmentFile= entry and what became of it."""

    path: str
    optional: bool
    exists: bool
    error: str = ""
    warnings: tuple[str, ...] = ()
    variables: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (variable names only)."""
        return {"path": self.path, "optional": self.optional, "exists": self.exists,
                "error": self.error, "warnings": list(self.warnings),
                "variables": list(self.variables)}


@dataclass(frozen=True)
class ContextInputs:
    """What the I/O edge read for one unit, so building the context stays pure."""

    # path -> bytes, or None when missing; errors other than "missing" go in env_file_errors.
    env_files: Mapping[str, bytes | None] = field(default_factory=dict)
    env_file_errors: Mapping[str, str] = field(default_factory=dict)
    user_home: str = ""
    # candidate venv dir -> True when it really is a virtualenv (has pyvenv.cfg).
    venvs: Mapping[str, bool] = field(default_factory=dict)
    # script path -> interpreter named on its '#!' line.
    shebangs: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AppContext:
    """Everything a new process of the unit would get, rebuilt the way systemd builds it."""

    unit: str
    user: str
    group: str
    supplementary_groups: tuple[str, ...]
    working_directory: str
    working_directory_optional: bool
    exec_start: tuple[str, ...]
    launch: LaunchSpec
    venv: str
    venv_source: str
    python: str
    environment: dict[str, str] = field(repr=False)
    # name -> "Environment=" or the env file path it last came from.
    environment_sources: dict[str, str]
    environment_files: tuple[EnvFileState, ...]
    main_pid: int
    # The unit's execution settings as systemd has them, carried to the probe's transient
    # unit (empty when the unit was not read from systemd, e.g. in pure tests).
    exec_settings: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    dynamic_user: bool = False
    # Names UnsetEnvironment= removed from what Environment=/files/PassEnvironment= set.
    unset_variables: tuple[str, ...] = ()

    @property
    def app_directory(self) -> str:
        """Where the app's code lives: gunicorn --chdir, else the working directory."""
        return self.launch.chdir or self.working_directory

    def as_dict(self, reveal: bool = False) -> dict[str, Any]:
        """JSON-ready form; environment values masked unless reveal."""
        env = self.environment if reveal else mask_environment(self.environment)
        return {
            "unit": self.unit, "user": self.user or ("(dynamic)" if self.dynamic_user else "root"), "group": self.group,
            "supplementary_groups": list(self.supplementary_groups),
            "working_directory": self.working_directory,
            "exec_start": list(self.exec_start) if reveal else mask_argv(self.exec_start),
            "app": self.launch.app_spec, "chdir": self.launch.chdir,
            "venv": self.venv, "venv_source": self.venv_source, "python": self.python,
            "environment_files": [f.as_dict() for f in self.environment_files],
            "environment": env,
            "unset_environment": list(self.unset_variables),
            "main_pid": self.main_pid,
        }


def resolve_working_directory(raw: str, user_home: str) -> tuple[str, bool]:
    """systemd's WorkingDirectory= as D-Bus shows it -> (path, missing_ok).

    systemd 252 marks a '-' prefixed (missing-ok) directory with '!' on the bus; older ones
    keep '-'. '~' means the user's home. Unset means '/' for system services.
    """
    optional = False
    if raw[:1] in ("!", "-"):
        optional, raw = True, raw[1:]
    if raw == "~":
        return user_home or "/", optional
    return raw or "/", optional


def build_environment(props: UnitProperties, inputs: ContextInputs,
                      ) -> tuple[dict[str, str], dict[str, str], tuple[EnvFileState, ...]]:
    """systemd's order: PassEnvironment= (from the manager's environment), Environment=,
    each EnvironmentFile= in order (later ones overriding), then UnsetEnvironment= removes."""
    env: dict[str, str] = {}
    sources: dict[str, str] = {}
    manager = dict(split_env_assignment(a) for a in props.manager_environment if "=" in a)
    for name in props.pass_environment:
        if name in manager:  # a name the manager does not have is silently skipped
            env[name] = manager[name]
            sources[name] = "PassEnvironment="
    for assignment in props.environment:
        name, value = split_env_assignment(assignment)
        env[name] = value
        sources[name] = "Environment="
    states = []
    for path, optional in props.environment_files:
        data = inputs.env_files.get(path)
        error = inputs.env_file_errors.get(path, "")
        if data is None:
            # Unreadable (permissions) still exists; otherwise it is missing.
            states.append(EnvFileState(path, optional, exists=bool(error),
                                       error=error or "no such file"))
            continue
        try:
            parsed = parse_env_file(data)
        except EnvFileError as exc:
            # systemd refuses the whole file: a required one fails the start, an optional one
            # is skipped entirely.
            states.append(EnvFileState(path, optional, exists=True, error=f"invalid: {exc}"))
            continue
        names = []
        for name, value in parsed.assignments:
            env[name] = value
            sources[name] = path
            names.append(name)
        states.append(EnvFileState(path, optional, exists=True,
                                   warnings=tuple(str(w) for w in parsed.warnings),
                                   variables=tuple(dict.fromkeys(names))))
    for name in unset_names(env, props.unset_environment):
        env.pop(name, None)
        sources.pop(name, None)
    return env, sources, tuple(states)


def unset_names(env: Mapping[str, str], unset: tuple[str, ...]) -> list[str]:
    """Names UnsetEnvironment= removes: "VAR" always, "VAR=value" only with that value."""
    gone = []
    for entry in unset:
        name, sep, value = entry.partition("=")
        if name in env and (not sep or env[name] == value):
            gone.append(name)
    return gone


def build_context(props: UnitProperties, inputs: ContextInputs) -> AppContext:
    """Rebuild the unit's context from its properties and what the edge read from disk."""
    workdir, workdir_optional = resolve_working_directory(props.working_directory,
                                                          inputs.user_home)
    launch = analyse_exec_start(props.exec_start, workdir)
    env, sources, states = build_environment(props, inputs)
    unset = [n for n in dict.fromkeys(e.partition("=")[0] for e in props.unset_environment)
             if n not in env]
    venv, venv_source, python = choose_interpreter(launch, inputs)
    main = props.exec_start[-1].argv if props.exec_start else ()
    for command in props.exec_start:
        if launch.argv and command.argv and (launch.shell_wrapped or
                                             tuple(command.argv[-len(launch.argv):]) ==
                                             launch.argv):
            main = command.argv
            break
    return AppContext(
        unit=props.name, user=props.user, group=props.group,
        supplementary_groups=props.supplementary_groups,
        working_directory=workdir, working_directory_optional=workdir_optional,
        exec_start=tuple(main), launch=launch,
        venv=venv, venv_source=venv_source, python=python,
        environment=env, environment_sources=sources, environment_files=states,
        main_pid=props.main_pid, exec_settings=dict(props.exec_settings),
        dynamic_user=props.dynamic_user, unset_variables=tuple(unset),
    )


def choose_interpreter(launch: LaunchSpec, inputs: ContextInputs) -> tuple[str, str, str]:
    """(venv, how it was found, python) from the command line, checked against the disk."""
    if launch.venv and inputs.venvs.get(launch.venv):
        python = launch.python or posixpath.join(launch.venv, "bin", "python3")
        return launch.venv, launch.venv_source, python
    # A gunicorn console script names its interpreter on its '#!' line.
    interpreter = inputs.shebangs.get(launch.program, "")
    if interpreter:
        candidate = posixpath.dirname(posixpath.dirname(interpreter))
        if inputs.venvs.get(candidate):
            return candidate, f"'#!' line of {launch.program}", interpreter
        return "", "", interpreter
    return "", "", launch.python or ""


def wanted_paths(props: UnitProperties) -> tuple[list[str], list[str], list[str]]:
    """(env files, venv candidates, scripts) the edge must read for build_context."""
    workdir, _ = resolve_working_directory(props.working_directory, "")
    launch = analyse_exec_start(props.exec_start, workdir)
    venvs = [launch.venv] if launch.venv else []
    scripts = [launch.program] if launch.program.startswith("/") else []
    return [p for p, _ in props.environment_files], venvs, scripts
