"""The agent's own database session, held by an unprivileged child as the unit's user.

Runs inside the app's own interpreter (its SQLAlchemy, its driver), as the unit's user, in
the unit's environment: libpq reads that user's ~/.pgpass, service file and certificates,
never root's, whatever ``passfile``/``service``/``sslkey``/``sslrootcert``/``hostaddr`` the
URL names. Stdlib only at module level; readonly.py is prepended to this source.

Protocol (root is the client): the request (URL and timeouts) comes in the environment
variable DRIFTWATCH_DB_REQUEST, removed at once. The child connects and writes one JSON line
to FD_OUT: {"ok": true} or {"ok": false, "error": "..."}. Then, for each JSON line read from
FD_IN:
- {"sql": ..., "params": {...}}: that one statement in its own read-only transaction (the
  guard verifies it), rolled back; one line {"rows": [[...], ...]} or {"error": "...",
  "sqlstate": "..."};
- {"batch": [{"sql": ..., "params": {...}, "flush": bool}, ...]}: the statements in order in
  one read-only transaction (the guard verifies it before every statement), rolled back
  after the last; answered by lines {"results": [answer, ...]} (a line after a "flush"
  statement, one when a batch has run FLUSH_S or gathered FLUSH_BYTES since the last line,
  one at the end). The first
  error ends the batch: its answer is the last one, the statements after it are not run.
EOF on FD_IN ends it. Root bounds every line it reads; a statement's rows are capped at
MAX_ROWS.

A shared child (request {"shared": true, "unset": [...]}, serve_shared) connects to nothing
at first and holds a connection per URL it is asked to open; every request line then names
its connection ("conn") and every answer line carries it back.
"""

import json
import os
import re
import urllib.parse
import sys
import time

DB_REQUEST_ENV = "DRIFTWATCH_DB_REQUEST"
MAX_ROWS = 5000
MAX_MESSAGE = 500
# A batch that has run this long writes what it has: root waits for each line at most a
# statement's answer time, so no answer is held back longer than this plus one statement.
FLUSH_S = 1.0
# ... and one whose answers add up to this much: a line stays as large as one statement's
# answer could always be (root bounds each line), whatever a batch holds.
FLUSH_BYTES = 1024 * 1024


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


_PARAM = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


def libpq_uri(url):
    """A SQLAlchemy URL -> the libpq URI it stands for ('postgresql+psycopg2://' -> 'postgresql://').

    SQLAlchemy passes user, password, host, port, database and the query parameters to the
    driver, which hands them to libpq; libpq reads the same URI itself, %-encoding included.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.split("+", 1)[0] not in ("postgresql", "postgres", "pgsql"):
        raise ValueError("not a PostgreSQL URL")
    return "postgresql://" + rest


def one_statement(ask):
    """A request (line or parsed dict) -> (sql, params); refuses more than one statement.

    One statement per string: "COMMIT; BEGIN READ WRITE; ..." in one simple-protocol
    string would end the guarded transaction.
    """
    if not isinstance(ask, dict):
        ask = json.loads(ask)
    sql = str(ask["sql"])
    if ";" in sql.strip().rstrip(";"):
        raise ValueError("one statement at a time (no ';')")
    return sql, ask.get("params") or {}


def pyformat(sql):
    """':name' parameters (SQLAlchemy text style) -> '%(name)s' (psycopg); '%' escaped."""
    return _PARAM.sub(r"%(\1)s", sql.replace("%", "%%"))


def fetch_rows(cur):
    """At most MAX_ROWS rows of a cursor's result, JSON-safe ([] for no result)."""
    if cur.description is None:
        return []
    return [[_plain(v) for v in row] for row in cur.fetchmany(MAX_ROWS)]


def cursor_rows(conn, sql, params):
    """One ':name'-style statement on a DB-API connection's new cursor -> its rows."""
    cur = conn.cursor()
    try:
        cur.execute(pyformat(sql), dict(params or {}))
        return fetch_rows(cur)
    finally:
        cur.close()


def requests_of(line):
    """A request line -> (its statements as dicts, True when it is a batch)."""
    ask = json.loads(line)
    if not isinstance(ask, dict):
        raise ValueError("a request is a JSON object")
    if "batch" not in ask:
        return [ask], False
    batch = ask["batch"]
    if not isinstance(batch, list) or not all(isinstance(a, dict) for a in batch):
        raise ValueError("a batch is a list of statements")
    return batch, True


def answer_requests(lines, fd_out, run, error_of, finish=None):
    """The statement loop every kind of session shares.

    run(sql, params) -> rows verifies (its guard) and runs one statement; error_of(exc) ->
    the error answer; finish() ends the request's transaction (rollback) after its last
    statement or its first error; one that fails makes a good answer an error.
    """
    for line in lines:
        try:
            asks, batch = requests_of(line)
        except Exception as exc:
            _write(fd_out, error_of(exc))
            continue
        answer_asks(asks, batch, fd_out, run, error_of, finish)


def answer_asks(asks, batch, fd_out, run, error_of, finish=None, tag=None):
    """One request's statements (one, or a batch in one transaction); tag: fields every
    answer line carries (a shared child's connection id)."""
    tag = tag or {}
    results, size, last_write = [], 0, time.monotonic()
    for i, ask in enumerate(asks):
        try:
            sql, params = one_statement(ask)
            answer = {"rows": run(sql, params)}
        except Exception as exc:
            answer = error_of(exc)
        done = "error" in answer or i == len(asks) - 1
        if done and finish is not None:
            try:
                finish()  # never a transaction held open between requests
            except Exception as exc:
                if "error" not in answer:
                    answer = error_of(exc)
        if not batch:
            _write(fd_out, dict(answer, **tag))
            break
        results.append(json.dumps(answer))
        size += len(results[-1])
        if done or ask.get("flush") or size >= FLUSH_BYTES \
                or time.monotonic() - last_write >= FLUSH_S:
            _write_results(fd_out, results, tag)
            results, size, last_write = [], 0, time.monotonic()
        if done:
            break
    if batch and not asks:
        _write(fd_out, dict({"results": []}, **tag))


def _write_results(fd, encoded, tag=None):
    """One batch answer line from answers already encoded (each measured as it came)."""
    head = "".join("%s: %s, " % (json.dumps(k), json.dumps(v)) for k, v in (tag or {}).items())
    data = ("{" + head + '"results": [' + ", ".join(encoded) + "]}\n").encode()
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def driver_connect(url):
    """A psycopg2 (else psycopg 3) connection to url, or None when neither is importable."""
    base, _, query = libpq_uri(url).partition("?")
    # The query string as the app's SQLAlchemy reads it (parse_qsl: '+' is a space, as in
    # `options=-c+search_path=app`), handed to the driver as keywords the way SQLAlchemy's
    # dialects do; libpq would read a '+' literally.
    params = dict(urllib.parse.parse_qsl(query))
    try:
        import psycopg2
        return psycopg2.connect(base, **params)
    except ImportError:
        pass
    try:
        import psycopg
    except ImportError:
        return None
    return psycopg.connect(base, **params)


def guarded_runner(conn, settings):
    """run(sql, params) -> rows on a plain driver connection, the guard asked before every
    statement (its own state per connection); verified read-only before it is returned."""
    state = {"guarding": False}

    def run(sql, params):
        check_before_statement(conn, settings, state)  # noqa: F821 (bundled readonly.py)
        return cursor_rows(conn, sql, params)

    rows = run("SHOW transaction_read_only", {})
    conn.rollback()
    if not rows or str(rows[0][0]).lower() != "on":
        raise RuntimeError("the session is not read-only")
    return run


def serve_driver(conn, request, fd_out, lines):
    """Answer statements on a plain driver connection, each in a guarded transaction (a
    batch's statements in one, the guard still asked before each)."""
    run = guarded_runner(conn, request.get("guard") or {})
    _write(fd_out, {"ok": True})
    answer_requests(lines, fd_out, run,
                    lambda exc: {"error": _message(exc), "sqlstate": _sqlstate(exc)},
                    conn.rollback)


def sqlite_path(url):
    """'sqlite:////abs/app.db' (any +driver, any ?query) -> '/abs/app.db'; ValueError else."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.split("+", 1)[0] != "sqlite":
        raise ValueError("not a SQLite URL")
    path = rest[1:].split("?", 1)[0] if rest.startswith("/") else ""
    if not path.startswith("/"):
        raise ValueError("the SQLite path is not absolute (the probe resolves it first)")
    return path


def serve_sqlite(request, fd_out, lines):
    """Answer statements on the SQLite file, opened read-only (mode=ro URI, query_only).

    A missing file is said as such and never created; a statement that meets the write
    lock of a migration (BEGIN EXCLUSIVE) fails with SQLITE_BUSY after lock_timeout_ms.
    """
    import sqlite3
    path = sqlite_path(request["url"])
    if not os.path.exists(path):
        _write(fd_out, {"ok": False, "missing": True,
                        "error": "the SQLite database file %s does not exist" % path})
        return
    timeout = int((request.get("guard") or {}).get("lock_timeout_ms", 500)) / 1000.0
    try:
        # isolation_level=None: every SELECT is its own implicit transaction, none held open.
        conn = open_sqlite_read_only(sqlite3.connect, path, timeout,  # noqa: F821 (bundled)
                                     isolation_level=None)
    except Exception as exc:
        _write(fd_out, {"ok": False, "error": _message(exc), "sqlstate": _sqlstate(exc)})
        return
    def run(sql, params):
        verify_sqlite(conn)  # noqa: F821 (bundled readonly.py)
        cur = conn.execute(sql, dict(params))
        try:
            return fetch_rows(cur)
        finally:
            cur.close()

    try:
        _write(fd_out, {"ok": True})
        answer_requests(lines, fd_out, run, lambda exc: {
            "error": _message(exc), "sqlstate": str(getattr(exc, "sqlite_errorname", "") or "")})
    finally:
        conn.close()


MYSQL_BACKENDS = ("mysql", "mariadb")
_MYSQL_INT = ("connect_timeout", "read_timeout", "write_timeout", "client_flag")
_MYSQL_BOOL = ("compress", "local_infile", "use_unicode", "ssl_check_hostname")


def _truthy(value):
    return str(value).lower() in ("1", "true", "yes", "on")


def mysql_connect_args(url, driver):
    """A SQLAlchemy MySQL URL -> the keywords its dialect hands PyMySQL / mysqlclient (pure).

    As SQLAlchemy's mysqldb dialect does: user, password, host, port, database, then the
    query string (ints and booleans coerced, ssl_* gathered into ssl={...}).
    """
    scheme, sep, _rest = url.partition("://")
    if not sep or scheme.split("+", 1)[0] not in MYSQL_BACKENDS:
        raise ValueError("not a MySQL URL")
    parts = urllib.parse.urlsplit(url)
    names = {"user": "user", "password": "password", "database": "database"} \
        if driver == "pymysql" else {"user": "user", "password": "passwd", "database": "db"}
    opts = {}
    if parts.username is not None:
        opts[names["user"]] = urllib.parse.unquote(parts.username)
    if parts.password is not None:
        opts[names["password"]] = urllib.parse.unquote(parts.password)
    if parts.hostname:
        opts["host"] = parts.hostname
    if parts.port:
        opts["port"] = parts.port
    database = urllib.parse.unquote(parts.path.lstrip("/"))
    if database:
        opts[names["database"]] = database
    ssl = {}
    for key, value in urllib.parse.parse_qsl(parts.query):
        if key.startswith("ssl_"):
            ssl[key[4:]] = _truthy(value) if key in _MYSQL_BOOL else value
        elif key in _MYSQL_INT:
            opts[key] = int(value)
        elif key in _MYSQL_BOOL:
            opts[key] = _truthy(value)
        else:
            opts[key] = value
    if ssl:
        opts["ssl"] = ssl
    return opts


def mysql_driver_connect(url, connect_s):
    """A PyMySQL (else mysqlclient) connection to url: the driver the app's URL names
    first; None when neither is importable."""
    named = url.split("://", 1)[0].partition("+")[2]
    order = ["mysqldb", "pymysql"] if named == "mysqldb" else ["pymysql", "mysqldb"]
    for driver in order:
        try:
            module = __import__("pymysql" if driver == "pymysql" else "MySQLdb")
        except ImportError:
            continue
        opts = mysql_connect_args(url, driver)
        opts.setdefault("connect_timeout", int(connect_s))
        if driver == "mysqldb":
            # mysqlclient turns multi-statements on by default: one statement per string.
            opts["multi_statements"] = False
        return module.connect(**opts)
    return None


def serve_mysql(request, fd_out, lines):
    """Answer statements on a MySQL/MariaDB session made read-only and bounded at once
    (SET SESSION TRANSACTION READ ONLY, lock_wait_timeout, max_statement_time /
    max_execution_time), verified before every statement."""
    settings = request.get("guard") or {}
    try:
        conn = mysql_driver_connect(request["url"], settings.get("connect_timeout_s", 5))
        if conn is None:
            raise ImportError("the app's interpreter has neither PyMySQL nor mysqlclient")
        try:
            open_mysql_read_only(conn, settings)  # noqa: F821 (bundled readonly.py)
        except BaseException:
            conn.close()
            raise
    except Exception as exc:
        _write(fd_out, {"ok": False, "error": _message(exc), "sqlstate": _sqlstate(exc)})
        return
    def run(sql, params):
        verify_mysql(conn)  # noqa: F821 (bundled readonly.py)
        return cursor_rows(conn, sql, params)

    def finish():
        try:
            conn.rollback()  # never a transaction held open between statements
        except Exception:
            pass

    try:
        _write(fd_out, {"ok": True})
        answer_requests(lines, fd_out, run,
                        lambda exc: {"error": _message(exc), "sqlstate": _mysql_errno(exc)},
                        finish)
    finally:
        conn.close()


# PgBouncer's admin console: the only commands ever sent there (all read-only SHOWs).
PGBOUNCER_SHOWS = ("SHOW CLIENTS", "SHOW DATABASES")


def serve_pgbouncer_admin(request, fd_out, lines):
    """PgBouncer's admin console (its "pgbouncer" database) with the app's credentials:
    autocommit (the console knows no transactions, not even BEGIN) and nothing but the
    fixed SHOW commands above; any other statement is refused here, never sent."""
    conn = driver_connect(request["url"])
    if conn is None:
        raise ImportError("the app's interpreter has neither psycopg2 nor psycopg")
    def run(sql, _params):
        if " ".join(sql.split()).upper() not in PGBOUNCER_SHOWS:
            raise ValueError("only %s on PgBouncer's console" % ", ".join(PGBOUNCER_SHOWS))
        cur = conn.cursor()
        try:
            cur.execute(sql)
            return fetch_rows(cur)
        finally:
            cur.close()

    try:
        conn.autocommit = True
        _write(fd_out, {"ok": True})
        answer_requests(lines, fd_out, run,
                        lambda exc: {"error": _message(exc), "sqlstate": _sqlstate(exc)})
    finally:
        conn.close()


def _mysql_errno(exc):
    """MySQL's error number ('1205' lock wait timeout, '1969'/'3024' statement time)."""
    args = getattr(exc, "args", ())
    return str(args[0]) if args and isinstance(args[0], int) else ""


def _close_quietly(conn):
    try:
        conn.close()
    except Exception:
        pass


def serve_shared(request, fd_out, lines):
    """One child, a connection per URL it is asked to open (PostgreSQL, the app's libpq
    driver): every request line names its connection ("conn"), every answer line carries it.

    {"conn": id, "open": url}: connect (the same guard settings for all), verified
    read-only, answered {"conn": id, "ok": ...}; {"conn": id, "close": true}: closed, no
    answer; else statements as serve() answers them, on that connection only. The
    variables in "unset" (they carry the starting unit's URL) are dropped first.
    """
    for name in request.get("unset") or []:
        os.environ.pop(str(name), None)
    settings = request.get("guard") or {}
    conns = {}

    def error_of(exc):
        return {"error": _message(exc), "sqlstate": _sqlstate(exc)}

    def missing(_sql, _params):
        raise LookupError("no open connection of that id")

    _write(fd_out, {"ok": True, "shared": True})
    try:
        for line in lines:
            try:
                ask = json.loads(line)
                if not isinstance(ask, dict) or not isinstance(ask.get("conn"), str):
                    raise ValueError("a shared session's request names its connection")
            except Exception as exc:
                _write(fd_out, error_of(exc))   # untagged: root no longer trusts the child
                continue
            tag = {"conn": ask["conn"]}
            if "open" in ask or "close" in ask:
                old = conns.pop(ask["conn"], None)
                if old is not None:
                    _close_quietly(old[0])
                if "close" in ask:
                    continue
                try:
                    url = str(ask["open"])
                    libpq_uri(url)
                    conn = driver_connect(url)
                    if conn is None:
                        _write(fd_out, dict(tag, ok=False, unshared=True,
                                            error="no psycopg2 or psycopg to share"))
                        continue
                    try:
                        conns[ask["conn"]] = (conn, guarded_runner(conn, settings))
                    except BaseException:
                        _close_quietly(conn)
                        raise
                    _write(fd_out, dict(tag, ok=True))
                except Exception as exc:
                    _write(fd_out, dict(error_of(exc), ok=False, **tag))
                continue
            conn, run = conns.get(ask["conn"]) or (None, missing)
            try:
                asks, batch = requests_of(line)
            except Exception as exc:
                _write(fd_out, dict(error_of(exc), **tag))
                continue
            answer_asks(asks, batch, fd_out, run, error_of,
                        conn.rollback if conn is not None else None, tag)
    finally:
        for conn, _run in conns.values():
            _close_quietly(conn)


def serve(request, fd_in, fd_out, lines=None):
    """Connect, then answer statements until EOF (lines: an already started reader).

    The app's own libpq driver directly (cheap to import); SQLAlchemy only when the app's
    interpreter has neither psycopg2 nor psycopg.
    """
    lines = lines if lines is not None else _lines(fd_in)
    if request.get("shared"):
        serve_shared(request, fd_out, lines)
        return
    if request.get("mode") == "pgbouncer_admin":
        try:
            serve_pgbouncer_admin(request, fd_out, lines)
        except Exception as exc:
            _write(fd_out, {"ok": False, "error": _message(exc), "sqlstate": _sqlstate(exc)})
        return
    backend = str(request.get("url", "")).split("://", 1)[0].split("+", 1)[0]
    if backend == "sqlite":
        serve_sqlite(request, fd_out, lines)
        return
    if backend in MYSQL_BACKENDS:
        serve_mysql(request, fd_out, lines)
        return
    try:
        conn = driver_connect(request["url"])
    except Exception as exc:
        _write(fd_out, {"ok": False, "error": _message(exc), "sqlstate": _sqlstate(exc)})
        return
    if conn is not None:
        try:
            serve_driver(conn, request, fd_out, lines)
        finally:
            conn.close()
        return
    serve_sqlalchemy(request, fd_out, lines)


def serve_sqlalchemy(request, fd_out, lines):
    """serve() through the app's SQLAlchemy (the Engine-wide guard covers it)."""
    if not install_readonly_guard(request.get("guard") or {}):  # noqa: F821 (bundled)
        raise ImportError("the app's interpreter has no PostgreSQL driver")
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

        def run(sql, params):
            result = conn.execute(text(sql), params)
            return [[_plain(v) for v in row] for row in result.fetchmany(MAX_ROWS)] \
                if result.returns_rows else []

        answer_requests(lines, fd_out, run,
                        lambda exc: {"error": _message(exc), "sqlstate": _sqlstate(exc)},
                        lambda: _end(conn))  # never a transaction held open between requests
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
        # The Engine-wide guard is only needed (and SQLAlchemy only imported) when the
        # session falls back to SQLAlchemy; serve_driver calls the guard itself.
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
