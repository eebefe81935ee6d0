"""The agent's own database session, held by an unprivileged child as the unit's user.

Runs inside the app's own interpreter (its SQLAlchemy, its driver), as the unit's user, in
the unit's environment: libpq reads that user's ~/.pgpass, service file and certificates,
never root's, whatever ``passfile``/``service``/``sslkey``/``sslrootcert``/``hostaddr`` the
URL names. Stdlib only at module level; readonly.py is prepended to this source.

Protocol (root is the client): the request (URL and timeouts) comes in the environment
variable DRIFTWATCH_DB_REQUEST, removed at once. The child connects and writes one JSON line
to FD_OUT: {"ok": true} or {"ok": false, "error": "..."}. Then, for each JSON line
{"sql": ..., "params": {...}} read from FD_IN, it runs that one statement in its own
read-only transaction (the guard verifies it), rolls back, and writes one line
{"rows": [[...], ...]} or {"error": "...", "sqlstate": "..."}. EOF on FD_IN ends it.
Root bounds every line it reads; a statement's rows are capped at MAX_ROWS.
"""

import json
import os
import sys

DB_REQUEST_ENV = "DRIFTWATCH_DB_REQUEST"
MAX_ROWS = 5000
MAX_MESSAGE = 500


def _message(exc):
    """The driver's own first line (no SQLAlchemy decoration), bounded."""
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip()
    first = text.splitlines()[0] if text else type(orig).__name__
    return first[:MAX_MESSAGE]


def _sqlstate(exc):
    orig = getattr(exc, "orig", None) or exc
    return str(getattr(orig, "pgcode", None) or getattr(orig, "sqlstate", None) or "")


def _plain(value):
    """A JSON-safe cell: numbers, text, booleans, None; anything else as text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _write(fd, doc):
    data = (json.dumps(doc) + "\n").encode()
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _lines(fd):
    """Request lines from fd until EOF."""
    buf = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            return
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line.strip():
                yield line


def _end(conn):
    """Roll back the statement's transaction (SQLAlchemy 2.x / future, or 1.x's DBAPI)."""
    rollback = getattr(conn, "rollback", None)
    if callable(rollback):
        rollback()
    else:
        conn.connection.rollback()


def serve(request, fd_in, fd_out, lines=None):
    """Connect, then answer statements until EOF (lines: an already started reader)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool
    engine = create_engine(request["url"], poolclass=NullPool)
    try:
        conn = engine.connect()
    except Exception as exc:
        _write(fd_out, {"ok": False, "error": _message(exc), "sqlstate": _sqlstate(exc)})
        return
    try:
        # Verified before anything else runs: the guard opened a read-only transaction.
        state = conn.execute(text("SHOW transaction_read_only")).scalar()
        _end(conn)
        if str(state).lower() != "on":
            raise RuntimeError("the session is not read-only")
        _write(fd_out, {"ok": True})
        for line in lines if lines is not None else _lines(fd_in):
            try:
                ask = json.loads(line)
                sql = str(ask["sql"])
                # One statement per transaction: "COMMIT; BEGIN READ WRITE; ..." in one
                # simple-protocol string would end the guarded transaction.
                if ";" in sql.strip().rstrip(";"):
                    raise ValueError("one statement at a time (no ';')")
                result = conn.execute(text(sql), ask.get("params") or {})
                rows = [[_plain(v) for v in row] for row in result.fetchmany(MAX_ROWS)] \
                    if result.returns_rows else []
                answer = {"rows": rows}
            except Exception as exc:
                answer = {"error": _message(exc), "sqlstate": _sqlstate(exc)}
            try:
                _end(conn)  # never a transaction held open between statements
            except Exception as exc:
                answer = {"error": _message(exc), "sqlstate": _sqlstate(exc)}
            _write(fd_out, answer)
    finally:
        try:
            conn.close()
        finally:
            engine.dispose()


def main(argv):
    """Entry point: argv = [FD_IN, FD_OUT]."""
    stdio = argv[0] == "stdio"
    if stdio:
        # A transient unit (agent/privileged/transient.py): statements on stdin, answers on
        # the stdout pipe, the request as the first line of stdin; stray prints to stderr.
        fd_in, fd_out = 0, os.dup(1)
        os.dup2(2, 1)
    else:
        fd_in, fd_out = int(argv[0]), int(argv[1])
    for fd in (fd_in, fd_out):
        os.set_inheritable(fd, False)
    try:
        if stdio:
            lines = _lines(fd_in)
            request = json.loads(next(lines, b"{}"))
        else:
            lines = None
            request = json.loads(os.environ.pop(DB_REQUEST_ENV, "") or "{}")
        if os.getuid() == 0 or os.geteuid() == 0:
            if not request.get("allow_root"):
                raise PermissionError("refusing to open the app's database session as root")
        if not install_readonly_guard(request.get("guard") or {}):  # noqa: F821 (bundled)
            raise ImportError("the app's interpreter cannot import SQLAlchemy")
        serve(request, fd_in, fd_out, lines)
    except BaseException as exc:
        try:
            _write(fd_out, {"ok": False, "error": "the database session failed: %s: %s"
                            % (type(exc).__name__, _message(exc))})
        except OSError:
            pass
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
