"""Pure journal parsing and counting; the reader with a fake journalctl."""

from __future__ import annotations

import json
import subprocess
from typing import Any

from agent.privileged.sources.journal import (
    UNDEFINED_COLUMN,
    UNDEFINED_TABLE,
    ErrorWindow,
    JournalReader,
    classify,
    count_errors,
    message_text,
    parse_json_lines,
    sample,
)


def entry(msg: Any, pid: int = 10, usec: int = 1_000_000, cursor: str = "") -> dict[str, Any]:
    return {"MESSAGE": msg, "_PID": str(pid), "__REALTIME_TIMESTAMP": str(usec),
            "__CURSOR": cursor}


def test_classify_kinds() -> None:
    assert classify("psycopg2.errors.UndefinedColumn: column users.email does not exist")[0] \
        == UNDEFINED_COLUMN
    assert classify('column "email" of relation "users" does not exist')[0] == UNDEFINED_COLUMN
    assert classify('relation "orders" does not exist')[0] == UNDEFINED_TABLE
    assert classify("psycopg.errors.UndefinedTable: relation \"x\" does not exist")[0] \
        == UNDEFINED_TABLE
    assert classify("sqlite3.OperationalError: no such column: users.email")[0] \
        == UNDEFINED_COLUMN
    assert classify("GET /health 200") is None
    assert classify("the column width does not matter") is None


def test_cause_and_wrapper_count_once() -> None:
    entries = [
        entry("psycopg2.errors.UndefinedColumn: column users.email does not exist", usec=1),
        entry("LINE 1: SELECT users.email FROM users", usec=2),
        entry("The above exception was the direct cause of the following exception:", usec=3),
        entry("sqlalchemy.exc.ProgrammingError: (psycopg2.errors.UndefinedColumn) "
              "column users.email does not exist", usec=4),
    ]
    counts, samples = count_errors(entries)
    assert counts == {UNDEFINED_COLUMN: 1, UNDEFINED_TABLE: 0}
    assert len(samples) == 1


def test_a_storm_counts_every_error() -> None:
    one = [entry("psycopg2.errors.UndefinedColumn: column users.email does not exist"),
           entry("sqlalchemy.exc.ProgrammingError: (psycopg2.errors.UndefinedColumn) "
                 "column users.email does not exist")]
    counts, _ = count_errors(one * 5 + [entry('relation "orders" does not exist', pid=11)])
    assert counts == {UNDEFINED_COLUMN: 5, UNDEFINED_TABLE: 1}


def test_same_text_from_two_workers_counts_twice() -> None:
    msg = "psycopg2.errors.UndefinedColumn: column users.email does not exist"
    counts, _ = count_errors([entry(msg, pid=1), entry(msg, pid=2)])
    assert counts[UNDEFINED_COLUMN] == 2


def test_samples_are_masked_and_truncated() -> None:
    msg = ("could not run: relation \"t\" does not exist url=postgresql://app:s3cret@db/app "
           + "x" * 1000)
    _, samples = count_errors([entry(msg)])
    assert "s3cret" not in samples[0]
    assert len(samples[0]) <= 300
    assert sample("a\n  b") == "a b"


def test_message_bytes_and_garbage() -> None:
    assert message_text({"MESSAGE": list(b"relation \"t\" does not exist")}) \
        == 'relation "t" does not exist'
    assert message_text({"MESSAGE": None}) == ""
    lines = "\n".join([json.dumps(entry("a")), "not json", "", json.dumps([1])])
    assert len(parse_json_lines(lines)) == 1


class FakeJournalctl:
    """Stands in for subprocess.run: serves entries after the cursor it is given."""

    def __init__(self, entries: list[dict[str, Any]]) -> None:
        self.entries = entries
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str], **_kw: Any) -> subprocess.CompletedProcess[str]:
        self.calls.append(argv)
        cursor = next((a.split("=", 1)[1] for a in argv if a.startswith("--after-cursor=")),
                      None)
        cursors = [e["__CURSOR"] for e in self.entries]
        if cursor is not None and cursor not in cursors:
            return subprocess.CompletedProcess(argv, 1, "", "Failed to seek to cursor")
        start = cursors.index(cursor) + 1 if cursor else 0
        out = "\n".join(json.dumps(e) for e in self.entries[start:])
        return subprocess.CompletedProcess(argv, 0, out, "")


def test_reader_counts_only_new_entries() -> None:
    err = 'relation "orders" does not exist'
    fake = FakeJournalctl([entry(err, usec=1, cursor="c1"), entry("ok", usec=2, cursor="c2")])
    reader = JournalReader("app.service", runner=fake)
    first = reader.read()
    assert first.counts[UNDEFINED_TABLE] == 1 and first.cursor == "c2" and not first.error
    assert any(a.startswith("--since=") for a in fake.calls[0])
    again = reader.read()
    assert again.counts[UNDEFINED_TABLE] == 0
    assert "--after-cursor=c2" in fake.calls[1]
    fake.entries.append(entry(err, usec=3, cursor="c3"))
    assert reader.read().counts[UNDEFINED_TABLE] == 1


def test_reader_recovers_from_a_bad_cursor() -> None:
    fake = FakeJournalctl([entry('relation "t" does not exist', cursor="c1")])
    reader = JournalReader("app.service", runner=fake, cursor="gone")
    scan = reader.read()
    assert scan.counts[UNDEFINED_TABLE] == 1 and not scan.error


def test_reader_reports_failures_without_raising() -> None:
    def boom(argv: list[str], **_kw: Any) -> subprocess.CompletedProcess[str]:
        raise subprocess.TimeoutExpired(argv, 5)

    scan = JournalReader("app.service", runner=boom).read()
    assert "did not answer" in scan.error
    scan = JournalReader("app.service", journalctl="/nonexistent/journalctl").read()
    assert "cannot run" in scan.error


def test_first_read_is_a_baseline_and_later_reads_are_new() -> None:
    err = 'relation "orders" does not exist'
    fake = FakeJournalctl([entry(err, usec=1, cursor="c1")])
    reader = JournalReader("app.service", runner=fake)
    first = reader.read()
    assert first.baseline and first.events == (("undefined_table", 1),)
    fake.entries.append(entry(err, usec=5, cursor="c2"))
    second = reader.read()
    assert not second.baseline and second.counts[UNDEFINED_TABLE] == 1


def test_a_rotated_away_cursor_falls_back_to_a_baseline() -> None:
    fake = FakeJournalctl([entry('relation "t" does not exist', cursor="c1")])
    scan = JournalReader("app.service", runner=fake, cursor="gone").read()
    assert scan.baseline


def test_read_window_keeps_the_cursor() -> None:
    fake = FakeJournalctl([entry('relation "t" does not exist', usec=1, cursor="c1"),
                           entry("ok", usec=2, cursor="c2")])
    reader = JournalReader("app.service", runner=fake, cursor="c1")
    history = reader.read_window()
    assert history.baseline and history.counts[UNDEFINED_TABLE] == 1 and reader.cursor == "c1"
    assert any(a.startswith("--since=") for a in fake.calls[0])


def test_error_window_counts_only_the_look_back() -> None:
    window = ErrorWindow(60.0)
    window.add([(UNDEFINED_TABLE, 10_000_000), (UNDEFINED_COLUMN, 50_000_000)])
    window.add([(UNDEFINED_TABLE, 10_000_000)])  # already kept: not counted twice
    assert window.counts(now=65.0) == {UNDEFINED_COLUMN: 1, UNDEFINED_TABLE: 1}
    assert window.counts(now=100.0) == {UNDEFINED_COLUMN: 1, UNDEFINED_TABLE: 0}
    assert window.counts(now=200.0) == {UNDEFINED_COLUMN: 0, UNDEFINED_TABLE: 0}
