"""Read-only guard for every SQLAlchemy engine in this (unprivileged) process.

Runs as the unit's user, inside the app's own interpreter: stdlib only at module level, the
app's SQLAlchemy imported lazily. It is prepended to the probe child and to the database
session child (``bundle()`` in agent/privileged/launch.py), and installed before any app code
is imported, so every engine the app (or Alembic, or our own session) creates is covered.

How it holds, whatever the URL says: before a statement starts a new transaction on a
DBAPI connection, the guard opens that transaction itself with ``SET TRANSACTION READ ONLY``
and ``SET LOCAL`` statement/lock/idle timeouts, then checks ``SHOW transaction_read_only``
says ``on`` and refuses the statement otherwise. Only transaction-scoped settings are used:
they cannot be undone by an ``options=`` in the URL (which replaces PGOPTIONS), they hold
behind a transaction-pooling PgBouncer (the whole transaction runs on one server
connection, and PgBouncer refuses the ``options`` startup parameter anyway), and they never
leak into a pooled server connection the app's workers share afterwards, as a session-level
``SET`` would. Autocommit statements (no transaction to mark) are refused.

MySQL/MariaDB (PyMySQL, mysqlclient) have no transaction-scoped settings: the session is made
read-only (``SET SESSION TRANSACTION READ ONLY``, which also refuses DDL and autocommit
writes) and bounded when it connects, and checked before every statement.
"""

import os

# Transaction status IDLE (no transaction open) in psycopg2 and psycopg 3 alike.
_TX_IDLE = 0
GUARD_ERROR = "driftwatch read-only guard"


class ReadOnlyGuardError(Exception):
    """A statement the guard refuses (autocommit, unknown driver, not read-only)."""


def guard_statements(settings):
    """The statements that open every transaction, in order (pure)."""
    return [
        "SET TRANSACTION READ ONLY",
        "SET LOCAL statement_timeout = %d" % int(settings.get("statement_timeout_ms", 5000)),
        "SET LOCAL lock_timeout = %d" % int(settings.get("lock_timeout_ms", 1000)),
        "SET LOCAL idle_in_transaction_session_timeout = %d"
        % int(settings.get("idle_in_transaction_timeout_ms", 10000)),
    ]


def _driver_connection(cursor):
    """The DBAPI connection a cursor belongs to."""
    return getattr(cursor, "connection", None)


def _autocommit(dbapi_conn):
    value = getattr(dbapi_conn, "autocommit", False)
    return bool(value) if not callable(value) else False


def _transaction_status(dbapi_conn):
    """psycopg2 / psycopg 3 transaction status, or None for a driver we cannot ask."""
    info = getattr(dbapi_conn, "info", None)
    status = getattr(info, "transaction_status", None)
    if status is None:
        getter = getattr(dbapi_conn, "get_transaction_status", None)
        status = getter() if callable(getter) else None
    return None if status is None else int(status)


def open_read_only(dbapi_conn, settings):
    """Start the transaction on dbapi_conn as read-only and bounded, and verify it."""
    cur = dbapi_conn.cursor()
    try:
        for sql in guard_statements(settings):
            cur.execute(sql)
        cur.execute("SHOW transaction_read_only")
        row = cur.fetchone()
    finally:
        cur.close()
    if not row or str(row[0]).lower() != "on":
        raise ReadOnlyGuardError("%s: the transaction is not read-only (transaction_read_only="
                                 "%r); refusing to run anything" % (GUARD_ERROR,
                                                                   row[0] if row else None))


def _is_sqlite(dbapi_conn):
    return type(dbapi_conn).__module__.split(".")[0] in ("sqlite3", "_sqlite3")


def sqlite_uri(path):
    """A SQLite file path -> a read-only URI: 'file:/abs/path?mode=ro' (never creates it).

    A relative path is taken against the working directory, as sqlite3.connect() does.
    """
    from urllib.parse import quote
    return "file:%s?mode=ro" % quote(os.path.abspath(path), safe="/")


def open_sqlite_read_only(connect, path, timeout_s, **kwargs):
    """connect (sqlite3.connect) path read-only: mode=ro URI, PRAGMA query_only, verified.

    mode=ro never creates the file, nor a journal (a reader needs none); query_only refuses
    anything that would write even where the file's permissions allow it.
    """
    if path in ("", ":memory:") or path.startswith("file:"):
        raise ReadOnlyGuardError("%s: only SQLite database files named by a path are opened "
                                 "(not %r)" % (GUARD_ERROR, path[:80]))
    kwargs.update(uri=True, timeout=timeout_s)
    conn = connect(sqlite_uri(path), **kwargs)
    try:
        conn.execute("PRAGMA query_only = ON")
        verify_sqlite(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def verify_sqlite(dbapi_conn):
    """Refuse unless PRAGMA query_only is on for this SQLite connection."""
    row = dbapi_conn.execute("PRAGMA query_only").fetchone()
    if not row or int(row[0]) != 1:
        raise ReadOnlyGuardError("%s: the SQLite connection is not query_only; refusing to run "
                                 "anything" % GUARD_ERROR)


# -- MySQL / MariaDB ---------------------------------------------------------------------------
# No transaction-scoped settings there (and no pooler that hands one server session to many
# clients in the common setups): the session itself is made read-only right after connecting,
# which also covers autocommit statements and DDL (ERROR 1792 "Cannot execute statement in a
# READ ONLY transaction"), and verified before every statement.
_MYSQL_MODULES = ("pymysql", "MySQLdb")


def _is_mysql(dbapi_conn):
    return type(dbapi_conn).__module__.split(".")[0] in _MYSQL_MODULES


def mysql_guard_statements(settings, mariadb):
    """The session settings of a MySQL/MariaDB connection, in order (pure).

    lock_wait_timeout bounds metadata locks (a running ALTER), innodb_lock_wait_timeout row
    locks; MariaDB's max_statement_time and MySQL's max_execution_time (SELECT only) bound
    the statement itself.
    """
    lock_s = max(1, -(-int(settings.get("lock_timeout_ms", 1000)) // 1000))
    statement_ms = max(1, int(settings.get("statement_timeout_ms", 5000)))
    timeout = ("SET SESSION max_statement_time = %.3f" % (statement_ms / 1000.0)) if mariadb \
        else "SET SESSION max_execution_time = %d" % statement_ms
    return ["SET SESSION TRANSACTION READ ONLY",
            "SET SESSION lock_wait_timeout = %d" % lock_s,
            "SET SESSION innodb_lock_wait_timeout = %d" % lock_s,
            timeout]


def _mysql_scalar(dbapi_conn, sql):
    cur = dbapi_conn.cursor()
    try:
        cur.execute(sql)
        row = cur.fetchone()
    finally:
        cur.close()
    return row[0] if row else None


# id(connection) -> the variable that says "read only" there (tx_read_only on MariaDB
# before 11.1, transaction_read_only on MySQL 8); weakly tied to the connection's life.
_MYSQL_RO_VARIABLE = {}


def open_mysql_read_only(dbapi_conn, settings):
    """Make a fresh MySQL/MariaDB connection's session read-only and bounded; verify it."""
    version = str(_mysql_scalar(dbapi_conn, "SELECT VERSION()") or "")
    cur = dbapi_conn.cursor()
    try:
        for sql in mysql_guard_statements(settings, "mariadb" in version.lower()):
            cur.execute(sql)
    finally:
        cur.close()
    for variable in ("transaction_read_only", "tx_read_only"):
        try:
            _mysql_scalar(dbapi_conn, "SELECT @@session.%s" % variable)
        except Exception:
            continue
        _MYSQL_RO_VARIABLE[id(dbapi_conn)] = variable
        break
    verify_mysql(dbapi_conn)


def verify_mysql(dbapi_conn):
    """Refuse unless the MySQL/MariaDB session is still read-only (the app may have SET it)."""
    variable = _MYSQL_RO_VARIABLE.get(id(dbapi_conn))
    value = _mysql_scalar(dbapi_conn, "SELECT @@session.%s" % variable) if variable else None
    if value is None or int(value) != 1:
        raise ReadOnlyGuardError("%s: the MySQL session is not read-only (%s=%r); refusing to "
                                 "run anything" % (GUARD_ERROR, variable, value))


def check_before_statement(dbapi_conn, settings, state):
    """Called before every statement: make sure it runs in a verified read-only transaction."""
    if _is_sqlite(dbapi_conn):
        verify_sqlite(dbapi_conn)  # opened mode=ro by the do_connect hook below
        return
    if _is_mysql(dbapi_conn):
        state["guarding"] = True
        try:
            verify_mysql(dbapi_conn)  # made read-only by the do_connect hook below
        finally:
            state["guarding"] = False
        return
    if _autocommit(dbapi_conn):
        raise ReadOnlyGuardError("%s: autocommit statements are refused (every statement must "
                                 "run inside a read-only transaction)" % GUARD_ERROR)
    status = _transaction_status(dbapi_conn)
    if status is None:
        raise ReadOnlyGuardError("%s: cannot tell the transaction state of the %s driver; "
                                 "only psycopg2 and psycopg are supported"
                                 % (GUARD_ERROR, type(dbapi_conn).__module__))
    if status == _TX_IDLE:
        state["guarding"] = True
        try:
            open_read_only(dbapi_conn, settings)
        finally:
            state["guarding"] = False


def install_readonly_guard(settings):
    """Install the guard on every Engine of this process; False when SQLAlchemy is missing."""
    try:
        from sqlalchemy import event
        from sqlalchemy.engine import Engine
    except ImportError:
        return False
    state = {"guarding": False}

    def before_cursor_execute(conn, cursor, statement, parameters, context, executemany):
        if state["guarding"]:
            return
        check_before_statement(_driver_connection(cursor), settings, state)

    def do_connect(dialect, conn_rec, cargs, cparams):
        # SQLite: the app's engine (and Alembic's) opens its file read-only, never creating
        # it or a journal; MySQL/MariaDB: a read-only, bounded session from the start; other
        # drivers connect as usual and meet the statement guard.
        if getattr(dialect, "name", "") in ("mysql", "mariadb"):
            conn = dialect.connect(*cargs, **cparams)
            try:
                if not _is_mysql(conn):
                    raise ReadOnlyGuardError("%s: only the PyMySQL and mysqlclient drivers are "
                                             "supported for MySQL" % GUARD_ERROR)
                open_mysql_read_only(conn, settings)
            except BaseException:
                conn.close()
                raise
            return conn
        if getattr(dialect, "name", "") != "sqlite":
            return None
        if getattr(dialect, "driver", "") != "pysqlite" or cparams.get("uri"):
            raise ReadOnlyGuardError("%s: only plain pysqlite file URLs are opened read-only"
                                     % GUARD_ERROR)
        path = cargs[0] if cargs else cparams.get("database", "")
        rest = {k: v for k, v in cparams.items() if k not in ("database", "uri", "timeout")}
        return open_sqlite_read_only(dialect.dbapi.connect, str(path),
                                     int(settings.get("lock_timeout_ms", 1000)) / 1000.0,
                                     **rest)

    event.listen(Engine, "before_cursor_execute", before_cursor_execute)
    event.listen(Engine, "do_connect", do_connect)
    os.environ.setdefault("PGAPPNAME", settings.get("application_name", "driftwatch-probe"))
    # Keep a reference: the listener must live as long as the process.
    install_readonly_guard.listener = (before_cursor_execute, do_connect)
    return True
