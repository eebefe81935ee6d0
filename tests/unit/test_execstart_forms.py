"""ExecStart forms: every way a unit starts gunicorn is recognised, with its app and venv
(literal forms, then generated command lines and shell wrappers)."""

from __future__ import annotations

import shlex

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.execstart import analyse_exec_start, parse_gunicorn_args, runs_gunicorn
from agent.model import ExecCommand

VENV = "/srv/app/venv"


def cmd(*argv: str) -> ExecCommand:
    return ExecCommand(path=argv[0], argv=tuple(argv))


@pytest.mark.parametrize("python", ["python", "python3", "python3.11", "python3.12",
                                    "python2.7"])
@pytest.mark.parametrize("flags", [[], ["-u"], ["-I"], ["-OO", "-B"], ["-X", "dev"],
                                   ["-W", "ignore"]])
def test_python_m_gunicorn_every_interpreter_name(python: str, flags: list[str]) -> None:
    spec = analyse_exec_start([cmd(f"{VENV}/bin/{python}", *flags, "-m", "gunicorn", "-w", "2",
                                   "wsgi:app")])
    assert spec.runs_gunicorn
    assert spec.python == f"{VENV}/bin/{python}"
    assert spec.venv == VENV
    assert spec.app_spec == "wsgi:app"


@pytest.mark.parametrize("argv", [
    [f"{VENV}/bin/python3", "-mgunicorn", "wsgi:app"],
    [f"{VENV}/bin/gunicorn3", "wsgi:app"],
    ["/usr/bin/env", f"{VENV}/bin/gunicorn", "wsgi:app"],
    ["/usr/bin/env", "-i", "A=1", f"{VENV}/bin/gunicorn", "wsgi:app"],
])
def test_other_gunicorn_forms(argv: list[str]) -> None:
    spec = analyse_exec_start([cmd(*argv)])
    assert spec.runs_gunicorn and spec.app_spec == "wsgi:app"


@pytest.mark.parametrize("argv", [
    [f"{VENV}/bin/python3", "-m", "uvicorn", "app:app"],
    [f"{VENV}/bin/python3", "manage.py", "runserver"],
    [f"{VENV}/bin/pythonista", "-m", "gunicorn", "wsgi:app"],
    [f"{VENV}/bin/python3", "-c", "import gunicorn"],
    ["/bin/sh", "-c", "exec uwsgi --ini app.ini"],
])
def test_not_gunicorn(argv: list[str]) -> None:
    assert not runs_gunicorn([cmd(*argv)])


def test_preliminary_commands_are_not_the_main_one() -> None:
    spec = analyse_exec_start([cmd("/bin/true"), cmd(f"{VENV}/bin/gunicorn", "wsgi:app")])
    assert spec.program == f"{VENV}/bin/gunicorn"


@pytest.mark.parametrize(("args", "expected"), [
    (["-e", "A=1", "--env", "B=2", "--env=C=3", "-eD=4"], ["A=1", "B=2", "C=3", "D=4"]),
    (["--preload", "wsgi:app", "-e", "X=1"], ["X=1"]),
])
def test_gunicorn_env_values(args: list[str], expected: list[str]) -> None:
    assert parse_gunicorn_args(args)["env"] == expected


# -- generated ---------------------------------------------------------------------------
APPS = st.sampled_from(["wsgi:app", "app:create_app()", "pkg.mod:application",
                        "app:create_app('prod')"])
OPTIONS = st.lists(st.sampled_from([
    ["-w", "4"], ["--workers=3"], ["-b", "unix:/run/app.sock"], ["--bind", "127.0.0.1:8000"],
    ["--preload"], ["-k", "gthread"], ["--timeout", "30"], ["-e", "SECRET_KEY=x"],
    ["--access-logfile", "-"], ["--chdir", "/srv/app/current"], ["-c", "gunicorn.conf.py"],
    ["--reload"], ["-w4"], ["--name=app"]]), max_size=5)
PYTHONS = st.sampled_from(["python", "python3", "python3.11", "python3.13"])
PY_FLAGS = st.sampled_from([[], ["-u"], ["-I", "-B"], ["-X", "importtime"], ["-W", "error"]])


def _flat(options: list[list[str]]) -> list[str]:
    return [word for option in options for word in option]


@given(app=APPS, options=OPTIONS, python=PYTHONS, flags=PY_FLAGS,
       form=st.sampled_from(["script", "python-m", "sh-exec", "sh-activate", "env"]),
       app_first=st.booleans())
def test_generated_exec_start(app: str, options: list[list[str]], python: str,
                              flags: list[str], form: str, app_first: bool) -> None:
    gargs = [app, *_flat(options)] if app_first else [*_flat(options), app]
    if form == "script":
        argv = [f"{VENV}/bin/gunicorn", *gargs]
    elif form == "python-m":
        argv = [f"{VENV}/bin/{python}", *flags, "-m", "gunicorn", *gargs]
    elif form == "env":
        argv = ["/usr/bin/env", "PYTHONUNBUFFERED=1", f"{VENV}/bin/gunicorn", *gargs]
    elif form == "sh-exec":
        argv = ["/bin/sh", "-c", "cd /srv/app && exec " + shlex.join(
            [f"{VENV}/bin/gunicorn", *gargs])]
    else:
        argv = ["/bin/bash", "-c", f". {VENV}/bin/activate && exec " + shlex.join(
            ["gunicorn", *gargs])]
    spec = analyse_exec_start([cmd(*argv)], working_directory="/srv/app")
    assert spec.runs_gunicorn, argv
    assert spec.app_spec == app, argv
    assert spec.venv == VENV, argv
    if ["--chdir", "/srv/app/current"] in options:
        assert spec.chdir == "/srv/app/current"
    if ["-e", "SECRET_KEY=x"] in options:
        assert "SECRET_KEY=x" in spec.gunicorn_env
    assert spec.shell_wrapped is form.startswith("sh-")


# -- whole LaunchSpecs for literal forms -----------------------------------------------
def spec(**fields: object) -> object:
    from agent.execstart import LaunchSpec
    base: dict[str, object] = dict(argv=(), runs_gunicorn=True, program="", python="",
                                   venv="", venv_source="", app_spec="", chdir="",
                                   config_file="", gunicorn_env=(), gunicorn_args=(),
                                   start_dir="", shell_wrapped=False, notes=())
    base.update(fields)
    return LaunchSpec(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(("commands", "workdir", "expected"), [
    ([], "/srv", spec(runs_gunicorn=False, notes=("the unit has no ExecStart",))),
    ([cmd("/bin/sh", "-c", "cd /srv && exec uwsgi app.ini")], "/srv",
     spec(argv=("/bin/sh", "-c", "cd /srv && exec uwsgi app.ini"), runs_gunicorn=False,
          program="/bin/sh", shell_wrapped=True,
          notes=("a shell wrapper that does not visibly start gunicorn",))),
    ([cmd("/bin/sh", "-c")], "/srv",
     spec(argv=("/bin/sh", "-c"), runs_gunicorn=False, program="/bin/sh", shell_wrapped=True,
          notes=("a shell wrapper that does not visibly start gunicorn",))),
    ([cmd("venv/bin/gunicorn", "-c", "conf.py", "--chdir", "app", "wsgi:app")], "/srv/site",
     spec(argv=("venv/bin/gunicorn", "-c", "conf.py", "--chdir", "app", "wsgi:app"),
          program="/srv/site/venv/bin/gunicorn", venv="/srv/site/venv",
          venv_source="ExecStart program path", app_spec="wsgi:app", chdir="/srv/site/app",
          config_file="/srv/site/conf.py",
          gunicorn_args=("-c", "conf.py", "--chdir", "app", "wsgi:app"),
          start_dir="/srv/site")),
    ([cmd("/bin/bash", "-c", "cd /srv/site; source venv/bin/activate || exit 1; "
          "exec gunicorn -e A=1 -c g.py wsgi:app")], "/srv",
     spec(argv=("gunicorn", "-e", "A=1", "-c", "g.py", "wsgi:app"), program="gunicorn",
          venv="/srv/site/venv", venv_source="activate script sourced in ExecStart",
          app_spec="wsgi:app", chdir="/srv/site", config_file="/srv/site/g.py",
          gunicorn_env=("A=1",), gunicorn_args=("-e", "A=1", "-c", "g.py", "wsgi:app"),
          start_dir="/srv/site", shell_wrapped=True)),
    ([cmd("/usr/bin/env", "-i", "FOO=1", "/opt/v/bin/python3", "-m", "gunicorn", "--",
          "wsgi:app")], "",
     spec(argv=("/opt/v/bin/python3", "-m", "gunicorn", "--", "wsgi:app"),
          program="/opt/v/bin/python3", python="/opt/v/bin/python3", venv="/opt/v",
          venv_source="ExecStart program path", app_spec="wsgi:app",
          gunicorn_args=("--", "wsgi:app"))),
    ([cmd("gunicorn", "wsgi:app")], "/srv",
     spec(argv=("gunicorn", "wsgi:app"), program="gunicorn", app_spec="wsgi:app",
          gunicorn_args=("wsgi:app",), start_dir="/srv")),
    ([cmd("/bin/mkdir", "-p", "/run/app"),
      cmd("/bin/sh", "-c", "exec /opt/v/bin/gunicorn x:y & wait")], "/",
     spec(argv=("/opt/v/bin/gunicorn", "x:y"), program="/opt/v/bin/gunicorn", venv="/opt/v",
          venv_source="ExecStart program path", app_spec="x:y", gunicorn_args=("x:y",),
          start_dir="/", shell_wrapped=True)),
])
def test_launch_spec_in_full(commands: list[ExecCommand], workdir: str,
                             expected: object) -> None:
    assert analyse_exec_start(commands, workdir) == expected


def test_parse_gunicorn_args_in_full() -> None:
    assert parse_gunicorn_args(
        ["-w4", "--bind=0:1", "-c", "c.py", "--config", "d.py", "--chdir", "/a", "-e", "X=1",
         "--env=Y=2", "--preload", "app:x", "extra", "--", "ignored"]) == {
        "app_spec": "app:x", "chdir": "/a", "config_file": "d.py", "env": ["X=1", "Y=2"]}
    assert parse_gunicorn_args(["--", "app:y"])["app_spec"] == "app:y"
    assert parse_gunicorn_args(["-k"]) == {"app_spec": "", "chdir": "", "config_file": "",
                                           "env": []}


def test_small_helpers() -> None:
    from agent.execstart import split_env_assignment, venv_of_interpreter
    assert venv_of_interpreter("/srv/v/bin/python3") == "/srv/v"
    assert venv_of_interpreter("") == "" and venv_of_interpreter("/usr/python3") == ""
    assert split_env_assignment("A=b=c") == ("A", "b=c")
    assert split_env_assignment("WORD") == ("WORD", "")
    assert runs_gunicorn([cmd("/bin/sh", "-c", "exec gunicorn app:app")])
    assert not runs_gunicorn([cmd("/bin/sh", "-c", "echo gunicorn")])
    assert not runs_gunicorn([])


def test_a_shell_wrapper_mentioning_gunicorn_is_the_main_command() -> None:
    s = analyse_exec_start([cmd("/bin/sh", "-c", "exec gunicorn app:app"), cmd("/bin/true")])
    assert s.runs_gunicorn and s.shell_wrapped and s.app_spec == "app:app"
    # Without '-c', or from a non-shell, or not mentioning gunicorn: the last command.
    for first in (cmd("/bin/sh", "gunicorn.sh"), cmd("/bin/echo", "-c", "gunicorn"),
                  cmd("/bin/sh", "-c", "echo starting")):
        assert analyse_exec_start([first, cmd("/bin/true")]).program == "/bin/true"


@pytest.mark.parametrize("script", [
    "true; exec gunicorn 'app:app'", "true || exec gunicorn app:app",
    "true && exec gunicorn app:app", "true&&exec gunicorn app:app", "sleep 1 & exec gunicorn app:app",
    "echo x | exec gunicorn app:app", "true\nexec gunicorn app:app",
    "case x in x) true;; esac; exec gunicorn app:app"])
def test_shell_separators(script: str) -> None:
    s = analyse_exec_start([cmd("/bin/sh", "-c", script)])
    assert s.runs_gunicorn and s.app_spec == "app:app" and s.program == "gunicorn"


@pytest.mark.parametrize("script", ["exec env -i A=1 B=2 gunicorn app:app",
                                    "A=1 exec gunicorn app:app", "exec A=1 gunicorn app:app",
                                    "env A=1 -u B gunicorn app:app"])
def test_shell_prefixes(script: str) -> None:
    s = analyse_exec_start([cmd("/bin/sh", "-c", script)])
    assert s.runs_gunicorn and s.argv == ("gunicorn", "app:app")
