"""The journal reader against a real journald, inside a throwaway systemd sandbox."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest

from tests.harness.sandbox import REPO_ROOT, Sandbox

pytestmark = pytest.mark.systemd

UNIT = "dw-journal.service"
ERROR = "psycopg2.errors.UndefinedColumn: column users.email does not exist"
READER = (
    "import json, sys\n"
    "from agent.privileged.sources.journal import JournalReader\n"
    "reader = JournalReader(sys.argv[1], cursor=sys.argv[2] or None, source=sys.argv[3])\n"
    "print(json.dumps({**reader.read().as_dict(), 'cursor': reader.cursor,\n"
    "                  'api': reader.uses_api()}))\n"
)


def read_inside(sb: Sandbox, cursor: str = "", source: str = "auto") -> dict[str, object]:
    """Run the reader in the sandbox with the repo's venv; return its scan."""
    proc = sb.run([str(REPO_ROOT / ".venv/bin/python"), "-c", READER, UNIT, cursor, source],
                  env={"PYTHONPATH": str(REPO_ROOT)})
    scan = json.loads(proc.stdout)
    # auto: the sd-journal API (systemd-python is a dependency), never the subprocess.
    assert scan.pop("api") is (source == "auto")
    return scan


def wait_count(sb: Sandbox, cursor: str, want: int, source: str = "auto") -> dict[str, object]:
    """journald stores stdout lines asynchronously: poll briefly until they show up."""
    deadline = time.monotonic() + 10
    while True:
        scan = read_inside(sb, cursor, source)
        counts = scan["counts"]
        assert isinstance(counts, dict)
        if counts["undefined_column"] >= want or time.monotonic() > deadline:
            return scan
        time.sleep(0.1)


@pytest.mark.parametrize("source", ["auto", "journalctl"])
def test_reader_counts_unit_errors_once(make_sandbox: Callable[[], Sandbox], source: str) -> None:
    sb = make_sandbox()
    sb.add_unit(UNIT, f"""[Unit]
Description=prints a missing-column error

[Service]
Type=oneshot
ExecStart=/bin/echo '{ERROR}'
ExecStart=/bin/echo 'GET /health 200'
""")
    sb.boot()
    sb.systemctl("start", UNIT)
    first = wait_count(sb, "", 1, source)
    assert first["error"] == ""
    assert first["counts"] == {"undefined_column": 1, "undefined_table": 0}
    assert first["samples"] == [ERROR]
    cursor = first["cursor"]
    assert isinstance(cursor, str) and cursor

    again = read_inside(sb, cursor, source)
    assert again["counts"] == {"undefined_column": 0, "undefined_table": 0}

    sb.systemctl("start", UNIT)
    third = wait_count(sb, cursor, 1, source)
    assert third["counts"] == {"undefined_column": 1, "undefined_table": 0}

    # A cursor the journal refuses: the look-back window instead, as history.
    bad = read_inside(sb, "not-a-cursor", source)
    assert bad["baseline"] is True and bad["error"] == ""
    assert bad["counts"] == {"undefined_column": 2, "undefined_table": 0}
