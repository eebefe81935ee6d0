"""Journal cursors on a real read-only mount and a real full tmpfs (in a private mount
namespace of a child process, so the machine's mounts are untouched)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


from tests.conftest import skip_or_fail

CURSOR = "s=0a1b;i=2f;b=9c;m=1e;t=5d;x=77"
NEWER = "s=0a1b;i=30;b=9c;m=1e;t=5e;x=78"
SAVE = (
    "import json, os, sys\n"
    "from agent.privileged.journal_cursors import CursorFile\n"
    "files = CursorFile(sys.argv[1])\n"
    "before = files.load()\n"
    "ok = files.save({'app.service': sys.argv[2]})\n"
    "print(json.dumps({'before': before, 'ok': ok, 'error': files.error,\n"
    "                  'after': CursorFile(sys.argv[1]).load(),\n"
    "                  'entries': sorted(os.listdir(sys.argv[1]))}))\n"
)


def in_namespace(setup: str, state: Path) -> dict[str, object]:
    """Run SAVE in a private mount namespace after the shell commands in setup."""
    if os.geteuid() != 0:
        skip_or_fail("mounting a read-only or full directory needs root")
    script = f"set -e; {setup}; exec \"$0\" -c \"$1\" \"$2\" \"$3\""
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
         sys.executable, SAVE, str(state), NEWER],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_read_only_state_directory_keeps_the_file_and_says_why(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "journal-cursors.json").write_text(
        json.dumps({"version": 1, "cursors": {"app.service": CURSOR}}))
    out = in_namespace(f"mount --bind {state} {state}; mount -o remount,bind,ro {state}", state)
    assert out["before"] == {"app.service": CURSOR}
    assert out["ok"] is False and "Read-only file system" in str(out["error"])
    assert out["after"] == {"app.service": CURSOR}           # the valid file is untouched
    assert out["entries"] == ["journal-cursors.json"]        # nothing moved aside or left


def test_full_disk_keeps_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    fill = (f"mount -t tmpfs -o size=64k tmpfs {state}; "
            f"printf '%s' '{json.dumps({'version': 1, 'cursors': {'app.service': CURSOR}})}' "
            f"> {state}/journal-cursors.json; "
            f"dd if=/dev/zero of={state}/filler bs=4k 2>/dev/null || true")
    out = in_namespace(fill, state)
    assert out["before"] == {"app.service": CURSOR}
    assert out["ok"] is False and "No space left on device" in str(out["error"])
    assert out["after"] == {"app.service": CURSOR}
    assert out["entries"] == ["filler", "journal-cursors.json"]
