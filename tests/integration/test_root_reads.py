"""What root reads of the app user's files, on a real filesystem with real users.

The app's user (www-data) writes the venv, the app directory and the migration files. Root
reads them only the way systemd would: '#!' lines as the unit's user (systemd execs the
script as that user), env files as root but never a FIFO or device the user links there, and
no mtime of a file behind the user's symlink. Each hostile layout here made root hang or read
or stat a root-only file before.
"""

from __future__ import annotations

import os
import pwd
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.context import build_context
from agent.privileged.inspection import gather_inputs
from agent.model import ExecCommand, UnitProperties
from agent.privileged.probe_runner import fingerprint
from agent.privileged.sources import files
from tests.harness.apps import APP_USER, new_workspace
from tests.skiprule import skip_or_fail

SECRET = "LEAKED_ROOT_ONLY_TOKEN"


@pytest.fixture
def layout() -> Iterator[dict[str, Path]]:
    """A www-data-owned app dir with a venv, beside a root-only directory (0700)."""
    if os.geteuid() != 0:
        skip_or_fail("switching to the unit's user needs root")
    ws = new_workspace()
    app, venv_bin, private = ws / "app", ws / "venv" / "bin", ws / "root-only"
    for d in (app, venv_bin, private):
        d.mkdir(parents=True)
    (ws / "venv" / "pyvenv.cfg").write_text("home = /usr/bin\n")
    private.chmod(0o700)
    uid = pwd.getpwnam(APP_USER).pw_uid
    for d in (app, venv_bin, ws / "venv"):
        os.chown(d, uid, uid)
    yield {"ws": ws, "app": app, "bin": venv_bin, "private": private}
    shutil.rmtree(ws, ignore_errors=True)


def props(script: str, user: str = APP_USER, env_files: tuple[str, ...] = (),
          workdir: str = "/", **kw: Any) -> UnitProperties:
    return UnitProperties(
        name="gunicorn.service", load_state="loaded", active_state="active",
        sub_state="running", user=user, working_directory=workdir,
        environment_files=tuple((p, False) for p in env_files),
        exec_start=(ExecCommand(script, (script, "wsgi:app")),), **kw)


def bounded(fn: Callable[[], Any], seconds: float = 20.0) -> Any:
    """fn() in a thread; a hang (root blocked opening a FIFO) fails the test, not CI."""
    out: dict[str, Any] = {}

    def run() -> None:
        out["value"] = fn()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():  # a daemon thread: left blocked, it does not hold up the run
        pytest.fail("root blocked reading a file the app's user controls")
    return out["value"]


def test_shebang_behind_a_symlink_into_a_root_only_file_is_not_read(
        layout: dict[str, Path]) -> None:
    secret = layout["private"] / "script"
    secret.write_text(f"#!/usr/bin/env {SECRET}\n")
    gunicorn = layout["bin"] / "gunicorn"
    gunicorn.symlink_to(secret)  # the app's user owns bin/ and made this link
    got = gather_inputs(props(str(gunicorn)))
    assert got.shebangs[str(gunicorn)] == ""
    assert SECRET not in repr(build_context(props(str(gunicorn)), got).as_dict(reveal=True))
    # The user's own script is read as usual (as the user), and a unit that runs as root
    # has its script read as root, as systemd execs it.
    own = layout["bin"] / "gunicorn2"
    own.write_text(f"#!{layout['bin']}/python3\nimport x\n")
    assert gather_inputs(props(str(own))).shebangs[str(own)] == f"{layout['bin']}/python3"
    assert gather_inputs(props(str(gunicorn), user="")).shebangs[str(gunicorn)] == SECRET


def test_a_fifo_as_script_or_env_file_never_blocks_root(layout: dict[str, Path]) -> None:
    fifo = layout["private"] / "fifo"
    os.mkfifo(fifo)
    script, env = layout["bin"] / "gunicorn", layout["app"] / ".env"
    script.symlink_to(fifo)
    env.symlink_to(fifo)
    for user in (APP_USER, ""):
        got = bounded(lambda u=user: gather_inputs(props(str(script), user=u,
                                                         env_files=(str(env),))))
        assert got.shebangs[str(script)] == ""
        assert got.env_file_errors[str(env)] == "not a regular file (a FIFO)"
    read = files.read_file("/dev/null")
    assert read.data == b"" and not read.error  # EnvironmentFile=/dev/null stays empty


def test_mtime_behind_a_symlink_is_not_taken(layout: dict[str, Path]) -> None:
    """A link app/spy.py -> a root-only file: root must not stat the target (its mtime
    would show in code_newer_than_process, and whether the probe runs again)."""
    code = layout["app"] / "wsgi.py"
    code.write_text("app = None\n")
    secret = layout["private"] / "history"
    secret.write_text("x\n")
    spy = layout["app"] / "spy.py"
    spy.symlink_to(secret)
    old = time.time() - 3600
    for path in (code,):
        os.utime(path, (old, old))
    os.utime(spy, (old, old), follow_symlinks=False)
    os.utime(secret, (old + 600, old + 600))
    newest = files.newest_file(str(layout["app"]))
    assert newest is not None and newest[1] == pytest.approx(old, abs=1), newest
    unit = props(str(layout["bin"] / "gunicorn"), workdir=str(layout["app"]))
    ctx = build_context(unit, gather_inputs(unit))
    assert ctx.app_directory == str(layout["app"])
    before = fingerprint(ctx, str(layout["app"]))
    os.utime(secret, (old + 1200, old + 1200))  # root touches its own file
    assert fingerprint(ctx, str(layout["app"])) == before
