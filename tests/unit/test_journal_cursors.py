"""Journal cursors in the state directory: atomic writes, hostile content, unwritable disks."""

from __future__ import annotations

import errno
import functools
import os
from pathlib import Path

import pytest

from agent.privileged.inspector import Inspector, InspectorSettings, _Timer
from agent.privileged.journal_cursors import FILE_NAME, CursorFile, parse, valid_cursor
from agent.privileged.sources.journal import UNDEFINED_TABLE, JournalReader
from tests.unit.test_journal_parse import FakeJournalctl, entry

CURSOR = "s=0a1b;i=2f;b=9c;m=1e;t=5d;x=77"


def test_cursor_syntax() -> None:
    assert valid_cursor(CURSOR)
    for bad in ("", "s=zz", "s=1;rm -rf /", "x" * 600, 5, None, "s=1\n"):
        assert not valid_cursor(bad), bad


def test_round_trip_and_atomic_file(tmp_path: Path) -> None:
    cursors = CursorFile(str(tmp_path))
    assert cursors.load() == {}
    assert cursors.save({"app.service": CURSOR})
    assert CursorFile(str(tmp_path)).load() == {"app.service": CURSOR}
    assert sorted(p.name for p in tmp_path.iterdir()) == [FILE_NAME]  # no temp file left


def test_malformed_content_is_ignored_not_raised(tmp_path: Path) -> None:
    path = tmp_path / FILE_NAME
    for text in ("{", "[]", '{"cursors": 3}', '{"cursors": {"a.service": "s=1;\\u001b[2J"}}'):
        path.write_text(text)
        assert CursorFile(str(tmp_path)).load() == {}
    assert parse('{"cursors": {"a.service": "%s", "b": 7}}' % CURSOR) == {"a.service": CURSOR}


@pytest.mark.parametrize("where, code", [("tempfile.mkstemp", errno.ENOSPC),
                                         ("os.replace", errno.EROFS)])
def test_a_full_or_read_only_disk_keeps_the_file_and_reports(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str, code: int) -> None:
    cursors = CursorFile(str(tmp_path))
    assert cursors.save({"app.service": CURSOR})

    def fail(*_a: object, **_kw: object) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(where, fail)
    assert not cursors.save({"app.service": CURSOR.replace("x=77", "x=78")})
    assert "cannot save journal cursors" in cursors.error and os.strerror(code) in cursors.error
    monkeypatch.undo()
    assert CursorFile(str(tmp_path)).load() == {"app.service": CURSOR}  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == [FILE_NAME]  # no temp file left
    assert cursors.save({"app.service": CURSOR.replace("x=77", "x=78")}) and not cursors.error


def test_a_missing_directory_is_made_and_an_impossible_one_reported(tmp_path: Path) -> None:
    assert CursorFile(str(tmp_path / "state")).save({"app.service": CURSOR})
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700
    (tmp_path / "file").write_text("")
    cursors = CursorFile(str(tmp_path / "file" / "state"))  # a file where a directory must be
    assert not cursors.save({"app.service": CURSOR}) and "cannot save" in cursors.error


def _inspector(tmp_path: Path, fake: FakeJournalctl) -> Inspector:
    settings = InspectorSettings(state_path=str(tmp_path / "state.db"))
    return Inspector(settings, systemd=object(), cursors=CursorFile(str(tmp_path)),  # type: ignore[arg-type]
                     journal_reader=functools.partial(JournalReader, runner=fake))


def _journal(inspector: Inspector) -> dict[str, object]:
    fields: dict[str, object] = {}
    inspector._journal_check("app.service", _Timer(), fields, [])
    inspector._save_cursors()
    return fields


def test_a_restart_neither_recounts_nor_loses(tmp_path: Path) -> None:
    err = 'relation "orders" does not exist'
    now_us = int(__import__("time").time() * 1_000_000)
    fake = FakeJournalctl([entry(err, usec=now_us - 5_000_000, cursor="s=1"),
                           entry(err, usec=now_us - 4_000_000, cursor="s=2")])
    first = _journal(_inspector(tmp_path, fake))
    # Errors logged before the agent started are history: the gauge, never the counter.
    assert first["journal_schema_errors"] == {"undefined_column": 0, UNDEFINED_TABLE: 0}
    assert first["journal_schema_errors_recent"][UNDEFINED_TABLE] == 2  # type: ignore[index]
    agent = _inspector(tmp_path, fake)
    fake.entries.append(entry(err, usec=now_us - 3_000_000, cursor="s=3"))
    assert _journal(agent)["journal_schema_errors"][UNDEFINED_TABLE] == 1  # type: ignore[index]
    # The agent restarts; one error was logged while it was down.
    fake.entries.append(entry(err, usec=now_us - 2_000_000, cursor="s=4"))
    again = _journal(_inspector(tmp_path, fake))
    assert again["journal_schema_errors"][UNDEFINED_TABLE] == 1  # type: ignore[index]
    assert again["journal_schema_errors_recent"][UNDEFINED_TABLE] == 4  # type: ignore[index]
    assert CursorFile(str(tmp_path)).load() == {"app.service": "s=4"}
    # No new entry, another restart: nothing is counted again.
    assert _journal(_inspector(tmp_path, fake))["journal_schema_errors"][UNDEFINED_TABLE] == 0  # type: ignore[index]
