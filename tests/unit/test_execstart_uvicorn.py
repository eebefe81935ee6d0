"""Units whose ExecStart runs uvicorn directly: found, and read like gunicorn ones."""

from __future__ import annotations

import pytest

from agent.execstart import (
    analyse_exec_start,
    parse_uvicorn_args,
    runs_app_server,
    runs_gunicorn,
)
from agent.model import ExecCommand


def cmd(*argv: str) -> ExecCommand:
    return ExecCommand(argv[0], tuple(argv))


@pytest.mark.parametrize("argv", [
    ("/srv/shop/venv/bin/uvicorn", "shop.main:app", "--host", "127.0.0.1", "--port", "8000"),
    ("/srv/shop/venv/bin/python", "-m", "uvicorn", "shop.main:app", "--port", "8000"),
    ("/srv/shop/venv/bin/python3", "-u", "-muvicorn", "--port=8000", "shop.main:app"),
    ("/usr/bin/env", "PYTHONUNBUFFERED=1", "/srv/shop/venv/bin/uvicorn", "--workers", "4",
     "--proxy-headers", "shop.main:app"),
])
def test_uvicorn_run_directly_is_an_app_server_with_its_app_and_venv(
        argv: tuple[str, ...]) -> None:
    spec = analyse_exec_start([cmd(*argv)], "/srv/shop")
    assert spec.server == "uvicorn" and spec.runs_uvicorn and not spec.runs_gunicorn
    assert spec.app_spec == "shop.main:app"
    assert spec.venv == "/srv/shop/venv" and spec.venv_source == "ExecStart program path"
    assert spec.gunicorn_args == () and spec.chdir == ""  # uvicorn never changes directory
    assert runs_app_server([cmd(*argv)]) and not runs_gunicorn([cmd(*argv)])


def test_uvicorn_in_a_shell_wrapper() -> None:
    spec = analyse_exec_start([cmd("/bin/sh", "-c", "cd /srv/shop && . venv/bin/activate && "
                                                    "exec uvicorn --factory app:create")], "/")
    assert spec.server == "uvicorn" and spec.shell_wrapped
    assert spec.app_spec == "app:create()"  # --factory: uvicorn calls it, as gunicorn would
    assert spec.venv == "/srv/shop/venv" and spec.start_dir == "/srv/shop"


def test_app_dir_and_env_file_against_where_uvicorn_starts() -> None:
    spec = analyse_exec_start([cmd("/v/bin/uvicorn", "--app-dir", "src", "--env-file=.env",
                                   "--reload", "main:app")], "/srv/shop")
    assert spec.app_spec == "main:app"
    assert spec.pythonpath == ("/srv/shop/src",) and spec.env_file == "/srv/shop/.env"


def test_uvicorn_options_and_flags() -> None:
    assert parse_uvicorn_args(["--log-level", "info", "--no-access-log", "--", "m:a"]) == {
        "app_spec": "m:a", "app_dir": "", "env_file": "", "factory": False}
    assert parse_uvicorn_args(["--factory", "m:make()", "--uds", "/run/s.sock"])[
        "app_spec"] == "m:make()"
    # gunicorn with uvicorn workers stays a gunicorn unit.
    spec = analyse_exec_start([cmd("/v/bin/gunicorn", "-k", "uvicorn.workers.UvicornWorker",
                                   "m:app")], "/srv")
    assert spec.server == "gunicorn" and spec.app_spec == "m:app"
    # Something else named in a wrapper is neither.
    assert not runs_app_server([cmd("/usr/bin/python3", "-m", "http.server")])


def test_probe_does_what_uvicorn_does_before_the_import(tmp_path: object) -> None:
    import sys

    from agent.asuser import probe_child as child

    report: dict[str, object] = {}
    saved = list(sys.path)
    try:
        child.uvicorn_setup({"pythonpath": ["/srv/shop/src"]}, report)
        assert sys.path[0] == "/srv/shop/src" and report["pythonpath"] == ["/srv/shop/src"]
    finally:
        sys.path[:] = saved
    try:
        import dotenv  # noqa: F401
    except ImportError:  # the agent's venv has no python-dotenv: the app's error, named
        with pytest.raises(child.ProbeError, match="--env-file /srv/.env needs python-dotenv"
                           ) as err:
            child.uvicorn_setup({"env_file": "/srv/.env"}, {})
        assert err.value.kind == "app_load"


def test_env_file_is_in_the_probe_fingerprint(tmp_path: object) -> None:
    from pathlib import Path

    from agent.context import AppContext
    from agent.privileged.probe_runner import fingerprint

    env = Path(str(tmp_path)) / ".env"
    env.write_text("A=1\n")
    launch = analyse_exec_start([cmd("/v/bin/uvicorn", "--env-file", str(env), "m:app")],
                                str(tmp_path))
    ctx = AppContext(unit="shop.service", user="", group="", supplementary_groups=(),
                     working_directory=str(tmp_path), working_directory_optional=False,
                     exec_start=launch.argv, launch=launch, venv="", venv_source="",
                     python="", environment={}, environment_sources={},
                     environment_files=(), main_pid=0)
    before = fingerprint(ctx)
    env.write_text("A=22\n")
    assert fingerprint(ctx) != before
