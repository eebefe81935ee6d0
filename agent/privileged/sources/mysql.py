"""The agent's read-only view of an app's MySQL or MariaDB database.

The session is held by the child running as the unit's user, through the app's own driver
(PyMySQL or mysqlclient, agent/asuser/dbsession.py): read-only (``SET SESSION TRANSACTION
READ ONLY``, verified before every statement), ``lock_wait_timeout`` and MariaDB's
``max_statement_time`` / MySQL's ``max_execution_time``. Root sends one statement at a time
and gets rows back; this module only builds the statements and reads the rows.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent.dbsql import DBAPIError, text

from agent.checks.half_applied import LiveObjects, next_revisions, tables_named
from agent.privileged.sources.database import (
    DDL,
    DEFAULT_TIMEOUTS,
    ActiveSession,
    DatabaseInspection,
    DatabaseProblem,
    MigrationActivity,
    Privileges,
    RoleSession,
    ServerIdentity,
    Timeouts,
    VersionTable,
    db_label,
    short_query,
)

MAX_VERSION_ROWS = 100
# ER_LOCK_WAIT_TIMEOUT, ER_LOCK_NOWAIT (MySQL 8 / MariaDB), MariaDB's max_statement_time
# (ER_STATEMENT_TIMEOUT) and MySQL's max_execution_time: the statement gave up waiting.
LOCK_WAIT_ERRNOS = frozenset({"1205", "3572", "1969", "3024"})
# What a migration needs on its database (Alembic creates, alters and drops tables and
# indexes, adds foreign keys, and writes its version table).
MIGRATION_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE", "CREATE", "DROP", "ALTER",
                        "INDEX", "REFERENCES")
MYSQL_BACKENDS = frozenset({"mysql", "mariadb"})


def quote_name(name: str) -> str:
    """A MySQL identifier in backquotes (a backquote doubled)."""
    return "`" + name.replace("`", "``") + "`"


def is_lock_wait(exc: BaseException) -> bool:
    """True when a statement gave up on a lock or its time limit (not a failure)."""
    orig = getattr(exc, "orig", exc)
    code = str(getattr(orig, "pgcode", "") or "")
    low = str(orig).lower()
    return code in LOCK_WAIT_ERRNOS or "lock wait timeout" in low or \
        "max_statement_time" in low or "maximum statement execution time" in low


# -- the version table -----------------------------------------------------------------------
VERSION_EXISTS_SQL = ("SELECT COUNT(*) FROM information_schema.tables "
                      "WHERE table_schema = COALESCE(:schema, DATABASE()) AND table_name = :t")


def query_version_table(conn: Any, table: str = "alembic_version",
                        schema: str | None = None) -> tuple[bool, tuple[str, ...], bool]:
    """(exists, revisions, locked) on an open session; revisions sorted.

    locked: a migration holds the version table's row (it updated it and has not committed):
    a NOWAIT share-lock read gives up at once instead of waiting, so the agent never queues
    behind a migration.
    """
    exists = conn.execute(text(VERSION_EXISTS_SQL), {"schema": schema, "t": table}).scalar()
    if not int(exists or 0):
        return False, (), False
    name = (quote_name(schema) + "." if schema else "") + quote_name(table)
    try:
        rows = conn.execute(text(f"SELECT version_num FROM {name} "
                                 f"LIMIT {MAX_VERSION_ROWS}")).scalars().all()
    except DBAPIError as exc:
        if is_lock_wait(exc):
            return True, (), True
        raise
    return True, tuple(sorted(str(r) for r in rows)), False


def read_version_table(url: str, table: str = "alembic_version", schema: str | None = None,
                       timeouts: Timeouts = DEFAULT_TIMEOUTS,
                       opener: Callable[[Any, Timeouts], Any] | None = None) -> VersionTable:
    """database.read_version_table() for MySQL: one session through opener."""
    started, label = time.monotonic(), db_label(url)
    if opener is None:
        raise ValueError("MySQL is only read through the session child (an opener)")
    try:
        with opener(url, timeouts) as conn:
            exists, revisions, locked = query_version_table(conn, table, schema)
    except DatabaseProblem as exc:
        return VersionTable(label, table, error=str(exc),
                            elapsed_ms=round((time.monotonic() - started) * 1000, 1))
    return VersionTable(label, table, exists, revisions, locked,
                        elapsed_ms=round((time.monotonic() - started) * 1000, 1))


# -- a migration in progress -----------------------------------------------------------------
PROCESSLIST_SQL = """
SELECT id, COALESCE(user, ''), COALESCE(host, ''), COALESCE(db, ''), COALESCE(command, ''),
       COALESCE(time, 0), COALESCE(state, ''), COALESCE(info, '')
FROM information_schema.processlist
WHERE id <> CONNECTION_ID()
ORDER BY id
LIMIT 2000
"""


@dataclass(frozen=True)
class Process:
    """One row of the server's processlist (our user's threads, or all with PROCESS)."""

    id: int
    user: str
    host: str
    db: str
    command: str
    seconds: float
    state: str
    info: str


def query_processlist(conn: Any) -> tuple[Process, ...]:
    """The other threads the session may see."""
    return tuple(Process(int(r[0]), str(r[1]), str(r[2]), str(r[3]), str(r[4]),
                         float(r[5] or 0), str(r[6]), str(r[7]))
                 for r in conn.execute(text(PROCESSLIST_SQL)))


# MySQL's ways of carrying a password in a statement: IDENTIFIED BY 'x' (and VIA ... USING
# 'x', PASSWORD('x')), masked before a query text leaves (short_query masks PASSWORD 'x').
_SECRET_SQL = re.compile(r"(?i)(\b(?:IDENTIFIED\s+(?:WITH\s+\S+\s+)?BY|USING|PASSWORD)\s*\(?\s*)"
                         r"('(?:[^'\\]|\\.|'')*'|\"(?:[^\"\\]|\\.)*\")")


def mask_statement(query: str) -> str:
    """Pure: a statement with its password literals replaced by '****'."""
    return _SECRET_SQL.sub(r"\1'****'", query)


def activity_of(processes: tuple[Process, ...], database: str,
                table: str = "alembic_version") -> tuple[ActiveSession, ...]:
    """Pure: threads running DDL on the database, or waiting for a metadata lock there."""
    found = []
    for p in processes:
        if p.command not in ("Query", "Execute") or (p.db and p.db != database):
            continue
        waiting = "metadata lock" in p.state.lower()
        if DDL.match(p.info):
            reason = f"running DDL ({p.state})" if p.state else "running DDL"
        elif waiting:
            reason = f"waits for a metadata lock ({p.state})"
        else:
            continue
        found.append(ActiveSession(p.id, p.user, p.state, round(p.seconds, 1),
                                   short_query(mask_statement(p.info)), reason))
    return tuple(found)


def version_row_locked(conn: Any, table: str, schema: str | None) -> bool:
    """True when another transaction holds the version table's row (an upgrade between its
    version UPDATE and its COMMIT); NOWAIT, so it never waits on the migration."""
    name = (quote_name(schema) + "." if schema else "") + quote_name(table)
    try:
        conn.execute(text(f"SELECT version_num FROM {name} LIMIT 1 LOCK IN SHARE MODE NOWAIT"))
    except DBAPIError as exc:
        return is_lock_wait(exc)
    return False


# -- privileges ------------------------------------------------------------------------------
GRANT = re.compile(r"^GRANT\s+(?P<privs>.+?)\s+ON\s+(?P<scope>\S+)\s+TO\s", re.I | re.S)


def _scope_matches(scope: str, database: str) -> bool:
    """Pure: does a grant's ON clause (`db`.*, *.*, `db\\_%`.*) cover the whole database."""
    if scope == "*.*":
        return True
    db, sep, rest = scope.partition(".")
    if not sep or rest != "*":
        return False  # a table- or routine-level grant covers no new table
    db = db.strip("`").replace("``", "`")
    # LIKE wildcards in database grants: % any, _ one character, a backslash escapes.
    pattern, chars = "", iter(db)
    for ch in chars:
        if ch == "\\":
            pattern += re.escape(next(chars, ""))
        else:
            pattern += ".*" if ch == "%" else "." if ch == "_" else re.escape(ch)
    return re.fullmatch(pattern, database) is not None


def granted_on(grants: list[str], database: str) -> set[str]:
    """Pure: the privileges SHOW GRANTS lines give on every table of `database`.

    Only the privilege list and the ON clause are read (a line may carry a password hash:
    nothing else of it is kept).
    """
    have: set[str] = set()
    for line in grants:
        m = GRANT.match(line.strip())
        if not m or not _scope_matches(m.group("scope"), database):
            continue
        for priv in m.group("privs").split(","):
            priv = " ".join(priv.split()).upper()
            if priv.startswith("PROXY") or "(" in priv:  # column grants: not for DDL
                continue
            have.update(MIGRATION_PRIVILEGES if priv.startswith("ALL") else {priv})
    return have


@dataclass(frozen=True)
class MysqlPrivileges:
    """What the app's user may do on its database, from SHOW GRANTS."""

    user: str = ""
    database: str = ""
    missing: tuple[str, ...] = ()
    error: str = ""


def query_privileges(conn: Any) -> MysqlPrivileges:
    """SHOW GRANTS for the session's own user (CURRENT_USER, as the server matched it)."""
    user, database = conn.execute(text("SELECT CURRENT_USER(), DATABASE()")).one()
    grants = [str(r[0]) for r in conn.execute(text("SHOW GRANTS"))]
    have = granted_on(grants, str(database or ""))
    missing = tuple(p for p in MIGRATION_PRIVILEGES if p not in have)
    return MysqlPrivileges(str(user or ""), str(database or ""), missing)


# -- identity, sessions, schema fingerprint ----------------------------------------------------
IDENTITY_SQL = ("SELECT @@hostname, @@port, COALESCE(DATABASE(), ''), VERSION(), "
                "CONNECTION_ID(), @@server_id")


def query_identity(conn: Any) -> ServerIdentity:
    """Server host name, port, database, version and our thread id."""
    host, port, database, version, thread, server_id = conn.execute(text(IDENTITY_SQL)).one()
    uuid = _optional(conn, "SELECT @@server_uuid")  # MySQL only
    ident = str(uuid) if uuid else f"{host}:{port}:{server_id}"
    return ServerIdentity("", "", int(port or 0), str(database), ident, (), str(version),
                          int(thread or 0))


def _optional(conn: Any, sql: str) -> Any:
    try:
        return conn.execute(text(sql)).scalar()
    except DBAPIError:
        return None


def client_of(host: str) -> tuple[str, int]:
    """Pure: processlist's Host ('127.0.0.1:54321', '[::1]:5', 'localhost') -> (addr, port)."""
    addr, sep, port = host.rpartition(":")
    if not sep or not port.isdigit():
        return host, -1  # a unix socket ('localhost') or a name without a port
    return addr.strip("[]"), int(port)


def role_sessions(processes: tuple[Process, ...]) -> tuple[RoleSession, ...]:
    """The processlist as the sessions the workers' sockets are matched against."""
    out = []
    for p in processes:
        if p.command in ("Daemon", "Binlog Dump") or not p.user:
            continue
        addr, port = client_of(p.host)
        out.append(RoleSession(p.id, p.db, addr, port, "", p.command, p.user))
    return tuple(out)


FINGERPRINT_SQL = """
SELECT COUNT(*), COALESCE(SUM(CRC32(x)), 0), COALESCE(BIT_XOR(CRC32(CONCAT(x, '#'))), 0)
FROM (
  SELECT CONCAT_WS('|', 'col', table_name, column_name, column_type, is_nullable,
                   COALESCE(column_default, '~'), ordinal_position, extra) AS x
    FROM information_schema.columns WHERE table_schema = DATABASE()
  UNION ALL
  SELECT CONCAT_WS('|', 'idx', table_name, index_name, non_unique, seq_in_index, column_name)
    FROM information_schema.statistics WHERE table_schema = DATABASE()
  UNION ALL
  SELECT CONCAT_WS('|', 'fk', table_name, constraint_name, column_name,
                   COALESCE(referenced_table_name, ''), COALESCE(referenced_column_name, ''))
    FROM information_schema.key_column_usage WHERE table_schema = DATABASE()
) AS s
"""


def query_schema_fingerprint(conn: Any) -> str:
    """A hash of the database's columns, indexes and keys ('' when it cannot be read)."""
    try:
        row = conn.execute(text(FINGERPRINT_SQL)).first()
    except DBAPIError:
        return ""
    return hashlib.sha256(repr(tuple(str(v) for v in row)).encode()).hexdigest()[:32] \
        if row else ""


# -- the objects a half-applied revision leaves ------------------------------------------------
MAX_TABLES = 200


def query_live_objects(conn: Any, tables: set[str]) -> LiveObjects:
    """Which of these tables, their columns and indexes exist in the database now."""
    names = sorted(tables)[:MAX_TABLES]
    if not names:
        return LiveObjects()
    params = {f"t{i}": n for i, n in enumerate(names)}
    among = ", ".join(f":t{i}" for i in range(len(names)))
    where = f"table_schema = DATABASE() AND table_name IN ({among})"
    found = frozenset(str(r[0]) for r in conn.execute(text(
        f"SELECT table_name FROM information_schema.tables WHERE {where}"), params))
    columns = frozenset((str(r[0]), str(r[1])) for r in conn.execute(text(
        f"SELECT table_name, column_name FROM information_schema.columns WHERE {where}"),
        params))
    indexes = frozenset((str(r[0]), str(r[1])) for r in conn.execute(text(
        f"SELECT DISTINCT table_name, index_name FROM information_schema.statistics "
        f"WHERE {where}"), params))
    return LiveObjects(found, columns, indexes)


# -- one round trip for everything -----------------------------------------------------------
@dataclass(frozen=True)
class MysqlInspection:
    """DatabaseInspection, plus the MySQL-shaped privileges and the processlist."""

    inspection: DatabaseInspection
    privileges: MysqlPrivileges
    processes: tuple[Process, ...] = ()
    # The tables, columns and indexes the revisions right after the current one name.
    live: LiveObjects | None = None


def inspect_mysql(url: str, table: str = "alembic_version", schema: str | None = None,
                  timeouts: Timeouts = DEFAULT_TIMEOUTS,
                  opener: Callable[[Any, Timeouts], Any] | None = None,
                  revisions: Sequence[Mapping[str, Any]] = ()) -> MysqlInspection:
    """Version table, activity, privileges, identity, sessions: one session as the unit's
    user (opener: agent.privileged.dbclient.user_session). revisions: the probe's, with
    the operations of each; the objects the next revision names are read too."""
    started, label = time.monotonic(), db_label(url)
    if opener is None:
        raise ValueError("MySQL is only read through the session child (an opener)")
    try:
        with opener(url, timeouts) as conn:
            ident = query_identity(conn)
            processes = query_processlist(conn)
            exists, revisions_, locked = query_version_table(conn, table, schema)
            row_locked = exists and not locked and version_row_locked(conn, table, schema)
            priv = query_privileges(conn)
            fingerprint = query_schema_fingerprint(conn)
            live = None
            if exists and revisions and not locked:
                live = query_live_objects(conn, tables_named(next_revisions(revisions_,
                                                                            revisions)))
    except DatabaseProblem as exc:
        error = str(exc)
        ms = round((time.monotonic() - started) * 1000, 1)
        return MysqlInspection(DatabaseInspection(
            label, VersionTable(label, table, error=error), MigrationActivity(label, error=error),
            Privileges(label, error=error), ServerIdentity(label, error=error), error=error,
            elapsed_ms=ms), MysqlPrivileges(error=error))
    ms = round((time.monotonic() - started) * 1000, 1)
    sessions = list(activity_of(processes, schema or ident.database, table))
    if row_locked:
        sessions.append(ActiveSession(0, "", "", 0.0, "", f"holds the row of {table} "
                                      "(updated, not committed yet)"))
    activity = MigrationActivity(label, bool(sessions) or locked, tuple(sessions),
                                 elapsed_ms=ms)
    inspection = DatabaseInspection(
        label, VersionTable(label, table, exists, revisions_, locked, elapsed_ms=ms), activity,
        Privileges(label, user=priv.user, schema=priv.database, can_create=not priv.missing,
                   can_use=True),
        ServerIdentity(**{**ident.__dict__, "label": label}), role_sessions(processes),
        elapsed_ms=ms, schema_fingerprint=fingerprint)
    return MysqlInspection(inspection, priv, processes, live)
