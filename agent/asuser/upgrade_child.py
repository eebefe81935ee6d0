"""The upgrade as agentctl upgrade runs it: pinned to TARGET, serialised, lock waits bounded.

This file is not imported by the agent: agentctl reads it and runs it with `python -c` in
the app's own virtualenv, as the unit's user, in the unit's context (so the unit's user
never needs to read the checkout). MODE says which tool migrates:
- "flask": loads the app the way `flask` does (FLASK_APP, .flaskenv/.env) and calls
  Flask-Migrate's own upgrade(TARGET), as `flask db upgrade TARGET` does;
- "alembic": a plain Alembic project (FastAPI, Starlette, ...): Alembic's own command line,
  `alembic -c ./alembic.ini upgrade TARGET`, so env.py decides the URL as it always does.
Before any migration runs, on the database the migration really uses (Flask-SQLAlchemy's
engine; for plain Alembic, the first engine env.py connects with):
- PostgreSQL: the session-level advisory lock UPGRADE_LOCK_KEY on a connection of that
  engine, held until the process ends; if another session holds it, says who (pid,
  application_name, since) and exits LOCKED_EXIT without migrating anything;
- SQLite: flock(2) LOCK_EX on the database file itself (SQLite locks with fcntl byte ranges,
  which flock does not touch on local filesystems), held until the process ends; if
  another process holds it, says which (from /proc/locks) and exits LOCKED_EXIT. A deploy
  script takes the same lock with `flock -n /path/app.db CMD`;
- MySQL/MariaDB: GET_LOCK(MYSQL_LOCK_NAME) on a held connection of that engine (a named
  server lock, released when the connection ends); if another connection holds it, says
  which (connection id, user, host) and exits LOCKED_EXIT;
- MySQL/MariaDB connections get lock_wait_timeout (metadata locks: the DDL's wait) and
  innodb_lock_wait_timeout, in whole seconds, rounded up, read back;
- PostgreSQL connections get lock_timeout (also given in PGOPTIONS, but an `options=` in
  the app's URL replaces PGOPTIONS entirely, so it is SET and checked) and
  client_connection_check_interval, so a stopped upgrade's statement ends with it; SQLite
  connections get busy_timeout = lock_timeout, read back.
A PostgreSQL migration that gave up waiting for a lock (SQLSTATE 55P03) is rolled back whole
and retried a bounded number of times. On SQLite nothing is retried: Alembic runs SQLite's
DDL outside one transaction, so a revision stopped half-way is not undone; nor on MySQL/
MariaDB, whose DDL commits implicitly (a retry would rerun half a revision).
Arguments: TARGET LOCK_TIMEOUT_MS RETRIES RETRY_DELAY_SECONDS KEY APPLICATION_NAME [MODE].
"""

import fcntl
import json
import os
import sqlite3
import sys
import time

LOCKED_EXIT = 75  # EX_TEMPFAIL: another upgrade holds the lock; nothing was run
MARK = "driftwatch-upgrade:"  # lines agentctl reads (and does not show as they are)
LOCK_NOT_AVAILABLE = "55P03"
MYSQL_LOCK_NAME = "driftwatch-upgrade"  # GET_LOCK() name; a deploy script can take it too
MYSQL_DRIVERS = ("pymysql", "MySQLdb")


def say(kind, **fields):
    """One line for agentctl."""
    print(MARK + json.dumps({"kind": kind, **fields}, default=str), flush=True)


def sqlstate(exc):
    """The SQLSTATE behind an exception (psycopg2 pgcode, psycopg sqlstate), else ''."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        for candidate in (exc, getattr(exc, "orig", None)):
            code = getattr(candidate, "pgcode", None) or getattr(candidate, "sqlstate", None)
            if code:
                return code
        exc = exc.__cause__ or exc.__context__
    return ""


def is_postgres(dbapi_conn):
    """True for connections of PostgreSQL drivers that have an autocommit switch."""
    module = type(dbapi_conn).__module__.split(".")[0]
    return module in ("psycopg2", "psycopg", "pg8000") and hasattr(dbapi_conn, "autocommit")


def bound_lock_waits(lock_timeout_ms):
    """Every new PostgreSQL connection gets lock_timeout, every SQLite one busy_timeout,
    set and read back."""
    from sqlalchemy import event
    from sqlalchemy.pool import Pool

    def on_connect(dbapi_conn, _record):
        if isinstance(dbapi_conn, sqlite3.Connection):
            bound_sqlite_waits(dbapi_conn, lock_timeout_ms)
            return
        if type(dbapi_conn).__module__.split(".")[0] in MYSQL_DRIVERS:
            bound_mysql_waits(dbapi_conn, lock_timeout_ms)
            return
        if not is_postgres(dbapi_conn):
            return
        saved = dbapi_conn.autocommit
        dbapi_conn.autocommit = True  # a SET inside a transaction is undone by its rollback
        try:
            cur = dbapi_conn.cursor()
            cur.execute(f"SET lock_timeout = {int(lock_timeout_ms)}")
            cur.execute("SELECT current_setting('lock_timeout')")
            shown = cur.fetchone()[0]
            try:
                # When agentctl stops us at its overall timeout, the server notices within a
                # second and rolls back, instead of finishing a long statement for nobody.
                cur.execute("SET client_connection_check_interval = 1000")
            except Exception:  # PostgreSQL before 14 has no such setting
                pass
            cur.close()
        finally:
            dbapi_conn.autocommit = saved
        if to_ms(shown) != int(lock_timeout_ms):
            raise RuntimeError(f"lock_timeout is {shown} after SET, not {lock_timeout_ms}ms")

    event.listen(Pool, "connect", on_connect)
    return on_connect


def bound_sqlite_waits(dbapi_conn, lock_timeout_ms):
    """busy_timeout: how long a statement waits for another connection's lock on the file."""
    dbapi_conn.execute("PRAGMA busy_timeout = %d" % int(lock_timeout_ms))
    shown = dbapi_conn.execute("PRAGMA busy_timeout").fetchone()[0]
    if int(shown) != int(lock_timeout_ms):
        raise RuntimeError(f"busy_timeout is {shown} after PRAGMA, not {lock_timeout_ms}")


def bound_mysql_waits(dbapi_conn, lock_timeout_ms):
    """lock_wait_timeout (metadata locks, which DDL waits for) and innodb_lock_wait_timeout
    (row locks), whole seconds rounded up (at least 1), set and read back."""
    seconds = max(1, -(-int(lock_timeout_ms) // 1000))
    cur = dbapi_conn.cursor()
    try:
        cur.execute("SET SESSION lock_wait_timeout = %d" % seconds)
        cur.execute("SET SESSION innodb_lock_wait_timeout = %d" % seconds)
        cur.execute("SELECT @@SESSION.lock_wait_timeout, @@SESSION.innodb_lock_wait_timeout")
        shown = cur.fetchone()
    finally:
        cur.close()
    if [int(v) for v in shown] != [seconds, seconds]:
        raise RuntimeError(f"lock_wait_timeout is {shown[0]} after SET, not {seconds}")


def take_mysql_lock(engine):
    """GET_LOCK(MYSQL_LOCK_NAME, 0) on a held connection, or say who holds it and exit."""
    from sqlalchemy import text

    holder = engine.connect()
    got = holder.execute(text("SELECT GET_LOCK(:n, 0)"), {"n": MYSQL_LOCK_NAME}).scalar()
    if got != 1:
        owner = holder.execute(text("SELECT IS_USED_LOCK(:n)"), {"n": MYSQL_LOCK_NAME}).scalar()
        rows = holder.execute(text(
            "SELECT ID, USER, HOST, TIME FROM information_schema.PROCESSLIST WHERE ID = :i"),
            {"i": owner or 0}).all() if owner else []
        holder.close()
        # Without the PROCESS privilege the processlist shows only the user's own threads:
        # the connection id from IS_USED_LOCK is still named.
        holders = [{"connection": r[0], "user": r[1], "host": r[2], "seconds": r[3]}
                   for r in rows] or ([{"connection": owner}] if owner else [])
        say("locked", lock=f"GET_LOCK('{MYSQL_LOCK_NAME}')", holders=holders)
        sys.exit(LOCKED_EXIT)
    holder.commit()  # the lock is the connection's: it stays until the connection ends
    say("locked_by_us", lock=f"GET_LOCK('{MYSQL_LOCK_NAME}')",
        pid=holder.execute(text("SELECT CONNECTION_ID()")).scalar())
    holder.commit()
    return holder


def is_sqlite_locked(exc):
    """True for SQLite's "database is locked" / "database table is locked" (SQLITE_BUSY)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        for candidate in (exc, getattr(exc, "orig", None)):
            if isinstance(candidate, sqlite3.OperationalError) and "locked" in str(candidate):
                return True
        exc = exc.__cause__ or exc.__context__
    return False


def to_ms(shown):
    """PostgreSQL's display of a duration ('5s', '500ms', '1min', '0') in milliseconds."""
    units = (("ms", 1), ("min", 60000), ("s", 1000), ("h", 3600000), ("d", 86400000))
    for suffix, factor in units:
        if shown.endswith(suffix):
            return int(float(shown[: -len(suffix)]) * factor)
    return int(shown)


HOLDERS = """
SELECT a.pid, a.application_name, a.backend_start, a.usename
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.classid::bigint = %(hi)s AND l.objid::bigint = %(lo)s
"""


def sqlite_file(url, cwd):
    """The file a SQLite URL opens, absolute as sqlite3 resolves it; '' for memory."""
    database = url.database or ""
    if database.startswith("file:"):  # a URI filename (?uri=true): file:/path?mode=...
        database = database[len("file:"):].split("?", 1)[0]
        if database.startswith("//"):
            database = database[2:]
    if not database or database == ":memory:" or "mode=memory" in str(url):
        return ""
    return os.path.normpath(os.path.join(cwd, database))


def flock_holders(st, proc_locks="/proc/locks"):
    """[{pid, command}] of the processes holding a flock on the file with stat st."""
    holders = []
    try:
        with open(proc_locks) as fh:
            lines = fh.read().splitlines()
    except OSError:
        return holders
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 4242 08:01:1234 0 EOF"; waiters have "->" first
        if len(fields) < 6 or fields[1] != "FLOCK":
            continue
        inode = fields[5].rsplit(":", 1)[-1]
        if inode != str(st.st_ino):
            continue
        pid = int(fields[4]) if fields[4].isdigit() else 0
        command = ""
        try:
            with open(f"/proc/{pid}/comm") as fh:
                command = fh.read().strip()
        except OSError:
            pass
        holders.append({"pid": pid, "command": command})
    return holders


def take_file_lock(path):
    """flock LOCK_EX on the SQLite file (a descriptor kept open), or exit LOCKED_EXIT."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        say("no_lock", reason=f"{path} does not exist yet (the upgrade creates it)")
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        say("locked", path=path, holders=flock_holders(os.fstat(fd)))
        sys.exit(LOCKED_EXIT)
    say("locked_by_us", path=path, pid=os.getpid())
    return fd


def take_lock(engine, key, application_name):
    """The upgrade lock for the engine's database (PostgreSQL: an advisory lock on a held
    connection; SQLite: flock on the file), or exit LOCKED_EXIT."""
    from sqlalchemy import text

    if engine.dialect.name == "sqlite":
        path = sqlite_file(engine.url, os.getcwd())
        if not path:
            say("no_lock", reason="an in-memory SQLite database")
            return None
        return take_file_lock(path)
    if engine.dialect.name in ("mysql", "mariadb"):
        return take_mysql_lock(engine)
    if engine.dialect.name != "postgresql":
        say("no_lock", reason=f"the database is {engine.dialect.name}, not PostgreSQL, "
                              "MySQL/MariaDB or SQLite")
        return None
    holder = engine.connect()
    holder.execute(text("SELECT set_config('application_name', :n, false)"),
                   {"n": application_name})
    got = holder.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar()
    if not got:
        rows = holder.execute(text(HOLDERS.replace("%(hi)s", ":hi").replace("%(lo)s", ":lo")),
                              {"hi": (key >> 32) & 0xFFFFFFFF, "lo": key & 0xFFFFFFFF}).all()
        holder.rollback()
        say("locked", key=key, holders=[{"pid": r[0], "application_name": r[1],
                                          "since": r[2].isoformat() if r[2] else "",
                                          "user": r[3]} for r in rows])
        sys.exit(LOCKED_EXIT)
    holder.commit()  # the lock is the session's, not the transaction's: it stays
    say("locked_by_us", key=key, pid=holder.execute(text("SELECT pg_backend_pid()")).scalar())
    holder.commit()
    return holder


def with_retries(upgrade, retries, delay, lock_timeout_ms):
    """upgrade(), again after a PostgreSQL lock_timeout (rolled back whole), at most
    retries more times; SQLite's "database is locked" is said and never retried."""
    for attempt in range(1, retries + 2):
        try:
            upgrade()
            return
        except Exception as exc:
            if is_sqlite_locked(exc):
                say("sqlite_locked", wait_ms=lock_timeout_ms)
                raise
            if sqlstate(exc) != LOCK_NOT_AVAILABLE or attempt > retries:
                raise
            say("lock_timeout", attempt=attempt, of=retries + 1, wait_ms=lock_timeout_ms,
                retry_in=delay)
            time.sleep(delay)
            delay *= 2


def release(holder):
    """Close the held lock connection or descriptor (the process ending would, too)."""
    try:
        if isinstance(holder, int):
            os.close(holder)
        elif holder is not None:
            holder.close()
    except Exception:  # an async engine's connection cannot close outside its loop
        pass


def flask_upgrade(target, retries, delay, lock_timeout_ms, key, application_name):
    """Load the app as flask does, lock, Flask-Migrate's upgrade(TARGET)."""
    from flask.cli import ScriptInfo, load_dotenv
    from flask_migrate import upgrade

    load_dotenv()
    app = ScriptInfo(app_import_path=os.environ.get("FLASK_APP")).load_app()
    with app.app_context():
        migrate = app.extensions.get("migrate")
        if migrate is None:
            print("the app has no Flask-Migrate extension (Migrate(app, db))", file=sys.stderr)
            sys.exit(2)
        holder = take_lock(migrate.db.engine, key, application_name)
        with_retries(lambda: upgrade(revision=target), retries, delay, lock_timeout_ms)
        release(holder)


def alembic_upgrade(target, retries, delay, lock_timeout_ms, key, application_name):
    """Alembic's own `alembic -c ./alembic.ini upgrade TARGET`, locked on the first engine
    env.py connects with (before env.py runs any migration on it)."""
    from alembic.config import CommandLine
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    state = {"taken": False, "holder": None}

    def on_engine_connect(conn, *_branch):  # SQLAlchemy 1.4 also passes "branch"
        if state["taken"]:
            return
        state["taken"] = True  # before take_lock: its own connect comes back here
        state["holder"] = take_lock(conn.engine, key, application_name)

    event.listen(Engine, "engine_connect", on_engine_connect)
    config = os.path.abspath("alembic.ini")
    if not os.path.exists(config):
        print(f"no alembic.ini in {os.getcwd()}", file=sys.stderr)
        sys.exit(2)
    with_retries(lambda: CommandLine(prog="alembic").main(
        argv=["-c", config, "upgrade", target]), retries, delay, lock_timeout_ms)
    release(state["holder"])


def main(argv):
    """Bound lock waits, then the upgrade with the tool MODE names."""
    target, lock_timeout_ms, retries = argv[0], int(argv[1]), int(argv[2])
    delay, key, application_name = float(argv[3]), int(argv[4]), argv[5]
    mode = argv[6] if len(argv) > 6 else "flask"
    bound_lock_waits(lock_timeout_ms)
    upgrade = alembic_upgrade if mode == "alembic" else flask_upgrade
    upgrade(target, retries, delay, lock_timeout_ms, key, application_name)


if __name__ == "__main__":
    main(sys.argv[1:])
