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


def check_before_statement(dbapi_conn, settings, state):
    """Called before every statement: make sure it runs in a verified read-only transaction."""
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

    event.listen(Engine, "before_cursor_execute", before_cursor_execute)
    os.environ.setdefault("PGAPPNAME", settings.get("application_name", "driftwatch-probe"))
    # Keep a reference: the listener must live as long as the process.
    install_readonly_guard.listener = before_cursor_execute
    return True
