"""Walks the first half of the runbook for one unit: systemd, disk, processes -> findings."""

from __future__ import annotations

import os
import posixpath
import time
from dataclasses import dataclass, field
from typing import Any

from agent.checks.unit import UnitFacts, ignored_variables, stale_variables, unit_findings
from agent.context import AppContext, ContextInputs, build_context, wanted_paths
from agent.model import Finding, ProcessInfo, UnitProperties
from agent.secrets import mask_argv
from agent.privileged.sources import files, procs
from agent.privileged.sources.systemd import SystemdSource


@dataclass
class UnitReport:
    """The unit as systemd sees it, as it really runs, and what is wrong between the two."""

    props: UnitProperties
    context: AppContext
    processes: list[ProcessInfo]
    findings: list[Finding] = field(default_factory=list)
    # Names of variables whose running value differs from the unit's (never the values).
    stale_variables: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form; secrets masked."""
        data = self.context.as_dict(reveal=False)
        data.pop("environment")
        data["active_state"] = self.props.active_state
        data["sub_state"] = self.props.sub_state
        data["fragment_path"] = self.props.fragment_path
        data["drop_in_paths"] = list(self.props.drop_in_paths)
        data["need_daemon_reload"] = self.props.need_daemon_reload
        data["started_at"] = self.props.exec_main_start_timestamp
        # argv may carry gunicorn -e SECRET=... values: masked like ExecStart.
        data["processes"] = [{**p.as_dict(), "argv": mask_argv(p.argv)} for p in self.processes]
        data["findings"] = [f.as_dict() for f in self.findings]
        return data


class Lookups:
    """The user and group lookups of one inspection run, shared by its units: each NSS
    lookup reads /etc/passwd and /etc/group again, and many units run as one user."""

    def __init__(self) -> None:
        self._readers: dict[tuple[Any, ...], files.Reader | None] = {}
        self._homes: dict[str, str] = {}

    def reader_for(self, user: str, group: str, supplementary: tuple[str, ...],
                   dynamic_user: bool) -> files.Reader | None:
        """files.reader_for, once per run and identity."""
        key = (user, group, supplementary, dynamic_user)
        if key not in self._readers:
            self._readers[key] = files.reader_for(user, group, supplementary, dynamic_user)
        return self._readers[key]

    def user_home(self, user: str) -> str:
        """files.user_home, once per run and user."""
        if user not in self._homes:
            self._homes[user] = files.user_home(user)
        return self._homes[user]


def gather_inputs(props: UnitProperties, lookups: Lookups | None = None) -> ContextInputs:
    """Read the env files, venv candidates and '#!' lines the context builder needs."""
    lookups = lookups or Lookups()
    env_paths, venv_candidates, scripts = wanted_paths(props)
    env_files: dict[str, bytes | None] = {}
    errors: dict[str, str] = {}
    for path in env_paths:
        read = files.read_file(path)
        env_files[path] = read.data
        if read.error and not read.missing:
            errors[path] = read.error
    # '#!' lines are read as the unit's user (systemd execs the script as that user).
    reader = lookups.reader_for(props.user, props.group, props.supplementary_groups,
                                props.dynamic_user)
    shebangs = {script: files.shebang_interpreter(script, reader) for script in scripts}
    for interpreter in shebangs.values():
        if interpreter.startswith("/"):
            venv_candidates.append(posixpath.dirname(posixpath.dirname(interpreter)))
    venvs = {v: files.is_virtualenv(v) for v in venv_candidates}
    return ContextInputs(env_files=env_files, env_file_errors=errors,
                         user_home=lookups.user_home(props.user), venvs=venvs,
                         shebangs=shebangs)


def gather_facts(ctx: AppContext, processes: list[ProcessInfo],
                 props: UnitProperties | None = None,
                 previous_restarts: int | None = None) -> UnitFacts:
    """Realpaths, the newest code file and which ExecStart programs exist, for the checks."""
    paths = {ctx.app_directory, ctx.venv, *(p.venv or "" for p in processes),
             *(p.cwd for p in processes)}
    realpaths = {p: files.realpath(p) for p in paths if p}
    app_dir = ctx.app_directory
    # Walking "/" would be slow and meaningless: only a real app directory is scanned.
    newest = files.newest_file(app_dir) if app_dir and app_dir != "/" else None
    programs = [c.path for c in props.exec_start] if props is not None else []
    if ctx.python:
        programs.append(ctx.python)
    root = props.root_directory if props is not None and props.root_directory else ""
    # os.path.exists follows links: a venv python linked to a removed system Python is False.
    exists = {p: os.path.exists(root + p) for p in programs if p.startswith("/")}
    return UnitFacts(realpaths=realpaths, newest_code=newest, now=time.time(), exists=exists,
                     previous_restarts=previous_restarts)


def inspect_unit(systemd: SystemdSource, name: str,
                 previous_restarts: int | None = None,
                 process_memo: procs.ProcessMemo | None = None,
                 props: UnitProperties | None = None,
                 lookups: Lookups | None = None) -> UnitReport:
    """Read one unit and its processes and return its report (raises UnitNotFound).
    PREVIOUS_RESTARTS: NRestarts at the last inspection, to see a crash loop rising.
    PROCESS_MEMO: processes read before at the same pid and start time are not read again.
    PROPS: the unit's properties when already read (the run's shared D-Bus pass).
    LOOKUPS: the run's user and group lookups."""
    if props is None:
        props = systemd.read_unit(name)
    ctx = build_context(props, gather_inputs(props, lookups))
    processes = procs.unit_processes(props.main_pid, memo=process_memo, unit=name) \
        if props.main_pid else []
    facts = gather_facts(ctx, processes, props, previous_restarts)
    report = UnitReport(props, ctx, processes)
    report.findings = unit_findings(props, ctx, processes, facts)
    master = next((p for p in processes if p.role == "master"), None)
    if master is not None and master.environ is not None:
        changed, added, removed = stale_variables(ctx.environment, master.environ,
                                                  ignored_variables(ctx))
        report.stale_variables = changed + added + removed
    if processes and any("permission denied" in p.error for p in processes) and os.geteuid():
        report.findings.append(Finding(
            "insufficient_privileges", "info",
            "some process details of the unit could not be read without root "
            "(environment, memory maps)", "run agentctl as root"))
    return report
