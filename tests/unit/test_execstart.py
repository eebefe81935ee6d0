"""ExecStart analysis: which gunicorn, which app, which virtualenv."""

from __future__ import annotations

import pytest

from agent.execstart import analyse_exec_start, parse_gunicorn_args
from agent.model import ExecCommand


def cmd(*argv: str) -> ExecCommand:
    return ExecCommand(path=argv[0], argv=tuple(argv))


def test_venv_gunicorn_script() -> None:
    spec = analyse_exec_start([cmd("/srv/app/venv/bin/gunicorn", "--workers", "3",
                                   "--bind", "unix:/run/app.sock", "wsgi:app")])
    assert spec.runs_gunicorn
    assert spec.venv == "/srv/app/venv"
    assert spec.app_spec == "wsgi:app"
    assert spec.venv_source == "ExecStart program path"


def test_python_dash_m_gunicorn_with_factory() -> None:
    spec = analyse_exec_start([cmd("/opt/venv/bin/python3", "-m", "gunicorn", "-w", "2",
                                   "app:create_app()")])
    assert spec.runs_gunicorn
    assert spec.python == "/opt/venv/bin/python3"
    assert spec.venv == "/opt/venv"
    assert spec.app_spec == "app:create_app()"


def test_shell_wrapper_with_cd_and_activate() -> None:
    spec = analyse_exec_start(
        [cmd("/bin/sh", "-c", "cd /srv/app && . venv/bin/activate && exec gunicorn -b "
             "127.0.0.1:8000 --chdir src wsgi:application")],
        working_directory="/")
    assert spec.runs_gunicorn and spec.shell_wrapped
    assert spec.venv == "/srv/app/venv"
    assert spec.venv_source == "activate script sourced in ExecStart"
    assert spec.chdir == "/srv/app/src"
    assert spec.app_spec == "wsgi:application"


def test_gunicorn_args_and_start_dir_for_the_child() -> None:
    spec = analyse_exec_start([cmd("/srv/v/bin/gunicorn", "-c", "/etc/app/g.py")],
                              working_directory="/srv/app")
    assert spec.gunicorn_args == ("-c", "/etc/app/g.py") and spec.start_dir == "/srv/app"
    assert spec.config_file == "/etc/app/g.py" and spec.app_spec == ""
    wrapped = analyse_exec_start(
        [cmd("/bin/sh", "-c", "cd /srv/app && exec venv/bin/gunicorn --chdir src wsgi:app")],
        working_directory="/")
    assert wrapped.start_dir == "/srv/app" and wrapped.chdir == "/srv/app/src"
    assert wrapped.gunicorn_args == ("--chdir", "src", "wsgi:app")
    assert analyse_exec_start([cmd("/usr/bin/uwsgi", "x.ini")]).gunicorn_args == ()


def test_relative_program_resolved_against_working_directory() -> None:
    spec = analyse_exec_start([cmd("/bin/bash", "-c", "venv/bin/gunicorn wsgi:app")],
                              working_directory="/srv/app")
    assert spec.venv == "/srv/app/venv"


def test_env_prefix_and_assignments_are_skipped() -> None:
    spec = analyse_exec_start([cmd("/usr/bin/env", "FOO=1", "/srv/v/bin/gunicorn", "m:app")])
    assert spec.runs_gunicorn and spec.venv == "/srv/v" and spec.app_spec == "m:app"


def test_system_gunicorn_has_no_venv() -> None:
    spec = analyse_exec_start([cmd("/usr/bin/gunicorn", "wsgi:app")])
    assert spec.runs_gunicorn
    assert spec.venv == "/usr"  # a candidate only: the caller checks for pyvenv.cfg


def test_not_gunicorn() -> None:
    spec = analyse_exec_start([cmd("/usr/bin/uwsgi", "--ini", "x.ini")])
    assert not spec.runs_gunicorn


def test_no_exec_start() -> None:
    assert not analyse_exec_start([]).runs_gunicorn


@pytest.mark.parametrize("args,expected", [
    (["-c", "conf.py", "wsgi:app"], {"app_spec": "wsgi:app", "config_file": "conf.py"}),
    (["--chdir=/srv", "--preload", "wsgi:app"], {"app_spec": "wsgi:app", "chdir": "/srv"}),
    (["-w4", "-e", "A=1", "--env", "B=2", "x:y"], {"app_spec": "x:y", "env": ["A=1", "B=2"]}),
    (["--bind", "0.0.0.0:80", "--", "m:f()"], {"app_spec": "m:f()"}),
])
def test_parse_gunicorn_args(args: list[str], expected: dict[str, object]) -> None:
    parsed = parse_gunicorn_args(args)
    for key, value in expected.items():
        assert parsed[key] == value
