"""A unit's journal entries through the sd-journal API in this process (systemd-python),
the same entries `journalctl -u UNIT -o json -n N --after-cursor=C|--since=-Mmin` prints,
without a subprocess.

Entries come back in journalctl's JSON shape (MESSAGE, _PID, __REALTIME_TIMESTAMP,
__CURSOR, all text), so agent/privileged/sources/journal.py parses both the same way.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

try:
    from systemd import journal as _journal
except ImportError:  # systemd-python not installed: journal.py uses journalctl
    _journal = None

# journalctl -u UNIT: the unit's own messages, its coredumps, PID 1's and other root
# daemons' messages about it (systemd's add_matches_for_unit, in that order).
COREDUMP_MESSAGE_ID = "fc2e22bc6ee647b6b90729ab34a250b1"


# The journal opened once for a whole inspection run (shared()); None: each read opens its own.
_SHARED: ContextVar["_Shared | None"] = ContextVar("driftwatch_shared_journal", default=None)
# Journals opened in this process (tests count them: one per run, whatever the units).
opens = 0


class _Shared:
    """One journal opened on first use and closed when the run ends."""

    def __init__(self) -> None:
        self.reader: Any = None

    def get(self) -> Any:
        if self.reader is None:
            self.reader = _open()
        return self.reader


@contextmanager
def shared() -> Iterator[None]:
    """Every read_entries() inside uses one opened journal (opening it maps every journal
    file: the part of a read that does not depend on the unit), closed at the end."""
    handle = _Shared()
    token = _SHARED.set(handle)
    try:
        yield
    finally:
        _SHARED.reset(token)
        if handle.reader is not None:
            handle.reader.close()


def _open() -> Any:
    global opens
    if _journal is None:
        raise OSError("systemd-python is not installed")
    reader = _journal._Reader(_journal.LOCAL_ONLY)
    opens += 1
    return reader


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
    handle = _SHARED.get()
    reader = handle.get() if handle is not None else _open()
    try:
        reader.flush_matches()   # a shared reader still has the previous unit's
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
        if handle is None:
            reader.close()


# -- one read for many units: the union of their matches, entries dispatched ---------------
# The fields add_unit_matches() looks at: an entry of the union belongs to every unit whose
# own matches it meets (units_of), so each unit gets exactly what its own read would give.
DISPATCH_FIELDS = ("_SYSTEMD_UNIT", "MESSAGE_ID", "_UID", "COREDUMP_UNIT", "_PID", "UNIT",
                   "OBJECT_SYSTEMD_UNIT")


def add_union_matches(reader: Any, units: list[str]) -> None:
    """add_unit_matches() of every unit at once (same-field matches are ORed by sd-journal)."""
    for unit in units:
        reader.add_match(f"_SYSTEMD_UNIT={unit}")
    reader.add_disjunction()
    reader.add_match(f"MESSAGE_ID={COREDUMP_MESSAGE_ID}")
    reader.add_match("_UID=0")
    for unit in units:
        reader.add_match(f"COREDUMP_UNIT={unit}")
    reader.add_disjunction()
    reader.add_match("_PID=1")
    for unit in units:
        reader.add_match(f"UNIT={unit}")
    reader.add_disjunction()
    reader.add_match("_UID=0")
    for unit in units:
        reader.add_match(f"OBJECT_SYSTEMD_UNIT={unit}")


def units_of(fields: dict[str, set[str]], units: list[str]) -> list[str]:
    """Pure: the units (of those given) whose add_unit_matches() the entry meets; fields
    maps each dispatch field to the entry's values of it (a field may repeat)."""
    def has(field: str, value: str) -> bool:
        return value in fields.get(field, ())
    root = has("_UID", "0")
    return [u for u in units if has("_SYSTEMD_UNIT", u)
            or (root and has("MESSAGE_ID", COREDUMP_MESSAGE_ID) and has("COREDUMP_UNIT", u))
            or (has("_PID", "1") and has("UNIT", u))
            or (root and has("OBJECT_SYSTEMD_UNIT", u))]


def _values(value: Any) -> set[str]:
    items = value if isinstance(value, list) else [value]
    return {v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in items}


def _reader_for(units: list[str]) -> tuple[Any, Any]:
    """(reader, handle): the run's shared journal (handle set) or one of its own."""
    handle = _SHARED.get()
    reader = handle.get() if handle is not None else _open()
    reader.flush_matches()
    add_union_matches(reader, units)
    return reader, handle


def read_union(units: list[str], after: str, max_entries: int,
               ) -> tuple[list[tuple[dict[str, Any], list[str]]], str]:
    """Entries of any of units after the cursor `after` (an entry of that union), each with
    the units it belongs to; stops once one unit has max_entries. Returns them and the
    cursor of the last entry read (`after` when none). LookupError when `after` is not a
    cursor at all: the caller reads each unit alone instead."""
    reader, handle = _reader_for(units)
    try:
        try:
            reader.seek_cursor(after)
        except ValueError as exc:
            raise LookupError(str(exc)) from None
        # As read_entries(): its entry was read last time; the first entry after its place
        # is new (its own entry is of a unit no longer in the union, or rotated away).
        if reader._next() and not reader.test_cursor(after):
            reader._previous()
        out: list[tuple[dict[str, Any], list[str]]] = []
        per_unit: dict[str, int] = {}
        last = after
        while reader._next():
            raw = reader._get_all()
            fields = {f: _values(raw[f]) for f in DISPATCH_FIELDS if f in raw}
            last = reader._get_cursor()
            entry: dict[str, Any] = {"__CURSOR": last,
                                     "__REALTIME_TIMESTAMP": str(reader._get_realtime())}
            for field in ("MESSAGE", "_PID"):
                if field in raw:
                    entry[field] = sorted(_values(raw[field]))[0]
            owners = units_of(fields, units)
            out.append((entry, owners))
            for unit in owners:
                per_unit[unit] = per_unit.get(unit, 0) + 1
            if per_unit and max(per_unit.values()) >= max_entries:
                break
        return out, last
    finally:
        if handle is None:
            reader.close()


def union_tail(units: list[str]) -> str | None:
    """The cursor of the newest entry of any of units (None: they have none)."""
    reader, handle = _reader_for(units)
    try:
        reader.seek_tail()
        return reader._get_cursor() if reader._previous() else None
    finally:
        if handle is None:
            reader.close()


def cursors_after(units: list[str], after: str, wanted: set[str]) -> set[str]:
    """Which of the wanted cursors name entries (of units' union) after the cursor `after`."""
    reader, handle = _reader_for(units)
    found: set[str] = set()
    try:
        reader.seek_cursor(after)
        if reader._next() and not reader.test_cursor(after):
            reader._previous()
        while found != wanted and reader._next():
            found |= {c for c in wanted - found if reader.test_cursor(c)}
        return found
    finally:
        if handle is None:
            reader.close()
