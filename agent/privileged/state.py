"""The agent's own memory: sha256 of each migration file when first seen applied (SQLite).

An applied migration whose file later changes or disappears means the code no longer
describes what the database went through (the runbook: "avoid editing applied migrations").
The store is small and rebuildable: a corrupt file is moved aside and started afresh,
never a reason for the agent to stop. A read-only or full state directory is not
corruption: the store then answers from a read-only view, records nothing, says so in
`condition`, and never moves or deletes the file.

One owner thread holds the SQLite connection: scrapes and inspections come from many
threads, and a sqlite3 connection may only be used by the thread that made it.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote

from agent.model import Finding

DEFAULT_PATH = Path("/var/lib/driftwatch/state.db")
log = logging.getLogger(__name__)
T = TypeVar("T")

# What the store can say about itself (the values of driftwatch_state_store_condition).
OK, READ_ONLY, FULL, ERROR = "ok", "read_only", "full", "error"
CONDITIONS = (OK, READ_ONLY, FULL, ERROR)
CORRUPT = "corrupt"  # only this one ever moves a file aside

# SQLite primary result codes (sqlite3.h); extended codes keep them in the low byte.
SQLITE_PERM, SQLITE_READONLY, SQLITE_IOERR, SQLITE_CORRUPT = 3, 8, 10, 11
SQLITE_FULL, SQLITE_CANTOPEN, SQLITE_NOTADB = 13, 14, 26

SCHEMA = """
CREATE TABLE IF NOT EXISTS applied_revision (
    unit TEXT NOT NULL,
    revision TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    first_seen REAL NOT NULL,
    PRIMARY KEY (unit, revision)
)
"""


class Corrupt(sqlite3.DatabaseError):
    """The file is not a sound SQLite database (quick_check said so)."""


def filesystem_condition(directory: Path) -> str:
    """READ_ONLY, FULL or ERROR for the filesystem holding directory, as it is now."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return ERROR
    if st.f_flag & os.ST_RDONLY or not os.access(directory, os.W_OK):
        return READ_ONLY
    if st.f_bavail == 0 or (st.f_files and st.f_favail == 0):
        return FULL
    return ERROR


def classify(exc: BaseException, directory: Path) -> str:
    """CORRUPT, READ_ONLY, FULL or ERROR: what a failure of the store means.

    Only SQLite's own verdicts (CORRUPT, NOTADB, a failed quick_check) mean corruption;
    "unable to open" and "disk I/O error" are asked of the filesystem itself, because
    SQLite reports a read-only or full directory that way (no room for the -shm file).
    """
    if isinstance(exc, Corrupt):
        return CORRUPT
    if isinstance(exc, OSError):
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return READ_ONLY
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return FULL
        return filesystem_condition(directory)
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        return ERROR
    primary = code & 0xFF
    if primary in (SQLITE_CORRUPT, SQLITE_NOTADB):
        return CORRUPT
    if primary == SQLITE_FULL:
        return FULL
    if primary in (SQLITE_READONLY, SQLITE_PERM):
        return READ_ONLY
    if primary in (SQLITE_CANTOPEN, SQLITE_IOERR):
        return filesystem_condition(directory)
    return ERROR


def describe(condition: str, path: Path, exc: BaseException) -> str:
    """One line for a finding, /status and the log."""
    what = {READ_ONLY: f"the state directory {path.parent} is read-only",
            FULL: f"the filesystem of the state directory {path.parent} is full",
            }.get(condition, f"the state file {path} cannot be used")
    return (f"{what} ({exc}): applied-migration hashes are not recorded; {path} is "
            "kept as it is")


def store_finding(condition: str, detail: str, directory: Path) -> Finding:
    """The finding that says why integrity history is not being recorded."""
    hint = {READ_ONLY: f"make {directory} writable for the agent (StateDirectory= or "
                       "ReadWritePaths= in its unit, or a read-write mount)",
            FULL: f"free space on the filesystem of {directory}"}.get(
                condition, f"check {directory} and the agent's log")
    return Finding(f"state_store_{condition}", "warning", detail, hint)


class StateStore:
    """SQLite-backed state owned by one thread; every write is one transaction."""

    def __init__(self, path: str | os.PathLike[str] = DEFAULT_PATH) -> None:
        self.path = Path(path)
        # Human-readable notes about recoveries (corrupt file moved aside, ...).
        self.warnings: list[str] = []
        # OK, READ_ONLY, FULL or ERROR, as of the latest operation; detail says why.
        self.condition = OK
        self.detail = ""
        self._conn: sqlite3.Connection | None = None  # used by the owner thread only
        self._owner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="driftwatch-state")
        self._call(self._ensure_open)

    def _call(self, fn: Callable[..., T], *args: object) -> T:
        """Run fn on the owner thread and wait for it (callers may be any thread)."""
        return self._owner.submit(fn, *args).result()

    # -- owner thread: opening, recovery, degradation -------------------------------------
    def _ensure_open(self) -> sqlite3.Connection | None:
        """The read-write connection, (re)opened if needed; None while the disk refuses."""
        if self._conn is not None:
            return self._conn
        try:
            self._make_dir()
            try:
                self._conn = self._connect_checked()
            except sqlite3.DatabaseError as exc:
                if classify(exc, self.path.parent) != CORRUPT:
                    raise
                self._move_aside(exc)
                self._conn = self._connect_checked()
        except (OSError, sqlite3.Error) as exc:
            self._degrade(exc)
            return None
        return self._conn

    def _writable_again(self) -> None:
        """A write went through: whatever the condition was, it is over."""
        if self.condition != OK:
            log.warning("state store %s is writable again", self.path)
            self.condition, self.detail = OK, ""

    def _make_dir(self) -> None:
        parent = self.path.parent
        if not parent.exists():
            # Revision hashes are not secret, but nobody else has business in there.
            parent.mkdir(parents=True, mode=0o700)
            parent.chmod(0o700)  # mkdir's mode is filtered by the umask

    def _connect_checked(self) -> sqlite3.Connection:
        old_umask = os.umask(0o077)  # the db, -wal and -shm files are created 0600
        try:
            conn = sqlite3.connect(self.path, timeout=5.0, isolation_level=None)
        finally:
            os.umask(old_umask)
        try:
            # WAL: a crash mid-write leaves the previous committed state readable.
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            row = conn.execute("PRAGMA quick_check").fetchone()
            if not row or row[0] != "ok":
                raise Corrupt(f"quick_check: {row[0] if row else 'no answer'}")
            conn.execute(SCHEMA)
        except sqlite3.Error:
            conn.close()
            raise
        return conn

    def _degrade(self, exc: BaseException) -> None:
        """Remember why the store cannot write; log it once per change, not per inspection."""
        condition = classify(exc, self.path.parent)
        condition = ERROR if condition == CORRUPT else condition
        detail = describe(condition, self.path, exc)
        if condition != self.condition:
            log.warning("state store: %s", detail)
        self.condition, self.detail = condition, detail

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except sqlite3.Error:
                pass
            self._conn = None

    def _move_aside(self, exc: Exception) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        os.replace(self.path, target)
        for suffix in ("-wal", "-shm"):  # stale journals would poison the fresh file
            side = Path(str(self.path) + suffix)
            if side.exists():
                os.replace(side, Path(str(target) + suffix))
        message = (f"state file {self.path} was unreadable ({exc}); moved aside to {target} "
                   "and started afresh: migration-file integrity history restarts now")
        log.warning(message)
        self.warnings.append(message)

    def _write(self, fn: Callable[..., T], default: T, *args: object) -> T:
        """_run for a write: its success ends a read-only or full condition."""
        missing = object()
        result = self._run(fn, missing, *args)
        if result is missing:
            return default
        self._writable_again()
        return result  # type: ignore[return-value]

    def _run(self, fn: Callable[..., T], default: T, *args: object) -> T:
        """fn(conn, ...) on the owner thread; corruption -> once more on a fresh file;
        a read-only or full disk -> default, with the condition recorded."""
        conn = self._ensure_open()
        if conn is None:
            return default
        try:
            return fn(conn, *args)
        except sqlite3.Error as exc:
            self._drop()
            if classify(exc, self.path.parent) != CORRUPT:
                self._degrade(exc)
                return default
            try:
                self._move_aside(exc)
            except OSError as move_exc:
                self._degrade(move_exc)
                return default
            conn = self._ensure_open()
            return default if conn is None else fn(conn, *args)

    def _read_only_view(self, unit: str) -> dict[str, str]:
        """What the file holds, read without locks or journals (the directory refuses them)."""
        if not self.path.is_file():
            return {}
        uri = f"file:{quote(str(self.path))}?mode=ro&immutable=1"
        try:
            conn = sqlite3.connect(uri, uri=True, isolation_level=None)
            try:
                return dict(conn.execute("SELECT revision, sha256 FROM applied_revision "
                                         "WHERE unit = ?", (unit,)).fetchall())
            finally:
                conn.close()
        except sqlite3.Error as exc:
            log.debug("state store: read-only view of %s failed: %s", self.path, exc)
            return {}

    def _recorded(self, unit: str) -> dict[str, str]:
        missing: dict[str, str] = {}
        rows = self._run(lambda c: dict(c.execute(
            "SELECT revision, sha256 FROM applied_revision WHERE unit = ?",
            (unit,)).fetchall()), missing)
        return self._read_only_view(unit) if rows is missing else rows

    def close(self) -> None:
        """Close the database and end the owner thread."""
        try:
            self._call(self._drop)
        finally:
            self._owner.shutdown(wait=True)

    def __enter__(self) -> "StateStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the state itself (any thread) ----------------------------------------------------
    def record_applied(self, unit: str, revisions_with_hashes: Mapping[str, str],
                       applied_ids: Iterable[str]) -> int:
        """Remember the hash of each applied revision seen for the first time; return count.

        A revision whose file is present but which is no longer applied (downgraded) is
        forgotten, so a fix made after a downgrade is not reported as tampering later.
        Nothing is recorded (0) while the directory is read-only or full.
        """
        applied = set(applied_ids)
        return int(self._call(self._write, _record, 0, unit, dict(revisions_with_hashes),
                              applied))

    def recorded(self, unit: str) -> dict[str, str]:
        """revision -> sha256 remembered for unit (from a read-only view if need be)."""
        return self._call(self._recorded, unit)

    def integrity_findings(self, unit: str,
                           revisions_with_hashes: Mapping[str, str]) -> list[Finding]:
        """Findings for applied revisions whose file has since changed or disappeared."""
        return integrity_findings(unit, self.recorded(unit), revisions_with_hashes)


def _record(conn: sqlite3.Connection, unit: str, hashes: dict[str, str],
            applied: set[str]) -> int:
    now = time.time()
    with conn:  # one transaction: all of this round or none of it
        conn.execute("BEGIN IMMEDIATE")
        before = conn.total_changes
        conn.executemany(
            "INSERT OR IGNORE INTO applied_revision (unit, revision, sha256, first_seen) "
            "VALUES (?, ?, ?, ?)",
            [(unit, rev, digest, now) for rev, digest in hashes.items() if rev in applied])
        added = conn.total_changes - before
        conn.executemany(
            "DELETE FROM applied_revision WHERE unit = ? AND revision = ?",
            [(unit, rev) for rev in hashes if rev not in applied])
    return added


def integrity_findings(unit: str, recorded: Mapping[str, str],
                       current: Mapping[str, str]) -> list[Finding]:
    """Pure: remembered hashes vs. the files now -> modified / missing findings."""
    out = []
    for rev, digest in sorted(recorded.items()):
        now = current.get(rev)
        if now is None:
            out.append(Finding(
                "applied_migration_missing", "warning",
                f"migration {rev} was applied to the database of {unit} but its file is no "
                "longer deployed: the code cannot describe (or downgrade) that step",
                "deploy the complete migrations/versions directory of the release that "
                "applied it"))
        elif now != digest:
            out.append(Finding(
                "applied_migration_modified", "warning",
                f"migration {rev} was edited after it was applied to the database of {unit} "
                f"(sha256 {digest[:12]} when applied, {now[:12]} now): the database did not "
                "run what the file now says",
                "restore the original file and put the change in a new corrective migration"))
    return out
