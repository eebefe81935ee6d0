"""Agent side of the probe: start probe_child.py in the unit's exact context, read its JSON report."""

from __future__ import annotations

import grp
import hashlib
import json
import os
import pwd
import re
import selectors
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from agent.context import AppContext
from agent.execstart import parse_gunicorn_args
from agent.model import Finding
from agent.privileged.alembic_env import AlembicEnv
from agent.privileged.alembic_env import from_report as alembic_env_from
from agent.privileged import table_fingerprints
from agent.privileged import transient
from agent.privileged.launch import PROBE_CHILD, bundle
from agent.secrets import MASK, is_secret_name, mask_url
from agent.privileged.sources.systemd import SystemdSource

PROTOCOL = 1
CHILD_SOURCE_PATH = PROBE_CHILD
# Bundled before probe_child.py: bulk catalog reads for the comparison.
BULK_SOURCE_PATH = PROBE_CHILD.with_name("bulk_reflection.py")
# systemd's default PATH for system services (the manager's, when the unit sets none).
SYSTEMD_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Keep this much of the child's stdout+stderr for the failure reason.
TAIL_BYTES = 4096
# A report larger than this is not a probe report (thousands of revisions fit easily).
MAX_REPORT_BYTES = 32 * 1024 * 1024
# The child's environment variable for its request (argv is world-readable in /proc).
REQUEST_ENV = "DRIFTWATCH_PROBE_REQUEST"
# How the child learnt the gunicorn settings: gunicorn's own Config, or our ExecStart parse.
CONFIG_SOURCES = ("gunicorn config", "ExecStart")
ERROR_KINDS = ("app_load", "migrations", "database", "timeout", "privileges", "internal")


# The finding's check id for each way the probe can fail.
FINDING_CHECKS = {
    "app_load": "app_load_failed", "timeout": "app_load_timeout",
    "migrations": "migration_scripts_broken", "database": "probe_database_error",
    "privileges": "probe_privileges", "internal": "probe_failed",
}


class ProbeSetupError(Exception):
    """The probe could not be started; kind is one of ERROR_KINDS."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class ProbeRequest:
    """What the probe should find out, and how gently it must treat the database."""

    compare_schema: bool = True
    statement_timeout_ms: int = 5000
    lock_timeout_ms: int = 1000
    include_revisions: bool = True
    # A session left idle in a transaction (by app import code) is ended by the server.
    idle_in_transaction_timeout_ms: int = 10000
    # libpq gives up connecting after this (PGCONNECT_TIMEOUT), unless the unit sets its own.
    connect_timeout_s: int = 5
    # Units without User= run as root; loading their code as root breaks safety rule 2.
    allow_root: bool = False
    # Units without User=: run the probe as this user ("" = a DynamicUser= of systemd's).
    probe_user: str = ""
    # The transient unit's MemoryMax=; its address space (LimitAS=) is 4x that, at least 2 GiB.
    memory_max_mb: int = 512
    # The previous comparison of the same code (agent/privileged/table_fingerprints.py):
    # tables whose catalog fingerprint is unchanged are not compared again. None: all are.
    previous_check: dict[str, Any] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Identity:
    """Who the unit's processes run as, resolved the way systemd resolves User=/Group=."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str
    shell: str


@dataclass(frozen=True)
class ProbeResult:
    """What the probe learnt about the app; urls hold secrets and are masked in as_dict()."""

    ok: bool
    error: str = ""
    error_kind: str = ""
    urls: dict[str, str] = field(default_factory=dict, repr=False)
    migrations_dir: str = ""
    script_location: str = ""
    revisions: tuple[dict[str, Any], ...] = ()
    heads: tuple[str, ...] = ()
    revisions_error: str = ""
    schema_diff: tuple[dict[str, str], ...] | None = None
    schema_diff_error: str = ""
    app_uid: int | None = None
    app_source: str = ""
    # "gunicorn config" (gunicorn's own Config: defaults, config file, GUNICORN_CMD_ARGS,
    # command line) or "ExecStart" (our parse of the command line, gunicorn not importable).
    config_source: str = ""
    gunicorn_config: str = ""              # the config file gunicorn loaded, "" for none
    app_chdir: str = ""                    # the directory the app was loaded in
    app_uri: str = ""                      # what was loaded: "wsgi:app", a FLASK_APP value
    plain_alembic: bool = False            # a plain Alembic app (alembic.ini), not Flask-Migrate
    pythonpath: tuple[str, ...] = ()       # gunicorn pythonpath entries put on sys.path
    raw_env_names: tuple[str, ...] = ()    # gunicorn raw_env / -e names (never the values)
    versions: dict[str, str | None] = field(default_factory=dict)
    # What env.py configured (version table, options); see agent/privileged/alembic_env.py.
    alembic_env: AlembicEnv = field(default_factory=AlembicEnv)
    # Per bind, the catalog fingerprint of each compared table (validated; {} if refused).
    table_fingerprints: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)
    duration: float = 0.0
    returncode: int | None = None
    output_tail: str = ""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form, URLs with their passwords masked."""
        return {
            "ok": self.ok, "error": self.error, "error_kind": self.error_kind,
            "urls": {k: mask_url(v) for k, v in self.urls.items()},
            "migrations_dir": self.migrations_dir, "script_location": self.script_location,
            "revisions": [dict(r) for r in self.revisions], "heads": list(self.heads),
            "revisions_error": self.revisions_error,
            "schema_diff": None if self.schema_diff is None else [dict(d) for d in
                                                                  self.schema_diff],
            "schema_diff_error": self.schema_diff_error, "app_uid": self.app_uid,
            "app_source": self.app_source, "config_source": self.config_source,
            "gunicorn_config": self.gunicorn_config, "app_chdir": self.app_chdir,
            "app_uri": self.app_uri, "pythonpath": list(self.pythonpath),
            "raw_env_names": list(self.raw_env_names), "versions": dict(self.versions),
            "alembic_env": self.alembic_env.as_dict(),
            "duration": self.duration, "returncode": self.returncode,
            "output_tail": self.output_tail,
        }

    def finding(self) -> Finding | None:
        """The probe failure as a finding (None when the probe worked)."""
        if self.ok:
            return None
        remedy = {
            "app_load": "run the app's import by hand as the unit's user, in its working "
                        "directory and environment, and fix the error",
            "migrations": "fix the migration script named; Alembic cannot read the graph",
            "database": "check that the database is reachable with the app's URL",
            "timeout": "the app's import hangs or is very slow; look for network calls at "
                       "import time",
            "privileges": "run the agent as root so it can take the unit's User=/Group=; "
                          "for a unit without User=: grant read access to the file named "
                          "(e.g. chmod o+r, or a group the probe user is in), or set "
                          "probe_user in agent.toml to a user who can read it (never root), "
                          "or give the unit a User=",
        }.get(self.error_kind, "")
        check = FINDING_CHECKS.get(self.error_kind, "probe_failed")
        return Finding(check, "critical", self.error, remedy)


@dataclass(frozen=True)
class ResolvedConfig:
    """gunicorn's effective settings for a unit, as its own Config resolves them (resolve-only
    child run); raw_env values are secrets and are kept out of repr and every surfaced form."""

    config_source: str = ""                # "gunicorn config", or "ExecStart" (not importable)
    gunicorn_config: str = ""              # the config file gunicorn loaded, "" for none
    chdir: str = ""                        # gunicorn's final chdir (its default: start dir)
    pythonpath: tuple[str, ...] = ()       # absolute, in gunicorn's order
    app_uri: str = ""                      # positional app or wsgi_app
    raw_env: dict[str, str] = field(default_factory=dict, repr=False)
    error: str = ""                        # scrubbed one line; "" when resolved
    duration: float = 0.0

    @property
    def from_gunicorn(self) -> bool:
        """True when gunicorn's own Config resolved it (else: nothing to apply)."""
        return not self.error and self.config_source == "gunicorn config"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form: raw_env names only, never the values."""
        return {"config_source": self.config_source, "gunicorn_config": self.gunicorn_config,
                "chdir": self.chdir, "pythonpath": list(self.pythonpath),
                "app_uri": self.app_uri, "raw_env_names": sorted(self.raw_env),
                "error": self.error, "duration": self.duration}


# -- identity ---------------------------------------------------------------------------------

def resolve_identity(user: str, group: str, supplementary: Iterable[str], *,
                     getpwnam: Callable[[str], Any] = pwd.getpwnam,
                     getpwuid: Callable[[int], Any] = pwd.getpwuid,
                     getgrnam: Callable[[str], Any] = grp.getgrnam,
                     getgrouplist: Callable[[str, int], list[int]] = os.getgrouplist,
                     ) -> Identity:
    """User=/Group=/SupplementaryGroups= -> uids and gids, as systemd does (empty = root)."""
    user = user or "root"
    try:
        entry = getpwuid(int(user)) if user.isdigit() else getpwnam(user)
    except KeyError:
        if not user.isdigit():
            raise ProbeSetupError("privileges", f"User={user} does not exist") from None
        entry = None  # systemd accepts a numeric uid without a passwd entry
    if entry is not None:
        name, uid, gid = entry.pw_name, entry.pw_uid, entry.pw_gid
        home, shell = entry.pw_dir or "/", entry.pw_shell or "/bin/sh"
    else:
        name, uid, gid, home, shell = user, int(user), int(user), "/", "/bin/sh"
    if group:
        gid = _gid(group, getgrnam)
    # systemd calls initgroups() for the user, then adds SupplementaryGroups=.
    groups = list(getgrouplist(name, gid)) if entry is not None else [gid]
    for extra in supplementary:
        groups.append(_gid(extra, getgrnam))
    return Identity(name, uid, gid, tuple(dict.fromkeys(groups)), home, shell)


def unit_identity(ctx: AppContext, probe_user: str = "") -> Identity:
    """Who per-unit work runs as without systemd: the unit's User=, else probe_user (units
    without User= would otherwise mean root), else root (refused by privilege_plan)."""
    if not ctx.user and probe_user:
        return resolve_identity(probe_user, "", ())
    return resolve_identity(ctx.user, ctx.group, ctx.supplementary_groups)


def _gid(group: str, getgrnam: Callable[[str], Any]) -> int:
    if group.isdigit():
        return int(group)
    try:
        return int(getgrnam(group).gr_gid)
    except KeyError:
        raise ProbeSetupError("privileges", f"group {group} does not exist") from None


def privilege_plan(identity: Identity, euid: int, allow_root: bool) -> dict[str, Any]:
    """Popen keyword arguments that drop to identity, or ProbeSetupError when we cannot."""
    if identity.uid == 0 and not allow_root:
        raise ProbeSetupError("privileges", "the unit runs as root (no User=): the probe "
                                            "does not load app code as root")
    if euid == 0:
        return {"user": identity.uid, "group": identity.gid,
                "extra_groups": list(identity.groups)}
    if euid == identity.uid:
        return {}  # already the unit's user; setgroups would need root anyway
    raise ProbeSetupError("privileges", f"the agent runs as uid {euid} and cannot become "
                                        f"User={identity.name} (uid {identity.uid}); "
                                        f"run the agent as root")


# -- environment ------------------------------------------------------------------------------

def pgoptions(existing: str, request: ProbeRequest) -> str:
    """PGOPTIONS with read-only and timeout settings appended (later -c options win).

    Not used by the probe any more (see build_probe_env); kept for callers that connect
    straight to PostgreSQL and want a session-level default as well.
    """
    ours = (f"-c default_transaction_read_only=on "
            f"-c statement_timeout={int(request.statement_timeout_ms)} "
            f"-c lock_timeout={int(request.lock_timeout_ms)} "
            f"-c idle_in_transaction_session_timeout="
            f"{int(request.idle_in_transaction_timeout_ms)}")
    return f"{existing.strip()} {ours}" if existing.strip() else ours


def build_unit_env(ctx: AppContext, identity: Identity, gunicorn_env: bool = True,
                   ) -> dict[str, str]:
    """The environment a new process of the unit gets, with the venv first on PATH.

    gunicorn_env adds the ExecStart's gunicorn -e values, as the app sees them (for commands
    run beside the app); the probe leaves them to the child, which applies gunicorn's own
    raw_env the way gunicorn does (after its config file ran).
    """
    env = {"PATH": SYSTEMD_DEFAULT_PATH}
    if ctx.user:  # systemd sets these for User=; Environment= may still override them
        env.update(HOME=identity.home, USER=identity.name, LOGNAME=identity.name,
                   SHELL=identity.shell)
    env.update(ctx.environment)
    for assignment in ctx.launch.gunicorn_env if gunicorn_env else ():
        name, sep, value = assignment.partition("=")  # gunicorn -e puts these in os.environ
        if name and sep:
            env[name] = value
    if ctx.venv:
        venv_bin = os.path.join(ctx.venv, "bin")
        rest = [p for p in env.get("PATH", "").split(":") if p and p != venv_bin]
        env["PATH"] = ":".join([venv_bin, *rest])
    return env


def build_probe_env(ctx: AppContext, identity: Identity, request: ProbeRequest,
                    ) -> dict[str, str]:
    """The unit's environment plus the probe's connect-time defaults.

    Read-only and timeouts are not put in PGOPTIONS any more: a URL's options= replaces it,
    and PgBouncer refuses the options startup parameter. The child's read-only guard
    (agent/asuser/readonly.py) sets them inside every transaction instead, and verifies them.
    """
    env = build_unit_env(ctx, identity, gunicorn_env=False)
    env.setdefault("PGAPPNAME", "driftwatch-probe")  # visible in pg_stat_activity
    # A blackholed database host then gives a "database" error, not a probe timeout.
    env.setdefault("PGCONNECT_TIMEOUT", str(int(request.connect_timeout_s)))
    return env


def child_request(ctx: AppContext, request: ProbeRequest) -> dict[str, Any]:
    """The JSON the child gets in its environment (REQUEST_ENV).

    gunicorn_args (None when ExecStart does not run gunicorn) let the child resolve the
    configuration with gunicorn's own machinery, starting in start_dir; app_spec, cwd and
    gunicorn_env are the ExecStart analysis, used only when gunicorn is not importable.
    """
    launch = ctx.launch
    return {"protocol": PROTOCOL, "app_spec": launch.app_spec, "cwd": ctx.app_directory,
            "start_dir": launch.start_dir or ctx.working_directory,
            "gunicorn_args": list(launch.gunicorn_args) if launch.runs_gunicorn else None,
            "gunicorn_env": list(launch.gunicorn_env),
            # uvicorn run directly: --app-dir on sys.path, --env-file loaded (child.py)
            "pythonpath": list(launch.pythonpath), "env_file": launch.env_file,
            "compare_schema": request.compare_schema,
            "include_revisions": request.include_revisions,
            "allow_root": request.allow_root, "resolve_only": False,
            # A stand-in user that cannot load the app still reads the migration files.
            "revisions_without_app": stands_in(ctx),
            "guard": guard_settings(request),
            "previous_check": request.previous_check}


def guard_settings(request: ProbeRequest) -> dict[str, Any]:
    """What the child's read-only guard sets at the start of every transaction."""
    return {"statement_timeout_ms": int(request.statement_timeout_ms),
            "lock_timeout_ms": int(request.lock_timeout_ms),
            "idle_in_transaction_timeout_ms": int(request.idle_in_transaction_timeout_ms),
            "application_name": "driftwatch-probe"}


def probe_start_dir(ctx: AppContext) -> str:
    """Where the child starts: where the unit's gunicorn starts, else the app directory."""
    if ctx.launch.runs_gunicorn:
        return ctx.launch.start_dir or ctx.working_directory or ctx.app_directory
    return ctx.app_directory


def gunicorn_config_files(ctx: AppContext) -> list[str]:
    """Config files gunicorn may read for the unit (-c, GUNICORN_CMD_ARGS -c, the default
    ./gunicorn.conf.py), for the fingerprint; relative paths against where gunicorn starts."""
    if not ctx.launch.runs_gunicorn:
        return []
    start = ctx.launch.start_dir or ctx.working_directory or "/"
    files = []
    try:
        from_env = shlex.split(ctx.environment.get("GUNICORN_CMD_ARGS", ""))
    except ValueError:
        from_env = []
    for args in (ctx.launch.gunicorn_args, from_env):
        path = str(parse_gunicorn_args(list(args))["config_file"])
        if path and not path.startswith("python:"):
            path = path[len("file:"):] if path.startswith("file:") else path
            files.append(os.path.normpath(os.path.join(start, path)))
    files.append(os.path.join(start, "gunicorn.conf.py"))
    return list(dict.fromkeys(files))


def interpreter(ctx: AppContext, env: Mapping[str, str]) -> str:
    """The app's python as an absolute path (looked up on the unit's PATH if bare)."""
    python = ctx.python or (os.path.join(ctx.venv, "bin", "python3") if ctx.venv else "")
    if not python:
        raise ProbeSetupError("app_load", "the unit's Python interpreter is unknown "
                                          "(no venv or python found in ExecStart)")
    if not os.path.isabs(python):
        found = shutil.which(python, path=env.get("PATH", SYSTEMD_DEFAULT_PATH))
        if not found:
            raise ProbeSetupError("app_load", f"{python} not found on the unit's PATH")
        python = found
    return python


# -- secrets ----------------------------------------------------------------------------------

def secret_values(env: Mapping[str, str], urls: Iterable[str] = ()) -> list[str]:
    """Values that must never appear in anything surfaced: secret variables, URL passwords."""
    found = [v for k, v in env.items() if is_secret_name(k) and len(v) >= 4]
    for url in [*urls, *(v for v in env.values() if "://" in v)]:
        try:
            password = urlsplit(url).password
        except ValueError:
            continue
        if password and len(password) >= 4:
            found += [password, unquote(password)]
    return sorted(set(found), key=len, reverse=True)


def scrub(text: str, secrets: Iterable[str]) -> str:
    """text with URL passwords and every known secret value masked."""
    text = mask_url(text)
    for secret in secrets:
        text = text.replace(secret, MASK)
    return text


# -- result parsing ---------------------------------------------------------------------------

def _last_line(tail: str) -> str:
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def parse_report(raw: bytes, returncode: int | None, tail: str, *, timed_out: bool,
                 timeout: float, duration: float, secrets: Iterable[str] = ()) -> ProbeResult:
    """The child's report (or its absence) -> ProbeResult, every message scrubbed."""
    secrets = list(secrets)
    tail = scrub(tail, secrets)
    base = {"returncode": returncode, "output_tail": tail, "duration": round(duration, 3)}
    if timed_out:
        return ProbeResult(ok=False, error_kind="timeout",
                           error=f"the probe timed out after {timeout:g} s", **base)
    if not raw:
        how = (f"was killed by signal {signal.Signals(-returncode).name}"
               if returncode is not None and returncode < 0 and
               -returncode in signal.Signals._value2member_map_
               else f"exited with status {returncode}")
        last = _last_line(tail)
        return ProbeResult(ok=False, error_kind="app_load",
                           error=f"the app's interpreter {how} before reporting"
                                 + (f": {last}" if last else ""), **base)
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        return ProbeResult(ok=False, error_kind="internal",
                           error=f"the probe's report is not valid JSON ({exc})", **base)
    if doc.get("protocol") != PROTOCOL:
        return ProbeResult(ok=False, error_kind="internal",
                           error=f"the probe spoke protocol {doc.get('protocol')!r}, "
                                 f"expected {PROTOCOL}", **base)
    urls = {str(k): str(v) for k, v in (doc.get("urls") or {}).items()}
    # gunicorn raw_env values: used here for masking only, never kept in the result.
    raw_env = doc.get("raw_env") if isinstance(doc.get("raw_env"), dict) else {}
    raw_env = {str(k): str(v) for k, v in raw_env.items()}
    secrets = sorted(set(secrets) | set(secret_values(raw_env, urls.values())), key=len,
                     reverse=True)
    config_source = str(doc.get("config_source") or "")
    error = scrub(str(doc.get("error") or ""), secrets)
    kind = str(doc.get("error_kind") or "")
    diff = doc.get("schema_diff")
    base["output_tail"] = scrub(tail, secrets)
    alembic_env, env_problem = alembic_env_from(doc.get("alembic_env"))
    if env_problem and not error:
        error, kind = env_problem, "migrations"
    return ProbeResult(
        ok=not error, error=error, error_kind=(kind if kind in ERROR_KINDS else "internal")
        if error else "",
        urls=urls, migrations_dir=str(doc.get("migrations_dir") or ""),
        script_location=str(doc.get("script_location") or ""),
        revisions=tuple(r for r in doc.get("revisions") or () if isinstance(r, dict)),
        heads=tuple(str(h) for h in doc.get("heads") or ()),
        revisions_error=scrub(str(doc.get("revisions_error") or ""), secrets),
        schema_diff=None if diff is None else tuple(d for d in diff if isinstance(d, dict)),
        schema_diff_error=scrub(str(doc.get("schema_diff_error") or ""), secrets),
        app_uid=doc.get("app_uid") if isinstance(doc.get("app_uid"), int) else None,
        app_source=str(doc.get("app_source") or ""),
        config_source=config_source if config_source in CONFIG_SOURCES else "",
        gunicorn_config=str(doc.get("gunicorn_config") or ""),
        app_chdir=str(doc.get("chdir") or ""), app_uri=str(doc.get("app_uri") or ""),
        plain_alembic=doc.get("plain_alembic") is True,
        pythonpath=tuple(str(p) for p in doc.get("pythonpath") or ()),
        raw_env_names=tuple(sorted(set(raw_env) | {str(n) for n in
                                                   doc.get("raw_env_names") or ()})),
        versions={str(k): (None if v is None else str(v))
                  for k, v in (doc.get("versions") or {}).items()},
        alembic_env=alembic_env,
        table_fingerprints=table_fingerprints.from_report(doc.get("table_fingerprints"))
        if diff is not None else {}, **base)


# -- running ----------------------------------------------------------------------------------

class _Tail:
    """The last TAIL_BYTES of a stream."""

    def __init__(self) -> None:
        self.data = bytearray()

    def add(self, chunk: bytes) -> None:
        self.data += chunk
        del self.data[:-TAIL_BYTES]


def _exited(pid: int) -> bool:
    """True once pid has exited, without reaping it (so its process group id stays ours)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _collect(proc: subprocess.Popen[bytes], report_fd: int, deadline: float,
             ) -> tuple[bytes, bytes, bool]:
    """Read report and output until the child exits or the deadline passes."""
    report, tail = bytearray(), _Tail()
    assert proc.stdout is not None and proc.stderr is not None
    with selectors.DefaultSelector() as sel:
        sel.register(report_fd, selectors.EVENT_READ, "report")
        sel.register(proc.stdout, selectors.EVENT_READ, "out")
        sel.register(proc.stderr, selectors.EVENT_READ, "out")
        exited = False
        while sel.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return bytes(report), bytes(tail.data), True
            # Once the child is gone, only drain what is already there (a grandchild
            # holding stdout open must not make us wait for the deadline).
            ready = sel.select(0 if exited else min(remaining, 0.2))
            if not ready and exited:
                break
            for key, _ in ready:
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                elif key.data == "report":
                    if len(report) + len(chunk) > MAX_REPORT_BYTES:
                        sel.unregister(key.fileobj)
                        report.clear()
                    else:
                        report += chunk
                else:
                    tail.add(chunk)
            exited = exited or _exited(proc.pid)
    return bytes(report), bytes(tail.data), False


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the probe's own process group (it is the session leader), then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def probe_source() -> str:
    """bulk_reflection.py, then probe_child.py: the probe's program text (the guard goes first). bulk_reflection.py
    comes first because probe_child.py's last line runs main()."""
    return BULK_SOURCE_PATH.read_text() + "\n\n# ---- probe_child.py ----\n" + \
        CHILD_SOURCE_PATH.read_text()


def _run_transient(ctx: AppContext, request: ProbeRequest, doc: dict[str, Any],
                   timeout: float, secrets: list[str], source_text: str | None = None,
                   ) -> tuple[bytes, int | None, str, bool] | ProbeResult:
    """probe_child.py as a transient systemd unit carrying the app unit's execution settings;
    request on stdin, report on stdout, output tail from stderr, all pipes root owns."""
    started = time.monotonic()
    try:
        python = interpreter(ctx, {"PATH": ctx.environment.get("PATH", SYSTEMD_DEFAULT_PATH)})
        source = bundle(CHILD_SOURCE_PATH, source_text or probe_source())
    except ProbeSetupError as exc:
        return ProbeResult(ok=False, error_kind=exc.kind, error=scrub(str(exc), secrets))
    data = json.dumps(doc).encode()
    if len(data) > 60000:  # written into the pipe before the start: must fit its buffer
        return ProbeResult(ok=False, error_kind="internal", error="probe request too large")
    defaults = {"PGAPPNAME": "driftwatch-probe",
                "PGCONNECT_TIMEOUT": str(int(request.connect_timeout_s))}
    props = transient.transient_properties(
        ctx.exec_settings, description=f"driftwatch probe for {ctx.unit}",
        extra_env={k: v for k, v in defaults.items() if k not in ctx.environment},
        limits=transient.Limits(
            runtime_max_s=timeout + 1, memory_max_bytes=request.memory_max_mb << 20,
            address_space_bytes=max(2 << 30, 4 * (request.memory_max_mb << 20))),
        probe_user=request.probe_user,
        allow_root=request.allow_root)
    fds: list[int] = []
    source_bus = SystemdSource()
    try:
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        out_r, out_w = os.pipe()
        fds += [req_r, req_w, rep_r, rep_w, out_r, out_w]
        os.write(req_w, data)
        os.close(req_w)
        fds.remove(req_w)
        try:
            unit = transient.start(source_bus, transient.unit_name(ctx.unit),
                                   [python, "-B", "-c", source, "stdio"], props,
                                   req_r, rep_w, out_w)
        except transient.TransientError as exc:
            return ProbeResult(ok=False, error_kind="internal",
                               error=scrub(f"cannot start the probe unit: {exc}", secrets))
        for fd in (req_r, rep_w, out_w):  # systemd holds its own copies now
            os.close(fd)
            fds.remove(fd)
        try:
            raw, tail, timed_out = transient.collect(unit, rep_r, out_r, started + timeout,
                                                     MAX_REPORT_BYTES)
            state = unit.state()
        finally:
            unit.kill()  # the whole cgroup, whatever the app left running; then forget it
    finally:
        for fd in fds:
            os.close(fd)
        source_bus.close()
    # Killed on its own, before our deadline: the OOM killer of the unit's cgroup
    # (systemd says "oom-kill" on cgroup v2; on v1 only the SIGKILL is seen).
    if not raw and not timed_out and (state.result == "oom-kill" or
                                      state.returncode == -signal.SIGKILL):
        mib = props[b"MemoryMax"] // (1024 * 1024)
        how = "went over" if state.result == "oom-kill" else "was killed (SIGKILL), most " \
            "likely for going over"
        return ProbeResult(ok=False, error_kind="app_load", returncode=state.returncode,
                           error=f"loading the app {how} the probe's memory limit "
                                 f"(MemoryMax={mib}M)",
                           duration=round(time.monotonic() - started, 3),
                           output_tail=scrub(tail.decode("utf-8", "replace"), secrets))
    return raw, state.returncode, tail.decode("utf-8", "replace"), timed_out


def _run_child(ctx: AppContext, request: ProbeRequest, doc: dict[str, Any], timeout: float,
               secrets: list[str], source_text: str | None = None,
               ) -> tuple[bytes, int | None, str, bool] | ProbeResult:
    """Start probe_child.py as the unit's user with doc as its request, in its own process group,
    and collect (report bytes, returncode, output tail, timed out); a setup failure comes
    back as a failed ProbeResult. The whole group is killed at the end, whatever happens.

    Where systemd runs the machine, the child is a transient unit instead (_run_transient):
    systemd builds its context from the app unit's own settings and a stop ends its cgroup.
    The process-group path is the fallback without systemd (and for contexts not read from
    systemd, as in the integration tests).
    """
    if transient.available(ctx.exec_settings):
        return _run_transient(ctx, request, doc, timeout, secrets, source_text)
    started = time.monotonic()
    try:
        identity = unit_identity(ctx, request.probe_user)
        drop = privilege_plan(identity, os.geteuid(), request.allow_root)
        env = build_probe_env(ctx, identity, request)
        python = interpreter(ctx, env)
        source = bundle(CHILD_SOURCE_PATH, source_text or probe_source())  # the read-only guard first
    except ProbeSetupError as exc:
        return ProbeResult(ok=False, error_kind=exc.kind, error=scrub(str(exc), secrets))
    env[REQUEST_ENV] = json.dumps(doc)
    cwd = probe_start_dir(ctx)
    read_fd, write_fd = os.pipe()
    argv = [python, "-B", "-c", source, str(write_fd)]
    try:
        try:
            proc = subprocess.Popen(
                argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(write_fd,),
                start_new_session=True, **drop)
        except OSError as exc:
            who = f" as {identity.name}" if drop else ""
            return ProbeResult(ok=False, error_kind="privileges" if isinstance(
                exc, PermissionError) else "app_load",
                error=scrub(f"cannot start {python}{who} in {cwd}: "
                            f"{exc.strerror or exc}", secrets),
                duration=round(time.monotonic() - started, 3))
        os.close(write_fd)
        write_fd = -1
        try:
            raw, tail, timed_out = _collect(proc, read_fd, started + timeout)
        finally:
            _kill_group(proc)  # also ends anything the app left running in the group
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)
    return raw, proc.returncode, tail.decode("utf-8", "replace"), timed_out


def run_probe(ctx: AppContext, request: ProbeRequest, timeout: float) -> ProbeResult:
    """Load the app in the unit's exact context in a child process and report what it found."""
    started = time.monotonic()
    secrets = secret_values(ctx.environment)
    ran = _run_child(ctx, request, child_request(ctx, request), timeout, secrets)
    if isinstance(ran, ProbeResult):
        return ran
    raw, returncode, tail, timed_out = ran
    result = parse_report(raw, returncode, tail, timed_out=timed_out, timeout=timeout,
                          duration=time.monotonic() - started, secrets=secrets)
    return unreadable_as_stand_in(ctx, request, result)


# Where a Flask app usually takes its URL from (the app itself could not say).
URL_VARIABLES = ("DATABASE_URL", "SQLALCHEMY_DATABASE_URI")


def stands_in(ctx: AppContext) -> bool:
    """Pure: the unit has no User= (it runs as root), so per-unit work runs as a stand-in."""
    return not ctx.user and not ctx.dynamic_user


def environment_url(env: Mapping[str, str]) -> tuple[str, str]:
    """Pure: (variable, URL) of the first database URL the unit's environment names."""
    for name in URL_VARIABLES:
        value = env.get(name, "").strip()
        if "://" in value:
            return name, value
    return "", ""


_DENIED = re.compile(r"Permission denied: '([^']+)'|cannot enter the working directory (\S+):")


def unreadable_as_stand_in(ctx: AppContext, request: ProbeRequest, result: ProbeResult,
                           ) -> ProbeResult:
    """Pure: a unit without User= is probed as a stand-in user (a dynamic user, or
    probe_user); when that user cannot read a file the app needs, say which and the fix."""
    if not stands_in(ctx) or result.ok:
        return result
    found = _DENIED.search(result.error) or _DENIED.search(result.output_tail)
    if not found:
        return result
    path = found.group(1) or found.group(2)
    who = f"probe_user {request.probe_user}" if request.probe_user else \
        "a dynamic user (DynamicUser=yes)"
    error = (f"{ctx.unit} has no User= (it runs as root); the probe never loads app code as "
             f"root and ran as {who}, which cannot read {path}")
    urls = dict(result.urls)
    if not urls:
        # The revision state is still one query away: the database the unit's environment
        # names, read by the agent's session as the same stand-in user (never as root).
        name, url = environment_url(ctx.environment)
        if url:
            urls = {"default": url}
            error += f"; revision state read from the database {name} names"
    if result.revisions:
        error += ", revisions from the migration files"
    elif result.revisions_error:
        error += f" ({result.revisions_error})"
    return replace(result, error_kind="privileges", error=error, urls=urls)


# -- gunicorn's configuration alone (agentctl exec / upgrade) ---------------------------------

def resolve_request(ctx: AppContext, allow_root: bool = False) -> dict[str, Any]:
    """The child request for a resolve-only run: gunicorn's settings, no app import."""
    request = ProbeRequest(compare_schema=False, include_revisions=False,
                           allow_root=allow_root)
    return {**child_request(ctx, request), "resolve_only": True}


def parse_resolved(raw: bytes, returncode: int | None, tail: str, *, timed_out: bool,
                   timeout: float, duration: float, secrets: Iterable[str] = (),
                   ) -> ResolvedConfig:
    """A resolve-only child's report -> ResolvedConfig; every message scrubbed, with the
    raw_env values themselves among the secrets masked."""
    doc: dict[str, Any] = {}
    if raw and not timed_out:
        try:
            loaded = json.loads(raw)
            doc = loaded if isinstance(loaded, dict) else {}
        except ValueError:
            doc = {}
    raw_env = doc.get("raw_env") if isinstance(doc.get("raw_env"), dict) else {}
    raw_env = {str(k): str(v) for k, v in raw_env.items()}
    # Every raw_env value is masked in messages, secret-named or not (it never leaves).
    secrets = sorted(set(secrets) | set(secret_values(raw_env)) |
                     {v for v in raw_env.values() if len(v) >= 4}, key=len, reverse=True)
    duration = round(duration, 3)
    if not doc or doc.get("protocol") != PROTOCOL:
        result = parse_report(raw, returncode, tail, timed_out=timed_out, timeout=timeout,
                              duration=duration, secrets=secrets)
        error = result.error if result.error else "the probe's report is not usable"
        if timed_out:
            error = f"resolving gunicorn's configuration timed out after {timeout:g} s"
        return ResolvedConfig(error=scrub(error, secrets), duration=duration)
    if doc.get("error"):
        return ResolvedConfig(error=scrub(str(doc["error"]), secrets), duration=duration)
    source = str(doc.get("config_source") or "")
    return ResolvedConfig(
        config_source=source if source in CONFIG_SOURCES else "",
        gunicorn_config=str(doc.get("gunicorn_config") or ""),
        chdir=str(doc.get("chdir") or ""),
        pythonpath=tuple(str(p) for p in doc.get("pythonpath") or ()),
        app_uri=str(doc.get("app_uri") or ""),
        raw_env=raw_env if source == "gunicorn config" else {}, duration=duration)


def resolve_gunicorn_config(ctx: AppContext, timeout: float, allow_root: bool = False,
                            ) -> ResolvedConfig | None:
    """gunicorn's effective chdir, pythonpath, raw_env and app for the unit, resolved by
    gunicorn's own machinery in the app's interpreter as the unit's user (the probe child in
    resolve-only mode: the config file runs, the app is never imported).

    None when there is nothing to resolve: the unit does not run gunicorn, or its interpreter
    is unknown. A result with config_source "ExecStart" means the interpreter cannot import
    gunicorn (the ExecStart analysis stands); a result with error means the configuration
    itself failed (a broken config file, a timeout), the message scrubbed.
    """
    if not ctx.launch.runs_gunicorn or not (ctx.python or ctx.venv):
        return None
    started = time.monotonic()
    secrets = secret_values(ctx.environment)
    request = ProbeRequest(compare_schema=False, include_revisions=False,
                           allow_root=allow_root)
    ran = _run_child(ctx, request, resolve_request(ctx, allow_root), timeout, secrets)
    if isinstance(ran, ProbeResult):
        return ResolvedConfig(error=ran.error, duration=ran.duration)
    raw, returncode, tail, timed_out = ran
    return parse_resolved(raw, returncode, tail, timed_out=timed_out, timeout=timeout,
                          duration=time.monotonic() - started, secrets=secrets)


# -- memoisation ------------------------------------------------------------------------------

_SKIP_DIRS = {"__pycache__", "node_modules", "site-packages", ".git", ".hg", ".tox"}


def _stat_files(root: str, want: Callable[[str], bool], limit: int) -> list[str]:
    """'path mtime_ns size' lines for wanted files under root, sorted walk, at most limit."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Skip venvs (pyvenv.cfg), caches and hidden dirs: they are not the app's code.
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and
                             not d.startswith(".") and
                             not os.path.exists(os.path.join(dirpath, d, "pyvenv.cfg")))
        for name in sorted(filenames):
            if not want(name):
                continue
            path = os.path.join(dirpath, name)
            try:
                # lstat: root never follows the app user's symlinks (whether the probe runs
                # again would tell that user when a root-only file changed).
                st = os.lstat(path)
            except OSError:
                continue
            out.append(f"{path} {st.st_mtime_ns} {st.st_size}")
            if len(out) >= limit:
                out.append("(truncated)")
                return out
    return out


def fingerprint(ctx: AppContext, migrations_dir: str = "", max_files: int = 2000) -> str:
    """Hash of everything a probe result depends on, to memoise it until something changes."""
    h = hashlib.sha256()
    h.update(json.dumps({
        "env": sorted(ctx.environment.items()), "cwd": ctx.app_directory,
        "venv": ctx.venv, "python": ctx.python, "user": ctx.user, "group": ctx.group,
        "groups": list(ctx.supplementary_groups), "app": ctx.launch.app_spec,
        "gunicorn_env": list(ctx.launch.gunicorn_env),
        "gunicorn_args": list(ctx.launch.gunicorn_args),
        # The transient unit's settings (credentials, sandboxing) change what the app sees.
        "settings": ctx.exec_settings,
    }, sort_keys=True, default=str).encode())
    lines: list[str] = []
    for entry in ctx.exec_settings.get("LoadCredential") or ():
        source = str(entry[1]) if len(entry) > 1 else ""
        if source.startswith("/"):  # a changed credential file (a new URL) counts too
            try:
                st = os.stat(source)
                lines.append(f"credential {source} {st.st_mtime_ns} {st.st_size}")
            except OSError:
                lines.append(f"credential {source} missing")
    # The app user's files below: lstat, never through that user's symlinks (as in
    # _stat_files). Credential sources above are root's, read by systemd as root.
    # gunicorn's config files (settings, raw_env, chdir) and uvicorn's --env-file
    for path in [*gunicorn_config_files(ctx), *filter(None, [ctx.launch.env_file])]:
        try:
            st = os.lstat(path)
            lines.append(f"{path} {st.st_mtime_ns} {st.st_size}")
        except OSError:
            lines.append(f"{path} missing")
    if migrations_dir:
        lines += _stat_files(migrations_dir, lambda n: not n.endswith((".pyc", ".pyo")),
                             max_files)
    if ctx.app_directory:
        lines += _stat_files(ctx.app_directory, lambda n: n.endswith(".py"), max_files)
    # An installed or upgraded package changes its site-packages directory's mtime.
    site = sorted(str(p) for p in Path(ctx.venv).glob("lib/python*/site-packages")) \
        if ctx.venv else []
    for extra in (ctx.venv and os.path.join(ctx.venv, "pyvenv.cfg"), ctx.python, *site):
        if extra:
            try:
                st = os.lstat(extra)
                lines.append(f"{extra} {st.st_mtime_ns} {st.st_size}")
            except OSError:
                lines.append(f"{extra} missing")
    h.update("\n".join(lines).encode())
    return h.hexdigest()
