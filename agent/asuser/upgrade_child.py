"""`flask db upgrade TARGET` as agentctl upgrade runs it: serialised, lock waits bounded.

This file is not imported by the agent: agentctl reads it and runs it with `python -c` in
the app's own virtualenv, as the unit's user, in the unit's context (so the unit's user
never needs to read the checkout). It loads the app the way `flask` does (FLASK_APP,
.flaskenv/.env), then, before any migration runs:
- takes the session-level advisory lock UPGRADE_LOCK_KEY on a connection of the app's own
  engine, held until the process ends; if another session holds it, says who (pid,
  application_name, since) and exits LOCKED_EXIT without migrating anything;
- sets lock_timeout on every new connection of every engine (also given in PGOPTIONS, but
  an `options=` in the app's URL replaces PGOPTIONS entirely, so it is SET and checked),
  and client_connection_check_interval, so a stopped upgrade's statement ends with it;
then calls Flask-Migrate's own upgrade(TARGET), retrying a bounded number of times when a
migration gave up waiting for a lock (SQLSTATE 55P03); each attempt is one transaction on
PostgreSQL, rolled back whole when it gives up.
Arguments: TARGET LOCK_TIMEOUT_MS RETRIES RETRY_DELAY_SECONDS KEY APPLICATION_NAME.
"""

import json
import os
import sys
import time

LOCKED_EXIT = 75  # EX_TEMPFAIL: another upgrade holds the lock; nothing was run
MARK = "driftwatch-upgrade:"  # lines agentctl reads (and does not show as they are)
LOCK_NOT_AVAILABLE = "55P03"


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
    """Every new PostgreSQL connection gets lock_timeout, set and read back."""
    from sqlalchemy import event
    from sqlalchemy.pool import Pool

    def on_connect(dbapi_conn, _record):
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


def take_lock(engine, key, application_name):
    """The advisory lock on a held connection of the app's engine, or exit LOCKED_EXIT."""
    from sqlalchemy import text

    if engine.dialect.name != "postgresql":
        say("no_lock", reason=f"the database is {engine.dialect.name}, not PostgreSQL")
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


def main(argv):
    """Load the app as flask does, lock, upgrade with bounded retries."""
    target, lock_timeout_ms, retries = argv[0], int(argv[1]), int(argv[2])
    delay, key, application_name = float(argv[3]), int(argv[4]), argv[5]
    bound_lock_waits(lock_timeout_ms)
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
        for attempt in range(1, retries + 2):
            try:
                upgrade(revision=target)
                break
            except Exception as exc:
                if sqlstate(exc) != LOCK_NOT_AVAILABLE or attempt > retries:
                    raise
                say("lock_timeout", attempt=attempt, of=retries + 1, wait_ms=lock_timeout_ms,
                    retry_in=delay)
                time.sleep(delay)
                delay *= 2
        if holder is not None:
            holder.close()


if __name__ == "__main__":
    main(sys.argv[1:])
