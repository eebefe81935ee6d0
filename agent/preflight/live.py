"""The live database, read-only: how big each affected table is, and what a lock would queue behind.

One short read-only session (the agent's own, agent/privileged/sources/database.py) and one
catalog statement in three parts: sizes from pg_class, locks held or awaited on those tables
from pg_locks joined to pg_stat_activity, and sessions with an old or idle open transaction
(plus the types of columns about to change, when there are any). None of them takes a lock
on a user table (to_regclass and pg_total_relation_size do not), so the preflight itself can
never queue behind a migration. A role without pg_read_all_stats sees other roles' sessions
without their state or query: their locks in pg_locks are still seen.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

from typing import Any

from agent.dbsql import Connection, text

from agent.context import AppContext
from agent.privileged.dbclient import user_session
from agent.privileged.sources import database

# A transaction open longer than this is reported even if it holds no lock on the tables yet.
LONG_TRANSACTION_SECONDS = 60.0
MAX_SESSIONS = 50


@dataclass(frozen=True)
class TableSize:
    """One table as the catalog sees it now."""

    name: str
    exists: bool
    rows: int | None = None      # pg_class.reltuples; None when never analysed (-1)
    total_bytes: int = 0         # pg_total_relation_size: heap, indexes, TOAST


@dataclass(frozen=True)
class Session:
    """Another backend: a lock it holds or waits for on an affected table, or an old transaction."""

    pid: int
    kind: str                    # pg_dump, anti-wraparound autovacuum, idle in transaction, ...
    table: str = ""
    mode: str = ""               # pg_locks.mode, e.g. AccessShareLock
    granted: bool = True
    state: str = ""
    transaction_seconds: float | None = None
    application: str = ""
    query: str = ""

    def describe(self) -> str:
        """'pid 4242 (idle in transaction for 41 s, holds AccessShareLock)'."""
        what = self.kind
        if self.transaction_seconds is not None:
            what += f" for {self.transaction_seconds:.0f} s"
        if self.mode:
            what += f", {'holds' if self.granted else 'waits for'} {self.mode}"
        return f"pid {self.pid} ({what})"


@dataclass(frozen=True)
class LiveState:
    """Sizes and sessions, or the error that kept them from being read."""

    tables: tuple[TableSize, ...] = ()
    lockers: tuple[Session, ...] = ()        # hold or await a lock on an affected table
    old_transactions: tuple[Session, ...] = ()
    error: str = ""
    # (table, column) -> (type name as regtype says it, atttypmod): for type changes
    columns: dict[tuple[str, str], tuple[str, int]] = field(default_factory=dict)

    def table(self, name: str) -> TableSize | None:
        """The size row of name ('items' and 'public.items' both match 'items')."""
        for row in self.tables:
            if row.name == name:
                return row
        short = name.rsplit(".", 1)[-1]
        return next((r for r in self.tables if r.name.rsplit(".", 1)[-1] == short), None)


def quote_name(name: str) -> str:
    """'public.Items' -> '"public"."Items"': to_regclass keeps the case the parser saw."""
    return ".".join('"' + part.replace('"', '""') + '"' for part in name.split(".", 1))


def session_kind(state: str | None, backend_type: str | None, application: str | None,
                 query: str | None, xact_seconds: float | None) -> str:
    """What a session is, in the words an admin uses."""
    query = query or ""
    if backend_type == "autovacuum worker":
        # An anti-wraparound vacuum does not yield to a lock request; a plain one is
        # cancelled by the lock request after deadlock_timeout.
        return "anti-wraparound autovacuum" if "wraparound" in query else "autovacuum"
    if (application or "").startswith(("pg_dump", "pg_dumpall")):
        return "pg_dump"
    if state and state.startswith("idle in transaction"):
        return "idle in transaction"
    if state is None:
        return "session of another role"
    if xact_seconds is not None and xact_seconds >= LONG_TRANSACTION_SECONDS:
        return "long transaction"
    return "active transaction" if state == "active" else f"session ({state})"


# Sizes of the affected tables, the locks held or awaited on them, and old or idle open
# transactions: one statement (planned once, one answer), each row tagged with its part.
_LIVE = text("""
WITH n AS (
  SELECT n.name, c.oid, c.reltuples::float8 AS reltuples,
         pg_total_relation_size(c.oid) AS total
  FROM unnest(CAST(:names AS text[]), CAST(:quoted AS text[])) AS n(name, quoted)
  LEFT JOIN pg_class c ON c.oid = to_regclass(n.quoted)
)
(SELECT 'size', n.name, n.oid::bigint, n.reltuples, n.total, NULL::int, NULL::text,
        NULL::bool, NULL::text, NULL::text, NULL::text, NULL::float8, NULL::text
 FROM n)
UNION ALL
(SELECT 'lock', NULL, l.relation::bigint, NULL, NULL, l.pid, l.mode, l.granted, a.state,
        a.backend_type, a.application_name,
        EXTRACT(EPOCH FROM clock_timestamp() - a.xact_start)::float8, left(a.query, 200)
 FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
 WHERE l.locktype = 'relation' AND l.relation IN (SELECT oid FROM n WHERE oid IS NOT NULL)
   AND l.pid <> pg_backend_pid()
 ORDER BY l.granted DESC, l.pid
 LIMIT :limit)
UNION ALL
(SELECT 'old', NULL, NULL, NULL, NULL, pid, NULL, NULL, state, backend_type,
        application_name, EXTRACT(EPOCH FROM clock_timestamp() - xact_start)::float8,
        left(query, 200)
 FROM pg_stat_activity
 WHERE datname = current_database() AND pid <> pg_backend_pid() AND xact_start IS NOT NULL
   AND (state LIKE 'idle in transaction%' OR backend_type = 'autovacuum worker'
        OR application_name LIKE 'pg_dump%'
        OR clock_timestamp() - xact_start > make_interval(secs => :long))
 ORDER BY xact_start
 LIMIT :limit)
""")

_COLUMNS = text("""
SELECT n.t, n.c, a.atttypid::regtype::text, a.atttypmod
FROM unnest(CAST(:tables AS text[]), CAST(:quoted AS text[]), CAST(:columns AS text[]))
     AS n(t, q, c)
JOIN pg_attribute a ON a.attrelid = to_regclass(n.q) AND a.attname = n.c
  AND NOT a.attisdropped
""")


def query_live(conn: Connection, tables: Iterable[str],
               columns: Iterable[tuple[str, str]] = ()) -> LiveState:
    """The catalog reads on an open read-only connection."""
    names = sorted(set(t for t in tables if t))
    rows = list(conn.execute(_LIVE, {"names": names, "quoted": [quote_name(n) for n in names],
                                     "long": LONG_TRANSACTION_SECONDS,
                                     "limit": MAX_SESSIONS}))
    sizes, oids = [], {}
    for kind, name, oid, reltuples, total, *_ in rows:
        if kind != "size":
            continue
        if oid is None:
            sizes.append(TableSize(name, False))
            continue
        oids[int(oid)] = name
        count = None if reltuples is None or reltuples < 0 else int(reltuples)
        sizes.append(TableSize(name, True, count, int(total or 0)))
    lockers, old = [], []
    for kind, _, rel, _, _, pid, mode, granted, state, btype, app, xact, query in rows:
        if kind == "lock":
            lockers.append(Session(
                int(pid), session_kind(state, btype, app, query, xact), oids.get(int(rel), ""),
                str(mode), bool(granted), state or "", xact, app or "", query or ""))
        elif kind == "old":
            old.append(Session(int(pid), session_kind(state, btype, app, query, xact),
                               state=state or "", transaction_seconds=xact,
                               application=app or "", query=query or ""))
    types = {}
    pairs = sorted(set(columns))
    if pairs:
        for table, column, typname, typmod in conn.execute(_COLUMNS, {
                "tables": [t for t, _ in pairs], "quoted": [quote_name(t) for t, _ in pairs],
                "columns": [c for _, c in pairs]}):
            types[(table, column)] = (str(typname), int(typmod))
    return LiveState(tuple(sizes), tuple(lockers), tuple(old), columns=types)


Opener = Callable[[str], AbstractContextManager[Connection]]


def open_session(url: str) -> AbstractContextManager[Connection]:
    """A read-only session in this process: for tests on a database the test owns only."""
    return database.session(url)


def user_reader(ctx: AppContext, probe_user: str = "",
                allow_root: bool = False) -> Callable[..., LiveState]:
    """read_live through the agent's session held as the unit's user (the app's URL is the
    app user's to write: libpq must read that user's files, never root's)."""
    def opener(url: str) -> AbstractContextManager[Any]:
        return user_session(ctx, url, database.DEFAULT_TIMEOUTS, allow_root=allow_root,
                            probe_user=probe_user)
    return functools.partial(read_live, opener=opener)


def read_live(url: str, tables: Iterable[str], opener: Opener | None = None,
              columns: Iterable[tuple[str, str]] = ()) -> LiveState:
    """Sizes and would-be blockers of tables (and the types of columns about to change);
    a database problem comes back as error."""
    try:
        with (opener or open_session)(url) as conn:
            return query_live(conn, tables, columns)
    except database.DatabaseProblem as exc:
        return LiveState(error=str(exc))
