"""The probe child's own last line of defence: it refuses to load app code as uid 0, whatever
the runner did (a real child process, its real report over its pipe; uid 0 simulated)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CHILD = Path(__file__).resolve().parents[2] / "agent" / "asuser" / "probe_child.py"

# Runs child.main() in a fresh interpreter, as if it were uid/euid 0 (or not).
WRAPPER = """
import os, sys
uid = int(sys.argv[1])
os.getuid = lambda: uid
os.geteuid = lambda: uid
sys.path.insert(0, sys.argv[2])
import probe_child as child
child.main(sys.argv[3:])
"""


def run_child(uid: int, request: dict[str, object], tmp_path: Path) -> dict[str, object]:
    read_fd, write_fd = os.pipe()
    try:
        (tmp_path / "app").mkdir(exist_ok=True)
        proc = subprocess.Popen(
            [sys.executable, "-c", WRAPPER, str(uid), str(CHILD.parent), str(write_fd),
             json.dumps(request)],
            pass_fds=(write_fd,), cwd=tmp_path, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE)
        os.close(write_fd)
        write_fd = -1
        with os.fdopen(read_fd, "rb") as pipe:
            read_fd = -1
            data = pipe.read()
        proc.wait(timeout=60)
    finally:
        for fd in (read_fd, write_fd):
            if fd >= 0:
                os.close(fd)
    return json.loads(data)


@pytest.mark.parametrize("uid", [0])
def test_child_refuses_root(uid: int, tmp_path: Path) -> None:
    report = run_child(uid, {"cwd": str(tmp_path / "app"), "app_spec": "wsgi:app"}, tmp_path)
    assert report["ok"] is False
    assert "refusing to load app code as root" in str(report["error"])


def test_child_as_a_user_gets_past_the_guard(tmp_path: Path) -> None:
    report = run_child(1000, {"cwd": str(tmp_path / "app"), "app_spec": "wsgi:app"}, tmp_path)
    assert "refusing to load app code as root" not in str(report["error"])
