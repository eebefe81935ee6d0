"""Pure: what an ExecStart= command line launches (gunicorn or uvicorn, its app, its
virtualenv)."""

from __future__ import annotations

import posixpath
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from agent.model import ExecCommand

SHELLS = {"sh", "bash", "dash", "zsh", "ksh"}
# Gunicorn options that take no value; every other option consumes one (unless "--x=y").
GUNICORN_FLAGS = {
    "--preload", "--reload", "-R", "-D", "--daemon", "--capture-output",
    "--enable-stdio-inheritance", "--proxy-protocol", "--check-config", "--print-config",
    "--spew", "--no-sendfile", "--reuse-port", "--strip-header-spaces",
    "--suppress-ragged-eofs", "--do-handshake-on-connect", "--log-syslog", "--initgroups",
    "--disable-redirect-access-to-syslog", "--paste-global", "-v", "--version", "-h",
    "--help", "--no-control-socket", "--permit-obsolete-folding",
    "--permit-unconventional-http-method", "--permit-unconventional-http-version",
    "--casefold-http-method", "--header-map",
}
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
# uvicorn's options that take no value (uvicorn/main.py, click is_flag / --x/--no-x pairs);
# every other option consumes one (unless "--x=y"). uvicorn has no short options.
UVICORN_FLAGS = {
    "--reload", "--factory", "--version", "--help",
    "--use-colors", "--no-use-colors", "--proxy-headers", "--no-proxy-headers",
    "--server-header", "--no-server-header", "--date-header", "--no-date-header",
    "--access-log", "--no-access-log",
}
# The app servers whose command line names the app: their module names for "python -m".
SERVERS = ("gunicorn", "uvicorn")


@dataclass(frozen=True)
class LaunchSpec:
    """What the unit's main command runs, as far as the command line tells."""

    argv: tuple[str, ...]              # the gunicorn-running argv after unwrapping shells
    runs_gunicorn: bool
    runs_uvicorn: bool = False         # uvicorn run directly (not as gunicorn's worker)
    program: str = ""                  # the executable named on the command line
    python: str = ""                   # the interpreter when run as "python -m gunicorn"
    venv: str = ""                     # the virtualenv the command line points into
    venv_source: str = ""              # how the venv was found, for the report
    app_spec: str = ""                 # gunicorn's "module:variable" or "module:factory()"
    chdir: str = ""                    # gunicorn --chdir, or a "cd DIR &&" in a shell wrapper
    config_file: str = ""              # gunicorn -c FILE
    gunicorn_env: tuple[str, ...] = () # gunicorn -e/--env KEY=VALUE, given to the app
    gunicorn_args: tuple[str, ...] = ()  # everything after gunicorn itself, verbatim
    start_dir: str = ""                # where gunicorn starts: a shell wrapper's cd, else
                                       # WorkingDirectory= (before any --chdir)
    shell_wrapped: bool = False
    notes: tuple[str, ...] = field(default=())
    pythonpath: tuple[str, ...] = ()   # uvicorn --app-dir (first on sys.path, no chdir)
    env_file: str = ""                 # uvicorn --env-file (loaded by uvicorn, python-dotenv)

    @property
    def server(self) -> str:
        """The app server the unit runs: "gunicorn", "uvicorn" or ""."""
        return "gunicorn" if self.runs_gunicorn else "uvicorn" if self.runs_uvicorn else ""


def _basename(word: str) -> str:
    return posixpath.basename(word)


def _absolute(path: str, cwd: str) -> str:
    """Resolve a path against a working directory without touching the filesystem."""
    if not path:
        return path
    if posixpath.isabs(path):
        return posixpath.normpath(path)
    return posixpath.normpath(posixpath.join(cwd or "/", path))


def _venv_from_bin(path: str) -> str:
    """'/srv/app/venv/bin/gunicorn' -> '/srv/app/venv' (a candidate; the caller checks it)."""
    parent = posixpath.dirname(path)
    if posixpath.basename(parent) == "bin":
        return posixpath.dirname(parent)
    return ""


def _shell_segments(script: str) -> list[list[str]]:
    """Split a 'sh -c' script into simple commands on &&, ||, ; and newlines."""
    try:
        # A newline ends a command like ';' does (outside quotes).
        lexer = shlex.shlex(script, posix=True, punctuation_chars=";&|\n")
        lexer.whitespace = " \t\r"
        lexer.whitespace_split = True
        words = list(lexer)
    except ValueError:
        return [script.split()]
    segments: list[list[str]] = [[]]
    for word in words:
        if word in (";", "&&", "||", "&", "|", ";;") or (word and not word.strip("\n;")):
            segments.append([])
        else:
            segments[-1].append(word)
    return [s for s in segments if s]


def _strip_prefixes(argv: list[str]) -> list[str]:
    """Drop 'exec', 'env [-i] K=V ...' and leading K=V assignments before the real program."""
    out = list(argv)
    while out:
        head = _basename(out[0])
        if out[0] == "exec":
            out = out[1:]
        elif head == "env":
            out = out[1:]
            while out and (out[0].startswith("-") or ASSIGNMENT.match(out[0])):
                # -u NAME and -C DIR take the next word as their value.
                out = out[2:] if out[0] in ("-u", "-C", "--unset", "--chdir") else out[1:]
        elif ASSIGNMENT.match(out[0]):
            out = out[1:]
        else:
            break
    return out


def _is_python(word: str) -> bool:
    return re.fullmatch(r"python(\d+(\.\d+)?)?", _basename(word)) is not None


def _gunicorn_args(argv: Sequence[str]) -> list[str] | None:
    """The arguments after gunicorn itself, or None when argv does not run gunicorn."""
    found = _server_args(argv)
    return found[1] if found and found[0] == "gunicorn" else None


def _server_args(argv: Sequence[str]) -> tuple[str, list[str]] | None:
    """(server, the arguments after it) when argv runs gunicorn or uvicorn, directly or as
    'python -m SERVER', else None."""
    if not argv:
        return None
    for server in SERVERS:
        if _basename(argv[0]).startswith(server):
            return server, list(argv[1:])
    if _is_python(argv[0]):
        return _python_m(list(argv[1:]))
    return None


def _python_m_gunicorn(args: list[str]) -> list[str] | None:
    """The arguments after 'python [options] -m gunicorn' (None for anything else)."""
    found = _python_m(args)
    return found[1] if found and found[0] == "gunicorn" else None


def _python_m(args: list[str]) -> tuple[str, list[str]] | None:
    """(server, the arguments after 'python [options] -m SERVER'), read with Python's own
    option grammar: grouped flags (-uB), options with a value (-W x, -X dev, glued
    -Wignore), -m MODULE or -mMODULE; a script or -c ends the options without a server."""
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--check-hash-based-pycs":
            i += 2
            continue
        if not arg.startswith("-") or arg == "-":
            return None                       # a script (or stdin): not python -m
        if arg.startswith("--"):
            i += 1
            continue
        letters = arg[1:]
        for j, letter in enumerate(letters):
            glued = letters[j + 1:]
            if letter == "m":
                module = glued or (args[i + 1] if i + 1 < len(args) else "")
                if module not in SERVERS:
                    return None
                return module, (args[i + 1:] if glued else args[i + 2:])
            if letter == "c":
                return None
            if letter in "WX":
                if not glued:
                    i += 1                    # its value is the next word
                break
        i += 1
    return None


@dataclass(frozen=True)
class OptionGrammar:
    """One app server's option grammar, as far as reading its app and paths needs."""

    flags: frozenset[str]              # options that take no value; all others take one
    glued_short: bool                  # "-w4": a short option glued to its value
    values: Mapping[str, str]          # option -> result key; the last one given wins
    lists: Mapping[str, str] = field(default_factory=dict)     # option -> key, every one kept
    switches: Mapping[str, str] = field(default_factory=dict)  # flag -> key, True when given


GUNICORN = OptionGrammar(
    # gunicorn's reader here has always passed over a lone "-" (never an app spec).
    flags=frozenset(GUNICORN_FLAGS | {"-"}), glued_short=True,
    values={"--chdir": "chdir", "-c": "config_file", "--config": "config_file"},
    lists={"-e": "env", "--env": "env"})
UVICORN = OptionGrammar(
    flags=frozenset(UVICORN_FLAGS), glued_short=False,  # uvicorn has no short options
    values={"--app-dir": "app_dir", "--env-file": "env_file"},
    switches={"--factory": "factory"})


def read_options(args: Sequence[str], grammar: OptionGrammar) -> dict[str, object]:
    """Pure: the app spec (first positional, or the word after "--") and the options the
    grammar keeps, read the way the server reads its command line."""
    found: dict[str, object] = {"app_spec": ""}
    found.update({key: "" for key in grammar.values.values()})
    found.update({key: [] for key in grammar.lists.values()})
    found.update({key: False for key in grammar.switches.values()})
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest = args[i + 1:]
            if rest and not found["app_spec"]:
                found["app_spec"] = rest[0]
            break
        if arg.startswith("--") and "=" in arg:
            key, value = arg.split("=", 1)
            i += 1
        elif arg in grammar.flags:
            if arg in grammar.switches:
                found[grammar.switches[arg]] = True
            i += 1
            continue
        elif arg.startswith("-") and len(arg) > 1:
            if grammar.glued_short and not arg.startswith("--") and len(arg) > 2:
                key, value = arg[:2], arg[2:]   # short option glued to its value: -w4
                i += 1
            else:
                key, value = arg, (args[i + 1] if i + 1 < len(args) else "")
                i += 2
        else:
            if not found["app_spec"]:
                found["app_spec"] = arg
            i += 1
            continue
        if key in grammar.values:
            found[grammar.values[key]] = value
        elif key in grammar.lists:
            found[grammar.lists[key]].append(value)  # type: ignore[attr-defined]
    return found


def parse_gunicorn_args(args: Sequence[str]) -> dict[str, object]:
    """Pure: app spec, --chdir, -c and -e values from gunicorn's own arguments."""
    return read_options(args, GUNICORN)


def parse_uvicorn_args(args: Sequence[str]) -> dict[str, object]:
    """Pure: the app, --app-dir, --env-file and --factory from uvicorn's own arguments.

    With --factory the app is a factory uvicorn calls without arguments: given as
    'module:factory()', the syntax gunicorn and Flask read the same way.
    """
    result = read_options(args, UVICORN)
    spec = str(result["app_spec"])
    if result["factory"] and spec and not spec.endswith(")"):
        result["app_spec"] = spec + "()"
    return result


def analyse_exec_start(commands: Sequence[ExecCommand], working_directory: str = "",
                       ) -> LaunchSpec:
    """Find the gunicorn (or uvicorn) launch in ExecStart (shell wrappers included) and what
    it implies."""
    if not commands:
        return LaunchSpec(argv=(), runs_gunicorn=False, notes=("the unit has no ExecStart",))
    main = commands[-1]
    for command in commands:
        if _server_args(_strip_prefixes(list(command.argv))) is not None or _wrapped(command):
            main = command
            break
    argv = list(main.argv) or [main.path]
    cwd = working_directory
    activate = ""
    shell_wrapped = False
    if _basename(argv[0]) in SHELLS and "-c" in argv[1:]:
        shell_wrapped = True
        script = argv[argv.index("-c") + 1] if argv.index("-c") + 1 < len(argv) else ""
        chosen: list[str] = []
        for segment in _shell_segments(script):
            segment = _strip_prefixes(segment)
            if not segment:
                continue
            if segment[0] == "cd" and len(segment) > 1:
                cwd = _absolute(segment[1], cwd)
            elif segment[0] in (".", "source") and len(segment) > 1:
                activate = _absolute(segment[1], cwd)
            elif _server_args(segment) is not None:
                chosen = segment
                break
        if not chosen:
            return LaunchSpec(argv=tuple(argv), runs_gunicorn=False, shell_wrapped=True,
                              program=argv[0],
                              notes=("a shell wrapper that does not visibly start gunicorn",))
        argv = chosen
    else:
        argv = _strip_prefixes(argv)
    found = _server_args(argv)
    server = found[0] if found else ""
    gargs = found[1] if found and server == "gunicorn" else None
    program = _absolute(argv[0], cwd) if "/" in argv[0] else argv[0]
    parsed = parse_gunicorn_args(gargs or [])
    uvicorn = parse_uvicorn_args(found[1]) if found and server == "uvicorn" else {}
    venv, source = "", ""
    python = program if _is_python(argv[0]) else ""
    if "/" in argv[0]:
        venv = _venv_from_bin(program)
        source = "ExecStart program path" if venv else ""
    if not venv and activate:
        venv = _venv_from_bin(activate)
        source = "activate script sourced in ExecStart" if venv else ""
    chdir = str(parsed["chdir"])
    app_dir, env_file = str(uvicorn.get("app_dir") or ""), str(uvicorn.get("env_file") or "")
    return LaunchSpec(
        argv=tuple(argv),
        runs_gunicorn=gargs is not None,
        runs_uvicorn=server == "uvicorn",
        program=program,
        python=python,
        venv=venv,
        venv_source=source,
        app_spec=str(uvicorn.get("app_spec") or "") if uvicorn else str(parsed["app_spec"]),
        chdir=_absolute(chdir, cwd) if chdir else (cwd if cwd != working_directory else ""),
        config_file=_absolute(str(parsed["config_file"]), cwd) if parsed["config_file"] else "",
        gunicorn_env=tuple(parsed["env"]),  # type: ignore[arg-type]
        gunicorn_args=tuple(gargs or ()),
        start_dir=cwd,
        shell_wrapped=shell_wrapped,
        # uvicorn puts --app-dir first on sys.path and reads --env-file relative to where it
        # starts (it never changes directory).
        pythonpath=(_absolute(app_dir, cwd),) if app_dir else (),
        env_file=_absolute(env_file, cwd) if env_file else "",
    )


def _wrapped(command: ExecCommand) -> bool:
    """True for 'sh -c SCRIPT' commands whose script mentions gunicorn or uvicorn."""
    argv = command.argv
    return bool(argv) and _basename(argv[0]) in SHELLS and "-c" in argv[1:] and any(
        server in a for a in argv for server in SERVERS)


def runs_gunicorn(commands: Sequence[ExecCommand]) -> bool:
    """True when any ExecStart command starts gunicorn, directly, via python -m or a shell."""
    return analyse_exec_start(commands).runs_gunicorn


def runs_app_server(commands: Sequence[ExecCommand]) -> bool:
    """True when ExecStart starts gunicorn or uvicorn (a unit the agent watches unasked)."""
    return analyse_exec_start(commands).server in SERVERS


def venv_of_interpreter(path: str) -> str:
    """'/srv/venv/bin/python3' -> '/srv/venv' candidate, '' when not under a bin/ dir."""
    return _venv_from_bin(path) if path else ""


def split_env_assignment(assignment: str) -> tuple[str, str]:
    """'KEY=VALUE' -> ('KEY', 'VALUE'); a bare word is a name with an empty value."""
    name, _, value = assignment.partition("=")
    return name, value
