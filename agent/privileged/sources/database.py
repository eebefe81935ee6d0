"""The agent's own read-only view of an app's PostgreSQL database.

Every session is opened with psycopg2 (SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3),
NullPool, autocommit, default_transaction_read_only=on and short statement/lock timeouts:
it can never write, never holds a transaction or a pooled connection open, and gives up
rather than queue behind a running migration. Functions return dataclasses; database
problems come back as a masked one-line error text, never as an exception.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from agent.dbsql import Connection, DBAPIError, NullPool, create_engine, text
from agent.dbsql import SQLError as SQLAlchemyError
from agent.dburl import URL, ArgumentError, make_url

from agent.secrets import mask_url

DRIVER = "postgresql+psycopg2"
APPLICATION_NAME = "driftwatch"
DEFAULT_PORT = 5432
MAX_QUERY_CHARS = 200
# Statements that change the schema: what a migration in progress is running.
DDL = re.compile(r"^\s*(?:/\*.*?\*/\s*|--[^\n]*\n\s*)*(ALTER|CREATE|DROP|TRUNCATE|COMMENT|"
                 r"REINDEX|CLUSTER|RENAME|GRANT|REVOKE)\b", re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True)
class Timeouts:
    """Bounds of every agent session (seconds / milliseconds)."""

    connect_s: int = 3
    statement_ms: int = 3000
    lock_ms: int = 500
    idle_in_transaction_ms: int = 5000


DEFAULT_TIMEOUTS = Timeouts()


class DatabaseProblem(Exception):
    """Internal: a database error already turned into a masked one-line text."""


# -- URLs ----------------------------------------------------------------------------------
def agent_url(url: str | URL) -> URL:
    """The app's URL with the psycopg2 driver, whatever driver it named (ValueError if not PG)."""
    try:
        parsed = make_url(url) if isinstance(url, str) else url
    except (ArgumentError, ValueError, TypeError) as exc:
        # e.g. SQLAlchemy's int() of a port "5432x": the app's user wrote this URL.
        raise ValueError(f"not a valid database URL ({_url_problem(exc)})") from None
    backend = parsed.drivername.split("+", 1)[0]
    if backend not in ("postgresql", "postgres", "pgsql"):
        raise ValueError(f"only PostgreSQL databases are inspected, not {backend}")
    return parsed.set(drivername=DRIVER)


def _url_problem(exc: BaseException) -> str:
    """What is wrong with a URL, without quoting it (it may hold a password)."""
    text = str(exc)
    if "invalid literal for int()" in text:
        return "the port is not a number"
    if isinstance(exc, ArgumentError):
        return "SQLAlchemy cannot parse it"
    return type(exc).__name__


def _parse(url: str | URL) -> URL | None:
    try:
        return agent_url(url)
    except ValueError:
        try:
            return make_url(url) if isinstance(url, str) else url
        except (ArgumentError, ValueError, TypeError):
            return None


# The backends driftwatch knows by name; their default ports (a label never guesses 5432).
POSTGRES_BACKENDS = ("postgresql", "postgres", "pgsql")
DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306, "mssql": 1433,
                 "oracle": 1521}


def backend_of(url: str | URL) -> str:
    """'postgresql', 'sqlite', 'mysql', ... as SQLAlchemy names it ('' when unreadable)."""
    try:
        parsed = make_url(url) if isinstance(url, str) else url
    except (ArgumentError, ValueError, TypeError):
        return ""
    backend = parsed.drivername.split("+", 1)[0]
    return "postgresql" if backend in POSTGRES_BACKENDS else backend


def url_host_port(url: str | URL) -> tuple[str, int]:
    """(host or unix socket directory, port) as libpq would use them ('' for the default)."""
    parsed = _parse(url)
    if parsed is None:
        return "", DEFAULT_PORT
    backend = backend_of(parsed)
    if backend not in ("postgresql", ""):  # no libpq rules: the URL's host, the usual port
        return parsed.host or "", parsed.port or DEFAULT_PORTS.get(backend, 0)
    host = parsed.host or ""
    query_host = parsed.query.get("host")
    if not host and query_host:  # postgresql:///app?host=/run/postgresql
        host = query_host if isinstance(query_host, str) else query_host[0]
    port = parsed.port
    if port is None:
        query_port = parsed.query.get("port")
        try:
            port = int(query_port if isinstance(query_port, str) else (query_port or [0])[0])
        except ValueError:
            port = 0
    return host, port or DEFAULT_PORT


def db_label(url: str | URL) -> str:
    """'host:port/dbname' for metrics and messages: never a user or a password."""
    parsed = _parse(url)
    if parsed is None:
        return "invalid-url"
    if backend_of(parsed) == "sqlite":  # the file: 'sqlite:/srv/app/instance/app.db'
        return f"sqlite:{parsed.database or ':memory:'}"
    host, port = url_host_port(parsed)
    if not port:  # a backend whose usual port driftwatch does not know
        return f"{host or 'localhost'}/{parsed.database or ''}"
    if ":" in host and not host.startswith("/"):
        host = f"[{host}]"
    return f"{host or 'localhost'}:{port}/{parsed.database or ''}"


def _connect_args(parsed: URL, timeouts: Timeouts) -> tuple[URL, dict[str, Any]]:
    options = (f"-c default_transaction_read_only=on -c statement_timeout={timeouts.statement_ms}"
               f" -c lock_timeout={timeouts.lock_ms}"
               f" -c idle_in_transaction_session_timeout={timeouts.idle_in_transaction_ms}")
    # Keep the app's own options (e.g. -c search_path=...): they decide which schema
    # unqualified names such as alembic_version resolve to. Ours come last and win.
    app_options = parsed.query.get("options")
    if app_options:
        app_options = app_options if isinstance(app_options, str) else " ".join(app_options)
        options = f"{app_options} {options}"
    query = {k: v for k, v in parsed.query.items()
             if k not in ("options", "application_name", "connect_timeout")}
    return parsed.set(query=query), {"options": options, "application_name": APPLICATION_NAME,
                                     "connect_timeout": timeouts.connect_s}


@contextmanager
def session(url: str | URL, timeouts: Timeouts = DEFAULT_TIMEOUTS) -> Iterator[Connection]:
    """One read-only autocommit connection; raises DatabaseProblem with a masked text."""
    label = db_label(url)
    try:
        parsed, connect_args = _connect_args(agent_url(url), timeouts)
    except ValueError as exc:
        raise DatabaseProblem(f"database {label}: {exc}") from None
    engine = create_engine(parsed, poolclass=NullPool, isolation_level="AUTOCOMMIT",
                           connect_args=connect_args)
    try:
        try:
            conn = engine.connect()
        except (SQLAlchemyError, OSError) as exc:
            raise DatabaseProblem(describe_error(label, exc)) from None
        try:
            yield conn
        except SQLAlchemyError as exc:
            raise DatabaseProblem(describe_error(label, exc)) from None
        finally:
            conn.close()
    finally:
        engine.dispose()


def describe_error(label: str, exc: BaseException) -> str:
    """A one-line, masked reason: 'database h:p/db unreachable: connection refused'."""
    orig = getattr(exc, "orig", None) or exc
    raw = str(orig).strip()
    low = raw.lower()
    first = raw.splitlines()[0] if raw else type(orig).__name__
    if "connection refused" in low:
        reason = "unreachable: connection refused"
    elif "timeout expired" in low or "timed out" in low:
        reason = "unreachable: connection timed out"
    elif "could not translate host name" in low:
        reason = "unreachable: unknown host name"
    elif "no such file or directory" in low and "socket" in low:
        reason = "unreachable: no server socket at that path"
    elif "password authentication failed" in low or "no password supplied" in low:
        reason = "authentication failed: " + re.sub(r".*?(password|no password)", r"\1",
                                                   first, count=1, flags=re.I)
    elif re.search(r'database ".*" does not exist', low):
        reason = "does not exist"
    elif "lock timeout" in low:
        reason = "busy: lock timeout (a migration or other DDL holds the table)"
    elif "statement timeout" in low:
        reason = "slow: statement timeout"
    else:
        reason = "error: " + re.sub(r"^(FATAL|ERROR):\s+", "", first)
    reason = " ".join(mask_url(reason).split())
    return f"database {label} {reason}"[:400]


def _timed(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)


# -- the version table -----------------------------------------------------------------
@dataclass(frozen=True)
class VersionTable:
    """alembic_version as the database holds it (exists None: could not be read)."""

    label: str
    table: str
    exists: bool | None = None
    revisions: tuple[str, ...] = ()
    # True when our read gave up on a lock: somebody (a migration) holds the table.
    locked: bool = False
    error: str = ""
    elapsed_ms: float = 0.0


def _qualified(table: str, schema: str | None) -> str:
    # to_regclass takes a (possibly quoted) name; quote each part so case is kept.
    parts = ([schema] if schema else []) + [table]
    return ".".join('"' + p.replace('"', '""') + '"' for p in parts)


MAX_VERSION_ROWS = 100


def query_version_table(conn: Connection, table: str = "alembic_version",
                        schema: str | None = None) -> tuple[bool, tuple[str, ...], bool]:
    """(exists, revisions, locked) on an open session; revisions sorted."""
    name = _qualified(table, schema)
    # to_regclass takes no lock: it answers even while a migration holds the table.
    oid = conn.execute(text("SELECT to_regclass(:n)::oid"), {"n": name}).scalar()
    if oid is None:
        return False, (), False
    try:
        # Capped: the table is the app's to fill; 90,000 rows must not become 90,000 anything.
        rows = conn.execute(text(f"SELECT version_num FROM {name} ORDER BY version_num "
                                 f"LIMIT {MAX_VERSION_ROWS}")).scalars().all()
    except DBAPIError as exc:
        if is_lock_wait(exc):
            return True, (), True
        raise
    return True, tuple(sorted(str(r) for r in rows)), False


# lock_not_available (our lock_timeout) and query_canceled (statement_timeout): reading a
# one-row table only runs out of time when somebody holds it.
LOCK_WAIT_SQLSTATES = frozenset({"55P03", "57014"})


def is_lock_wait(exc: BaseException) -> bool:
    """True when a statement gave up waiting (lock or statement timeout), not failed."""
    orig = getattr(exc, "orig", exc)
    code = getattr(orig, "pgcode", None) or ""
    text_ = str(orig).lower()
    return code in LOCK_WAIT_SQLSTATES or "lock timeout" in text_ or \
        "statement timeout" in text_


def read_version_table(url: str | URL, table: str = "alembic_version",
                       schema: str | None = None,
                       timeouts: Timeouts = DEFAULT_TIMEOUTS,
                       opener: Callable[[Any, Timeouts], Any] | None = None) -> VersionTable:
    """Does the version table exist, and which revision(s) does it hold (opener as in
    inspect(): the agent passes the session held as the unit's user)."""
    started, label = time.monotonic(), db_label(url)
    try:
        with (opener or session)(url, timeouts) as conn:
            exists, revisions, locked = query_version_table(conn, table, schema)
    except DatabaseProblem as exc:
        return VersionTable(label, table, error=str(exc), elapsed_ms=_timed(started))
    return VersionTable(label, table, exists, revisions, locked, elapsed_ms=_timed(started))


# -- a migration in progress ---------------------------------------------------------------
@dataclass(frozen=True)
class ActiveSession:
    """Another session that holds or awaits the version table, or runs DDL."""

    pid: int
    user: str
    state: str
    # Seconds since its transaction (or query) began.
    duration_s: float
    query: str
    reason: str  # "holds lock on alembic_version", "waits for ...", "running DDL"


@dataclass(frozen=True)
class MigrationActivity:
    """Is a migration (or other DDL) running against this database right now."""

    label: str
    in_progress: bool = False
    sessions: tuple[ActiveSession, ...] = ()
    # Other roles' queries are hidden unless we are superuser / pg_read_all_stats.
    queries_hidden: bool = False
    error: str = ""
    elapsed_ms: float = 0.0


# Who holds or awaits the version table (its locks), who holds an ACCESS EXCLUSIVE lock (DDL
# takes them on the tables it alters and keeps them until commit: a migration between
# statements, or sleeping in a data step, still holds them; only tables we can see count:
# a relation created in another open transaction is invisible to us and may as well be a
# temporary table, CREATE TEMP TABLE takes the same lock), and which sessions are running a
# statement now (DDL among them). One statement (pg_locks and pg_stat_activity read once,
# planned once: half the CPU of three); each row tagged with the question it answers.
ACTIVITY_SQL = """
WITH l AS (
  SELECT pid, relation, mode, granted FROM pg_locks
   WHERE locktype = 'relation'
     AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
), a AS (
  SELECT pid, datname, state AS raw_state, coalesce(usename, '') AS usename,
         coalesce(state, '') AS state,
         extract(epoch FROM now() - coalesce(xact_start, query_start)) AS secs,
         coalesce(query, '') AS query, coalesce(application_name, '') AS app
    FROM pg_stat_activity
   WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'
)
(SELECT 'lock', a.pid, a.usename, a.state, a.secs, a.query, l.mode, l.granted, NULL::name,
        a.app
   FROM l JOIN a ON a.pid = l.pid
  WHERE l.relation = to_regclass(:n))
UNION ALL
(SELECT 'exclusive', a.pid, a.usename, a.state, a.secs, a.query, NULL, NULL, c.relname,
        a.app
   FROM l JOIN a ON a.pid = l.pid
   JOIN pg_class c ON c.oid = l.relation
   JOIN pg_namespace n ON n.oid = c.relnamespace
  WHERE l.mode = 'AccessExclusiveLock' AND l.granted
    AND c.relpersistence <> 't' AND n.nspname <> 'pg_toast'
  ORDER BY a.pid, c.relname
  LIMIT 500)
UNION ALL
(SELECT 'active', a.pid, a.usename, a.state, a.secs, a.query, NULL, NULL, NULL, a.app
   FROM a
  WHERE a.datname = current_database() AND a.raw_state = 'active'
  LIMIT 500)
"""
ACTIVITY_ORDER = ("lock", "exclusive", "active")
# The agent's own sessions: its session held as the unit's user (dbclient, this module) and
# its probe. Both are read-only: on the version table they only ever take ACCESS SHARE (a
# read inside their batch's transaction), never what a migration takes.
AGENT_APPLICATION_NAMES = frozenset({APPLICATION_NAME, "driftwatch-probe"})


def short_query(query: str, limit: int = MAX_QUERY_CHARS) -> str:
    """One line, masked (a query can carry a password: ALTER ROLE ... PASSWORD), truncated."""
    query = re.sub(r"(?i)(\bPASSWORD\s+)('(?:[^']|'')*'|\S+)", r"\1'****'", query)
    flat = " ".join(mask_url(query).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def agent_read(kind: str, application_name: str, mode: str | None) -> bool:
    """Pure: an ACCESS SHARE lock on the version table held (or awaited) by one of the agent's
    own read-only sessions: another inspection reading it (e.g. the previous agent's session
    child finishing its batch after a restart), never a migration."""
    return kind == "lock" and mode == "AccessShareLock" \
        and application_name in AGENT_APPLICATION_NAMES


def query_migration_activity(conn: Connection, table: str = "alembic_version",
                             schema: str | None = None,
                             ) -> tuple[tuple[ActiveSession, ...], bool]:
    """(sessions, queries_hidden) on an open session."""
    found: dict[int, ActiveSession] = {}
    hidden = False
    rows = list(conn.execute(text(ACTIVITY_SQL), {"n": _qualified(table, schema)}))
    # The version table's locks first, then exclusive locks, then running statements: a
    # session's first reason is kept.
    rows.sort(key=lambda r: ACTIVITY_ORDER.index(r[0]) if r[0] in ACTIVITY_ORDER else 3)
    for kind, pid, user, state, secs, query, mode, granted, relation, app in rows:
        hidden = hidden or query == "<insufficient privilege>"
        if agent_read(kind, app, mode):
            continue
        if kind == "lock":
            reason = f"{'holds' if granted else 'waits for'} {mode} on {table}"
        elif kind == "exclusive":
            reason = f"holds AccessExclusiveLock on {relation} (DDL in an open transaction)"
        elif kind == "active" and pid not in found and DDL.match(query):
            reason = "running DDL"
        else:
            continue
        found.setdefault(pid, ActiveSession(pid, user, state, round(float(secs or 0), 1),
                                            short_query(query), reason))
    return tuple(sorted(found.values(), key=lambda s: s.pid)), hidden


def migration_activity(url: str | URL, table: str = "alembic_version",
                       schema: str | None = None,
                       timeouts: Timeouts = DEFAULT_TIMEOUTS) -> MigrationActivity:
    """Sessions holding/awaiting locks on the version table or running DDL (not ours)."""
    started, label = time.monotonic(), db_label(url)
    try:
        with session(url, timeouts) as conn:
            sessions, hidden = query_migration_activity(conn, table, schema)
    except DatabaseProblem as exc:
        return MigrationActivity(label, error=str(exc), elapsed_ms=_timed(started))
    return MigrationActivity(label, bool(sessions), sessions, hidden, elapsed_ms=_timed(started))


# -- privileges ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Privileges:
    """May the app's role run migrations on the schema (runbook: insufficient permissions)."""

    label: str
    user: str = ""
    schema: str = ""
    superuser: bool = False
    can_create: bool = False
    can_use: bool = False
    tables: int = 0
    # (table, owner) for tables the role neither owns nor inherits the owner role of.
    not_owned: tuple[tuple[str, str], ...] = ()
    error: str = ""

    @property
    def sufficient(self) -> bool:
        """True when the role can create in and alter everything in the schema."""
        return not self.error and (self.superuser or (self.can_create and self.can_use
                                                      and not self.not_owned))


PRIV_SQL = """
SELECT current_user, r.rolsuper, n.nspname,
       has_schema_privilege(n.oid, 'CREATE'), has_schema_privilege(n.oid, 'USAGE')
FROM pg_roles r, pg_namespace n
WHERE r.rolname = current_user AND n.nspname = coalesce(:schema, current_schema())
"""
TABLES_SQL = """
SELECT c.relname, pg_get_userbyid(c.relowner), pg_has_role(c.relowner, 'USAGE')
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = :schema AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
ORDER BY c.relname
"""


def query_privileges(conn: Connection, schema: str | None = None) -> Privileges:
    """Privileges of current_user on schema (default: current_schema()) on an open session."""
    row = conn.execute(text(PRIV_SQL), {"schema": schema}).first()
    if row is None:
        user = conn.execute(text("SELECT current_user")).scalar() or ""
        return Privileges("", str(user), schema or "",
                          error=f"schema {schema or '(search_path)'} does not exist")
    user, is_super, nsp, can_create, can_use = row
    not_owned, total = [], 0
    for relname, owner, owns in conn.execute(text(TABLES_SQL), {"schema": nsp}):
        total += 1
        if not owns and not is_super:
            not_owned.append((str(relname), str(owner)))
    return Privileges("", str(user), str(nsp), bool(is_super), bool(can_create), bool(can_use),
                      total, tuple(not_owned))


def read_privileges(url: str | URL, schema: str | None = None,
                    timeouts: Timeouts = DEFAULT_TIMEOUTS) -> Privileges:
    """Can the URL's role CREATE in the schema and does it own the tables there."""
    label = db_label(url)
    try:
        with session(url, timeouts) as conn:
            priv = query_privileges(conn, schema)
    except DatabaseProblem as exc:
        return Privileges(label, error=str(exc))
    return Privileges(**{**priv.__dict__, "label": label})


# -- server identity ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ServerIdentity:
    """Which server and database a URL really reaches."""

    label: str
    server_addr: str = ""  # "" over a unix socket
    server_port: int = 0
    database: str = ""
    # Same value on every connection to the same cluster, whatever address was used.
    system_identifier: str = ""
    socket_dirs: tuple[str, ...] = ()
    version: str = ""
    backend_pid: int = 0
    error: str = ""


IDENTITY_SQL = """
SELECT host(inet_server_addr()), current_setting('port')::int, current_database(),
       current_setting('server_version'), pg_backend_pid()
"""


# One row per column, constraint and index of the user's schemas, hashed by the server: a
# cheap way to tell "the live schema changed" (a manual ALTER, an upgrade run by hand)
# without loading the app's models again. Only catalog columns, no pg_get_*def() calls:
# those open the relation and would wait on a running migration's locks. A constraint's
# table by oid, not by regclass name (a third of the query's time at 1,000 tables; a
# rename still shows in the column rows). ON UPDATE/DELETE, MATCH, deferrability and
# table/column comments are in it: autogenerate compares them. The user schemas' relations
# are found once (CTEs used twice are computed once) and every catalog is reached from them,
# so pg_description's thousands of built-in comments are never scanned and the planner
# does not hash all of pg_attribute (half the query's cost on a small schema); the rows,
# and so the hash, are those of the former one-join-per-branch form (tested).
SCHEMA_FINGERPRINT_SQL = """
WITH ns AS (
  SELECT oid, nspname FROM pg_namespace
   WHERE nspname <> 'information_schema' AND nspname !~ '^pg_'
), rel AS (
  SELECT c.oid, c.relname, c.relkind, ns.nspname FROM pg_class c JOIN ns ON ns.oid = c.relnamespace
)
SELECT md5(coalesce(string_agg(x, ' ' ORDER BY x), '')) FROM (
  SELECT concat_ws('|', 'col', r.nspname, r.relname, a.attname, a.atttypid, a.atttypmod,
                   a.attnotnull, d.adbin::text) AS x
    FROM rel r
    JOIN pg_attribute a ON a.attrelid = r.oid
    LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
   WHERE a.attnum > 0 AND NOT a.attisdropped AND r.relkind IN ('r', 'p', 'v', 'm', 'f')
  UNION ALL
  SELECT concat_ws('|', 'con', ns.nspname, co.conname, co.contype, co.conrelid,
                   co.conkey::text, co.confrelid, co.confkey::text, co.conbin::text,
                   co.confupdtype, co.confdeltype, co.confmatchtype, co.condeferrable,
                   co.condeferred)
    FROM pg_constraint co JOIN ns ON ns.oid = co.connamespace
  UNION ALL
  SELECT concat_ws('|', 'idx', r.nspname, r.relname, i.indrelid, i.indkey::text, i.indisunique,
                   i.indexprs::text, i.indpred::text)
    FROM pg_index i JOIN rel r ON r.oid = i.indexrelid
  UNION ALL
  SELECT concat_ws('|', 'dsc', ds.objoid, ds.objsubid, ds.description)
    FROM rel r JOIN pg_description ds ON ds.objoid = r.oid
   WHERE ds.classoid = 'pg_class'::regclass
) AS s
"""


def query_schema_fingerprint(conn: Connection) -> str:
    """md5 of the user schemas' columns, constraints and indexes ('' if it cannot be read)."""
    try:
        value = conn.execute(text(SCHEMA_FINGERPRINT_SQL)).scalar()
    except DBAPIError:
        return ""  # unknown: the caller then keeps its memo as it is
    return "" if value is None else str(value)


def query_identity(conn: Connection) -> ServerIdentity:
    """Server address, port, database and cluster identity on an open session; asked once
    per kept session (its session_memo): none of it changes while the session lives."""
    memo = getattr(conn, "session_memo", None)
    if isinstance(memo, dict) and isinstance(memo.get("identity"), ServerIdentity):
        return memo["identity"]
    ident = _read_identity(conn)
    if isinstance(memo, dict):
        memo["identity"] = ident
    return ident


def _read_identity(conn: Connection) -> ServerIdentity:
    addr, port, database, version, backend = conn.execute(text(IDENTITY_SQL)).one()
    # Both need superuser, pg_monitor or pg_read_all_settings: nice to have, not required.
    ident = _optional(conn, "SELECT system_identifier FROM pg_control_system()")
    sockets = _optional(conn, "SELECT current_setting('unix_socket_directories')")
    dirs = tuple(d.strip() for d in str(sockets or "").split(",") if d.strip())
    return ServerIdentity("", addr or "", int(port), str(database),
                          "" if ident is None else str(ident), dirs, str(version), int(backend))


def _optional(conn: Connection, sql: str) -> Any:
    """A scalar, or None when our role may not read it (autocommit: no transaction spoiled)."""
    try:
        return conn.execute(text(sql)).scalar()
    except DBAPIError as exc:
        if "permission denied" in str(exc.orig).lower() or "must be" in str(exc.orig).lower():
            return None
        raise


def server_identity(url: str | URL, timeouts: Timeouts = DEFAULT_TIMEOUTS) -> ServerIdentity:
    """Which server/database the URL reaches."""
    label = db_label(url)
    try:
        with session(url, timeouts) as conn:
            ident = query_identity(conn)
    except DatabaseProblem as exc:
        return ServerIdentity(label, error=str(exc))
    return ServerIdentity(**{**ident.__dict__, "label": label})


def with_database(url: str, name: str) -> str:
    """The same URL naming another database on the same server (password kept)."""
    parsed = make_url(url)
    return parsed.set(database=name).render_as_string(hide_password=False)


def same_server(a: ServerIdentity, b: ServerIdentity) -> bool | None:
    """Pure: True/False when two identities are the same cluster, None when undecidable."""
    if a.error or b.error:
        return None
    if a.system_identifier and b.system_identifier:
        return a.system_identifier == b.system_identifier
    if a.server_addr and b.server_addr:
        return (a.server_addr, a.server_port) == (b.server_addr, b.server_port)
    return None


def same_database(a: ServerIdentity, b: ServerIdentity) -> bool | None:
    """Pure: same cluster and same database name (None when undecidable)."""
    server = same_server(a, b)
    return server if not server else a.database == b.database


# -- sessions of the app's role --------------------------------------------------------------
@dataclass(frozen=True)
class RoleSession:
    """A client session of the cluster as pg_stat_activity shows it to our role.

    database, user and pid are visible for every session; the client address/port only
    for our own role's sessions (or with pg_read_all_stats), else "" / -1."""

    pid: int
    database: str
    client_addr: str
    client_port: int  # -1 over a unix socket (or hidden)
    application_name: str
    state: str
    user: str = ""


SESSIONS_SQL = """
SELECT pid, coalesce(datname, ''), coalesce(host(client_addr), ''), coalesce(client_port, -1),
       coalesce(application_name, ''), coalesce(state, ''), coalesce(usename, '')
FROM pg_stat_activity
WHERE pid <> pg_backend_pid() AND datname IS NOT NULL
  -- other roles' rows hide backend_type too: only client backends hold a client's socket
  AND coalesce(backend_type, 'client backend') = 'client backend'
ORDER BY (usename = current_user) DESC, pid
LIMIT 2000
"""


def query_role_sessions(conn: Connection) -> tuple[RoleSession, ...]:
    """Other client sessions on the whole cluster (any database, any role)."""
    return tuple(RoleSession(int(r[0]), r[1], r[2], int(r[3]), r[4], r[5], r[6])
                 for r in conn.execute(text(SESSIONS_SQL)))


# -- one round trip for everything -------------------------------------------------------------
@dataclass(frozen=True)
class DatabaseInspection:
    """Everything the agent reads from one database in one short session."""

    label: str
    version: VersionTable
    activity: MigrationActivity
    privileges: Privileges
    identity: ServerIdentity
    sessions: tuple[RoleSession, ...] = ()
    error: str = ""
    elapsed_ms: float = 0.0
    schema_fingerprint: str = ""

    @property
    def reachable(self) -> bool:
        """True when the session could be opened."""
        return not self.error


def inspect(url: str | URL, table: str = "alembic_version", schema: str | None = None,
            timeouts: Timeouts = DEFAULT_TIMEOUTS,
            opener: Callable[[Any, Timeouts], Any] | None = None) -> DatabaseInspection:
    """Version table, migration activity, privileges, identity, role sessions: one session.

    opener(url, timeouts) opens it (default: session() in this process); the agent passes
    agent.privileged.dbclient.user_session, so the session is held as the unit's user.
    """
    started, label = time.monotonic(), db_label(url)
    try:
        try:
            agent_url(url)  # a malformed URL is said as such, never handed to a session
        except ValueError as exc:
            raise DatabaseProblem(f"database {label}: {exc}") from None
        with (opener or session)(url, timeouts) as conn:
            # Activity first: it explains a lock timeout on the version table that follows.
            sessions_, hidden = query_migration_activity(conn, table, schema)
            exists, revisions, locked = query_version_table(conn, table, schema)
            priv = query_privileges(conn, schema)
            ident = query_identity(conn)
            role_sessions = query_role_sessions(conn)
            schema_fp = query_schema_fingerprint(conn)
    except DatabaseProblem as exc:
        ms = _timed(started)
        return DatabaseInspection(label, VersionTable(label, table, error=str(exc)),
                                  MigrationActivity(label, error=str(exc)),
                                  Privileges(label, error=str(exc)),
                                  ServerIdentity(label, error=str(exc)),
                                  error=str(exc), elapsed_ms=ms)
    ms = _timed(started)
    return DatabaseInspection(
        label, VersionTable(label, table, exists, revisions, locked, elapsed_ms=ms),
        MigrationActivity(label, bool(sessions_) or locked, sessions_, hidden, elapsed_ms=ms),
        Privileges(**{**priv.__dict__, "label": label}),
        ServerIdentity(**{**ident.__dict__, "label": label}),
        role_sessions, elapsed_ms=ms, schema_fingerprint=schema_fp)
