"""A unit's journal entries through the sd-journal API in this process (systemd-python),
the same entries `journalctl -u UNIT -o json -n N --after-cursor=C|--since=-Mmin` prints,
without a subprocess.

Entries come back in journalctl's JSON shape (MESSAGE, _PID, __REALTIME_TIMESTAMP,
__CURSOR, all text), so agent/privileged/sources/journal.py parses both the same way.
"""

from __future__ import annotations

import errno
from typing import Any

try:
    from systemd import journal as _journal
except ImportError:  # systemd-python not installed: journal.py uses journalctl
    _journal = None

# journalctl -u UNIT: the unit's own messages, its coredumps, PID 1's and other root
# daemons' messages about it (systemd's add_matches_for_unit, in that order).
COREDUMP_MESSAGE_ID = "fc2e22bc6ee647b6b90729ab34a250b1"


def available() -> bool:
    """True when the sd-journal API can be used here."""
    return _journal is not None


def add_unit_matches(reader: Any, unit: str) -> None:
    """The matches journalctl -u adds for a service unit."""
    reader.add_match(f"_SYSTEMD_UNIT={unit}")
    reader.add_disjunction()
    reader.add_match(f"MESSAGE_ID={COREDUMP_MESSAGE_ID}")
    reader.add_match("_UID=0")
    reader.add_match(f"COREDUMP_UNIT={unit}")
    reader.add_disjunction()
    reader.add_match("_PID=1")
    reader.add_match(f"UNIT={unit}")
    reader.add_disjunction()
    reader.add_match("_UID=0")
    reader.add_match(f"OBJECT_SYSTEMD_UNIT={unit}")


def _text(reader: Any, field: str) -> str | None:
    try:
        value = reader._get(field)
    except KeyError:
        return None
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def read_entries(unit: str, cursor: str | None, since_usec: int,
                 max_entries: int) -> list[dict[str, Any]]:
    """Up to max_entries entries of unit after cursor (None: from since_usec on), oldest
    first; OSError when the journal cannot be opened or the cursor is not one."""
    if _journal is None:
        raise OSError("systemd-python is not installed")
    reader = _journal._Reader(_journal.LOCAL_ONLY)
    try:
        add_unit_matches(reader, unit)
        if cursor:
            try:
                reader.seek_cursor(cursor)
            except ValueError as exc:   # not a cursor at all
                raise OSError(errno.EINVAL, str(exc)) from None
            # The cursor's own entry was read last time; an entry that took its place
            # (the cursor's entry rotated away) is new.
            if reader._next() and not reader.test_cursor(cursor):
                reader._previous()
        else:
            reader.seek_realtime(since_usec)
        entries: list[dict[str, Any]] = []
        while len(entries) < max_entries and reader._next():
            entry: dict[str, Any] = {"__CURSOR": reader._get_cursor(),
                                     "__REALTIME_TIMESTAMP": str(reader._get_realtime())}
            for field in ("MESSAGE", "_PID"):
                value = _text(reader, field)
                if value is not None:
                    entry[field] = value
            entries.append(entry)
        return entries
    finally:
        reader.close()
