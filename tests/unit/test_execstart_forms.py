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
