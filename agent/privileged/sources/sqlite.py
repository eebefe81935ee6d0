"""The agent's read-only view of an app's SQLite file, and which files the workers hold open.

The file is read through the session child running as the unit's user
(agent/asuser/dbsession.py: ``file:...?mode=ro`` URI, ``PRAGMA query_only``): it is never
created, and no journal appears. A migration holding SQLite's write lock (BEGIN EXCLUSIVE)
makes every read fail with "database is locked": that is a migration in progress, never an
error. Which files the running workers hold open is read by root from /proc/PID/fd: link
names and stat() only, never the files' contents.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from agent.dbsql import DBAPIError, text
from agent.dburl import make_url

from agent.privileged.sources.database import (
    DEFAULT_TIMEOUTS,
    DatabaseInspection,
    DatabaseProblem,
    MigrationActivity,
    Privileges,
    ServerIdentity,
    Timeouts,
    VersionTable,
    db_label,
    session,
)

MAX_VERSION_ROWS = 100
# Files SQLite keeps beside a database: a worker holding one holds that database.
SIDE_FILES = ("-journal", "-wal", "-shm")
DB_SUFFIXES = (".db", ".sqlite", ".sqlite3", ".db3")
MISSING = "does not exist"


def sqlite_file(url: str) -> str:
    """The database file an absolute SQLite URL names ('' for memory or unreadable)."""
    try:
        database = make_url(url).database or ""
    except Exception:  # the URL was judged elsewhere
        return ""
    return "" if database in ("", ":memory:") else database


def is_locked(exc: BaseException) -> bool:
    """True when a read met the write lock of another connection (SQLITE_BUSY)."""
    orig = getattr(exc, "orig", exc)
    code = str(getattr(orig, "pgcode", "") or "")
    return code.startswith("SQLITE_BUSY") or "database is locked" in str(orig).lower()


@dataclass(frozen=True)
class SqliteState:
    """What one read-only look at the file found."""

    exists: bool = False
    revisions: tuple[str, ...] = ()
    locked: bool = False
    fingerprint: str = ""


def query_sqlite(conn: Any, table: str = "alembic_version") -> SqliteState:
    """Version table and a hash of the schema (sqlite_master) on an open session."""
    try:
        rows = list(conn.execute(text(
            "SELECT type, name, tbl_name, coalesce(sql, '') FROM sqlite_master "
            "ORDER BY type, name")))
        present = any(r[0] == "table" and r[1] == table for r in rows)
        fingerprint = hashlib.sha256(repr(rows).encode()).hexdigest() if rows else ""
        if not present:
            return SqliteState(False, (), False, fingerprint)
        quoted = '"' + table.replace('"', '""') + '"'
        revisions = conn.execute(text(f"SELECT version_num FROM {quoted} "
                                      f"LIMIT {MAX_VERSION_ROWS}")).scalars().all()
    except DBAPIError as exc:
        if is_locked(exc):
            return SqliteState(exists=True, locked=True)
        raise
    return SqliteState(True, tuple(sorted(str(r) for r in revisions)), False, fingerprint)


def inspect_sqlite(url: str, table: str = "alembic_version",
                   timeouts: Timeouts = DEFAULT_TIMEOUTS,
                   opener: Callable[[Any, Timeouts], Any] | None = None) -> DatabaseInspection:
    """The SQLite counterpart of database.inspect(): one read-only session on the file.

    Privileges do not apply (the file's permissions decide) and there is no server: the
    identity is the file's path.
    """
    started, label = time.monotonic(), db_label(url)
    path = sqlite_file(url)
    try:
        if not path.startswith("/"):
            raise DatabaseProblem(f"database {label}: not a SQLite file with an absolute path")
        with (opener or session)(url, timeouts) as conn:
            state = query_sqlite(conn, table)
    except DatabaseProblem as exc:
        error = str(exc)
        ms = round((time.monotonic() - started) * 1000, 1)
        if is_locked(exc):  # the lock met while opening: a migration holds the file
            state = SqliteState(exists=True, locked=True)
        else:
            return DatabaseInspection(label, VersionTable(label, table, error=error),
                                      MigrationActivity(label, error=error),
                                      Privileges(label, error=error),
                                      ServerIdentity(label, error=error),
                                      error=error, elapsed_ms=ms)
    ms = round((time.monotonic() - started) * 1000, 1)
    return DatabaseInspection(
        label, VersionTable(label, table, state.exists, state.revisions, state.locked,
                            elapsed_ms=ms),
        MigrationActivity(label, state.locked, elapsed_ms=ms),
        Privileges(label), ServerIdentity(label, database=path),
        elapsed_ms=ms, schema_fingerprint=state.fingerprint)


def is_missing(error: str) -> bool:
    """True when the session said the file does not exist (it was not created)."""
    return "SQLite database file" in error and MISSING in error


# -- which files the workers hold open ---------------------------------------------------------
@dataclass(frozen=True)
class OpenFile:
    """A SQLite database a process holds open (by path and identity)."""

    pid: int
    path: str
    dev: int
    ino: int


def database_path_of(link: str) -> str:
    """Pure: the database a /proc fd link names ('' when it is not a SQLite file)."""
    path = link.removesuffix(" (deleted)")
    if not path.startswith("/"):
        return ""  # socket:[..], pipe:[..], anon_inode:..
    for side in SIDE_FILES:
        if path.endswith(side):
            return path[: -len(side)]
    return path if path.endswith(DB_SUFFIXES) else ""


def open_databases(pids: Iterable[int], proc: str = "/proc") -> tuple[list[OpenFile], list[str]]:
    """SQLite files the processes hold open, from /proc/PID/fd (metadata only) and errors."""
    found: dict[tuple[int, str], OpenFile] = {}
    errors = []
    for pid in pids:
        fd_dir = f"{proc}/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError as exc:
            errors.append(f"pid {pid}: {exc.strerror or exc}")
            continue
        for fd in fds:
            try:
                path = database_path_of(os.readlink(f"{fd_dir}/{fd}"))
                if not path or (pid, path) in found:
                    continue
                st = os.stat(f"{fd_dir}/{fd}")  # the open file itself, wherever it now is
            except OSError:
                continue  # closed meanwhile
            if path.endswith(DB_SUFFIXES) or not any(path.endswith(s) for s in SIDE_FILES):
                found[(pid, path)] = OpenFile(pid, path, st.st_dev, st.st_ino)
    return list(found.values()), errors


@dataclass(frozen=True)
class FileVerdict:
    """Do the workers hold the configured file, another one, or none open."""

    status: str  # "connected", "elsewhere", "none"
    message: str = ""
    others: tuple[str, ...] = ()


def file_verdict(configured: str, identity: tuple[int, int] | None,
                 held: list[OpenFile]) -> FileVerdict:
    """Pure: compare the files the workers hold with the configured one (by inode, else path)."""
    if not held:
        return FileVerdict("none", "no SQLite file held open by the running processes")

    def same(f: OpenFile) -> bool:
        return (f.dev, f.ino) == identity if identity is not None else f.path == configured

    pids = sorted({f.pid for f in held})
    if any(same(f) for f in held):
        return FileVerdict("connected", f"{len(pids)} process(es) hold sqlite:{configured} open")
    others = tuple(sorted({f.path for f in held}))
    return FileVerdict("elsewhere", ", ".join(f"sqlite:{p}" for p in others)
                       + f" (held open by {len(pids)} process(es))", others)


def stat_identity(path: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the configured file, None when it cannot be stat()ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino
