"""A unit's recent "missing column / missing table" errors from the journal, counted by kind.

Reading: through the sd-journal API in this process (agent/privileged/sources/journal_api.py,
systemd-python) where it is installed, else with `journalctl -u UNIT -o json` in a
subprocess with a timeout (pystemd.journal can only write); both over a bounded window
(--since, -n) and after the cursor of the previous read, so a Prometheus counter only ever
adds new entries. A read without a cursor looks back over the window: its entries are history
(a baseline, for the look-back gauge), never added to the counter. Parsing and counting are pure
and kept apart from the subprocess.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.secrets import mask_url
from agent.privileged.sources import journal_api

UNDEFINED_COLUMN = "undefined_column"
UNDEFINED_TABLE = "undefined_table"
KINDS = (UNDEFINED_COLUMN, UNDEFINED_TABLE)
MAX_SAMPLE_CHARS = 300
MAX_SAMPLES = 5
# Seconds within which an exception's cause line and SQLAlchemy's wrapper line are one error.
PAIR_WINDOW_USEC = 2_000_000

# PostgreSQL (psycopg2/psycopg/asyncpg), SQLite and MySQL phrasings.
PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    (UNDEFINED_COLUMN, re.compile(
        r'\bcolumn\s+("[^"]+"|[\w.$]+)(?:\s+of\s+relation\s+"[^"]+")?\s+does not exist'
        r"|\bUndefinedColumn(?:Error)?\b|\bno such column:\s*\S+|\bUnknown column '[^']+'")),
    (UNDEFINED_TABLE, re.compile(
        r'\brelation\s+"[^"]+"\s+does not exist|\bUndefinedTable(?:Error)?\b'
        r"|\bno such table:\s*\S+|\bTable '[^']+' doesn't exist")),
)
# "(psycopg2.errors.UndefinedColumn) column ..." : SQLAlchemy's wrapper of a DBAPI error.
WRAPPER = re.compile(r"\((?:psycopg2?|asyncpg|pymysql|MySQLdb|sqlite3)[\w.]*\)")
# The part of a message that names the missing object, to pair cause and wrapper lines.
DETAIL = re.compile(r'(column|relation)\s+("[^"]+"|[\w.$]+).*?does not exist|no such \w+:\s*\S+'
                    r"|Unknown column '[^']+'|Table '[^']+' doesn't exist")


@dataclass(frozen=True)
class JournalScan:
    """What one read of a unit's journal found."""

    unit: str
    counts: dict[str, int]
    samples: tuple[str, ...] = ()
    cursor: str | None = None
    entries_read: int = 0
    # True when the entry limit was reached: older entries in the window were not read.
    truncated: bool = False
    error: str = ""
    # True for a look-back read (no cursor): history from before this agent started.
    baseline: bool = False
    # (kind, realtime usec) of every error counted, for the look-back window gauge.
    events: tuple[tuple[str, int], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (samples are already masked)."""
        return {"unit": self.unit, "counts": dict(self.counts), "samples": list(self.samples),
                "entries_read": self.entries_read, "truncated": self.truncated,
                "error": self.error, "baseline": self.baseline}


def classify(message: str) -> tuple[str, str] | None:
    """Pure: (kind, detail) when message reports a missing column or table, else None."""
    for kind, pattern in PATTERNS:
        if pattern.search(message):
            detail = DETAIL.search(message)
            return kind, detail.group(0) if detail else ""
    return None


def message_text(entry: Mapping[str, Any]) -> str:
    """Pure: the MESSAGE of a journal JSON entry (journald gives bytes as a list of ints)."""
    value = entry.get("MESSAGE")
    if isinstance(value, list):
        try:
            return bytes(value).decode("utf-8", "replace")
        except (TypeError, ValueError):
            return ""
    return value if isinstance(value, str) else ""


def sample(message: str, limit: int = MAX_SAMPLE_CHARS) -> str:
    """Pure: a message fit to show: passwords masked, one line, truncated."""
    text = " ".join(mask_url(message).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass
class _Pending:
    detail: str
    wrapper: bool
    usec: int
    paired: bool = False


def count_errors(entries: Iterable[Mapping[str, Any]], max_samples: int = MAX_SAMPLES,
                 ) -> tuple[dict[str, int], list[str]]:
    """Pure: journal JSON entries -> (count per kind, masked samples)."""
    counts, samples, _events = scan_errors(entries, max_samples)
    return counts, samples


def scan_errors(entries: Iterable[Mapping[str, Any]], max_samples: int = MAX_SAMPLES,
                ) -> tuple[dict[str, int], list[str], list[tuple[str, int]]]:
    """Pure: journal JSON entries -> (count per kind, masked samples, (kind, usec) per error).

    One failed query usually logs two lines in a chained traceback, the driver's
    "psycopg2.errors.UndefinedColumn: ..." and SQLAlchemy's "(psycopg2.errors.UndefinedColumn)
    ..." wrapper: a wrapper/cause pair with the same detail from the same PID within
    PAIR_WINDOW_USEC counts once.
    """
    counts = {kind: 0 for kind in KINDS}
    samples: list[str] = []
    events: list[tuple[str, int]] = []
    last: dict[tuple[str, str], _Pending] = {}
    for entry in entries:
        text = message_text(entry)
        hit = classify(text)
        if hit is None:
            continue
        kind, detail = hit
        pid = str(entry.get("_PID", ""))
        usec = _int(entry.get("__REALTIME_TIMESTAMP"))
        wrapper = bool(WRAPPER.search(text))
        prev = last.get((pid, kind))
        if (prev is not None and not prev.paired and prev.wrapper != wrapper
                and prev.detail == detail and abs(usec - prev.usec) <= PAIR_WINDOW_USEC):
            prev.paired = True  # second half of the same error
            continue
        counts[kind] += 1
        events.append((kind, usec))
        last[(pid, kind)] = _Pending(detail, wrapper, usec)
        if len(samples) < max_samples:
            samples.append(sample(text))
    return counts, samples, events


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def parse_json_lines(output: str) -> list[dict[str, Any]]:
    """Pure: journalctl -o json output (one object per line) -> entries; bad lines skipped."""
    entries = []
    for line in output.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            entries.append(obj)
    return entries


Runner = Callable[..., "subprocess.CompletedProcess[str]"]


@dataclass
class JournalReader:
    """Reads one unit's journal repeatedly; each read counts only entries after the last."""

    unit: str
    window_minutes: int = 15
    max_entries: int = 2000
    timeout: float = 5.0
    journalctl: str = "journalctl"
    cursor: str | None = None
    runner: Runner = field(default=subprocess.run, repr=False)
    # "auto": the sd-journal API when systemd-python is installed and neither runner nor
    # journalctl was replaced; "journalctl": always the subprocess.
    source: str = "auto"

    def uses_api(self) -> bool:
        """True when reads go through the sd-journal API instead of journalctl."""
        return (self.source == "auto" and journal_api.available()
                and self.runner is subprocess.run and self.journalctl == "journalctl")

    def argv(self, cursor: str | None) -> list[str]:
        """The journalctl command line for a read after cursor (or over the window)."""
        argv = [self.journalctl, "-u", self.unit, "-o", "json", "--no-pager", "-q",
                "-n", str(self.max_entries),
                "--output-fields=MESSAGE,_PID,__REALTIME_TIMESTAMP"]
        if cursor:
            argv.append(f"--after-cursor={cursor}")
        else:
            argv.append(f"--since=-{self.window_minutes}min")
        return argv

    def read(self) -> JournalScan:
        """Count new matching entries; never raises: problems come back in .error.

        Without a cursor (first read, or a cursor journald no longer knows) the read looks
        back over the window and is marked baseline: history, not new errors.
        """
        baseline = not self.cursor
        entries, error, refused = self._entries(self.cursor)
        if refused and self.cursor:
            # A rotated-away or foreign cursor: fall back to the window, once.
            baseline = True
            entries, error, refused = self._entries(None)
        return self._scan(entries, error, baseline, move_cursor=True)

    def take(self, entries: list[dict[str, Any]]) -> JournalScan:
        """Count entries read for this unit elsewhere (SharedJournal), after its cursor."""
        return self._scan(entries, "", False, move_cursor=True)

    def read_window(self) -> JournalScan:
        """The errors of the look-back window, without moving the cursor (a baseline)."""
        entries, error, _ = self._entries(None)
        return self._scan(entries, error, True, move_cursor=False)

    def _entries(self, cursor: str | None) -> tuple[list[dict[str, Any]] | None, str, bool]:
        """(entries, error, refused): entries None when the read failed; refused when the
        journal said no (journalctl's non-zero exit, the API's error), e.g. to a cursor."""
        if self.uses_api():
            since = int((time.time() - self.window_minutes * 60) * 1_000_000)
            try:
                return journal_api.read_entries(self.unit, cursor, since,
                                                self.max_entries), "", False
            except OSError as exc:
                return None, f"the journal refused the read: {exc.strerror or exc}", True
        proc, error = self._run(cursor)
        if proc is None:
            return None, error, False
        if proc.returncode != 0:
            return None, (f"journalctl exited {proc.returncode}: "
                          + sample(proc.stderr or "", 200)), True
        return parse_json_lines(proc.stdout), "", False

    def _scan(self, entries: list[dict[str, Any]] | None, error: str, baseline: bool,
              move_cursor: bool) -> JournalScan:
        if entries is None:
            return JournalScan(self.unit, {k: 0 for k in KINDS}, cursor=self.cursor,
                               error=error, baseline=baseline)
        counts, samples, events = scan_errors(entries)
        if move_cursor and entries and entries[-1].get("__CURSOR"):
            self.cursor = str(entries[-1]["__CURSOR"])
        return JournalScan(self.unit, counts, tuple(samples), self.cursor, len(entries),
                           truncated=len(entries) >= self.max_entries, baseline=baseline,
                           events=tuple(events))

    def _run(self, cursor: str | None,
             ) -> tuple[subprocess.CompletedProcess[str] | None, str]:
        try:
            proc = self.runner(self.argv(cursor), capture_output=True, text=True,
                               timeout=self.timeout, stdin=subprocess.DEVNULL,
                               errors="replace")
            return proc, ""
        except subprocess.TimeoutExpired:
            return None, f"journalctl did not answer within {self.timeout:g}s"
        except OSError as exc:
            return None, f"cannot run {self.journalctl}: {exc.strerror or exc}"


@dataclass
class SharedJournal:
    """One journal read for many units per run: the union of their matches read once from a
    shared cursor, each entry dispatched to the units whose own matches it meets, each unit's
    cursor moved as its own read would (so persisted cursors stay per unit).

    A unit is a member (read through the union) once it is known that every one of its
    entries up to the shared cursor was counted; until then, and whenever anything is in
    doubt (a rotated-away cursor, a unit left out of a run), it is read alone as before and
    joins after. Only readers that use the sd-journal API take part."""

    max_entries: int = 2000
    cursor: str | None = None          # the newest entry of the union read so far
    members: set[str] = field(default_factory=set)
    # Members whose own cursor lies after the shared one: their entries up to it (inclusive)
    # were already counted by their own read.
    pending: dict[str, str] = field(default_factory=dict)
    reads: int = 0                     # union reads done (tests count them)

    def before(self, readers: Mapping[str, Any],
               units: Iterable[str] = ()) -> dict[str, list[dict[str, Any]]]:
        """At the start of a run over these units (readers: those that have one yet): the
        members' new entries, from one union read (each to be counted with reader.take()).
        Units without entries here are read alone."""
        sharing = sorted(u for u, r in readers.items() if _shares(r))
        self.members &= set(sharing)   # a unit left out of a run misses its entries
        self.pending = {u: c for u, c in self.pending.items() if u in self.members}
        everyone = sorted(set(sharing) | set(units))
        if not everyone or not journal_api.available():
            self._reset()
            return {}
        try:
            if self.cursor is None or not self.members:
                # Where the joiners' own reads of this run will start from, at the latest.
                self.cursor = journal_api.union_tail(everyone)
                self.members.clear()
                return {}
            members = sorted(self.members)
            entries, last = journal_api.read_union(members, self.cursor, self.max_entries)
        except (OSError, LookupError):
            self._reset()
            return {}
        self.reads += 1
        own: dict[str, list[dict[str, Any]]] = {u: [] for u in members}
        for entry, owners in entries:
            for unit in owners:
                passed = self.pending.get(unit)
                if passed is not None:   # counted already by the unit's own read
                    if entry["__CURSOR"] == passed:
                        del self.pending[unit]
                    continue
                own[unit].append(entry)
        for unit in list(self.pending):  # its cursor never came: read it alone again
            self.members.discard(unit)
            del self.pending[unit]
        self.cursor = last
        return {u: own[u] for u in members if u in self.members}

    def after(self, readers: Mapping[str, Any], alone: set[str], untaken: set[str]) -> None:
        """At the end of the run. untaken: members whose entries were not counted (their
        check did not run): they leave. alone: units read alone in full (no error, not
        truncated), so counted up to their own cursor: they join."""
        self.members -= untaken
        for unit in untaken:
            self.pending.pop(unit, None)
        joiners = {u for u in alone if u in readers and _shares(readers[u])
                   and readers[u].cursor}
        if not joiners or self.cursor is None:
            return
        units = sorted(self.members | joiners)
        try:
            later = journal_api.cursors_after(units, self.cursor,
                                              {readers[u].cursor for u in joiners})
        except (OSError, ValueError):
            self._reset()
            return
        for unit in joiners:
            self.members.add(unit)
            if readers[unit].cursor in later:
                self.pending[unit] = readers[unit].cursor

    def _reset(self) -> None:
        self.cursor = None
        self.members.clear()
        self.pending.clear()


def _shares(reader: Any) -> bool:
    """A reader that can take part in the union read (sd-journal API, a real JournalReader)."""
    return isinstance(reader, JournalReader) and reader.uses_api()


@dataclass
class ErrorWindow:
    """Pure: the errors of the last `seconds`, by kind (for the look-back gauge)."""

    seconds: float
    max_events: int = 10000
    events: list[tuple[str, int]] = field(default_factory=list)

    def add(self, events: Iterable[tuple[str, int]]) -> None:
        """Remember errors (kind, realtime usec), newer than any already kept."""
        newest = self.events[-1][1] if self.events else -1
        self.events.extend(e for e in events if e[1] > newest)
        del self.events[: max(0, len(self.events) - self.max_events)]

    def counts(self, now: float) -> dict[str, int]:
        """Errors per kind logged within the window before now (seconds since the epoch)."""
        cutoff = int((now - self.seconds) * 1_000_000)
        self.events = [e for e in self.events if e[1] >= cutoff]
        counts = {kind: 0 for kind in KINDS}
        for kind, _usec in self.events:
            counts[kind] = counts.get(kind, 0) + 1
        return counts
