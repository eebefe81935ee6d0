"""The agent's own memory: sha256 of each migration file when first seen applied (SQLite).

An applied migration whose file later changes or disappears means the code no longer
describes what the database went through (the runbook: "avoid editing applied migrations").
The store is small and rebuildable: a corrupt file is moved aside and started afresh,
never a reason for the agent to stop.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from agent.model import Finding

DEFAULT_PATH = Path("/var/lib/driftwatch/state.db")
log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS applied_revision (
    unit TEXT NOT NULL,
    revision TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    first_seen REAL NOT NULL,
    PRIMARY KEY (unit, revision)
)
"""


class StateStore:
    """SQLite-backed state; every write is one transaction; corruption is survived."""

    def __init__(self, path: str | os.PathLike[str] = DEFAULT_PATH) -> None:
        self.path = Path(path)
        # Human-readable notes about recoveries (corrupt file moved aside, ...).
        self.warnings: list[str] = []
        self._conn = self._open()

    # -- opening and recovery ---------------------------------------------------------
    def _open(self) -> sqlite3.Connection:
        self._make_dir()
        try:
            return self._connect_checked()
        except sqlite3.DatabaseError as exc:
            self._move_aside(exc)
            return self._connect_checked()

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
                raise sqlite3.DatabaseError(f"quick_check: {row[0] if row else 'no answer'}")
            conn.execute(SCHEMA)
        except sqlite3.DatabaseError:
            conn.close()
            raise
        return conn

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

    def _run(self, fn, *args):  # type: ignore[no-untyped-def]
        """Run fn(conn, ...) once more on a fresh file if the state turns out corrupt."""
        try:
            return fn(self._conn, *args)
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                raise
            self._conn.close()
            self._move_aside(exc)
            self._conn = self._connect_checked()
            return fn(self._conn, *args)

    def close(self) -> None:
        """Close the database."""
        self._conn.close()

    def __enter__(self) -> "StateStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the state itself ---------------------------------------------------------------
    def record_applied(self, unit: str, revisions_with_hashes: Mapping[str, str],
                       applied_ids: Iterable[str]) -> int:
        """Remember the hash of each applied revision seen for the first time; return count.

        A revision whose file is present but which is no longer applied (downgraded) is
        forgotten, so a fix made after a downgrade is not reported as tampering later.
        """
        applied = set(applied_ids)
        return int(self._run(_record, unit, dict(revisions_with_hashes), applied))

    def recorded(self, unit: str) -> dict[str, str]:
        """revision -> sha256 remembered for unit."""
        rows = self._run(lambda c: c.execute(
            "SELECT revision, sha256 FROM applied_revision WHERE unit = ?", (unit,)).fetchall())
        return dict(rows)

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
