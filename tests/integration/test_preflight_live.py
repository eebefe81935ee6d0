"""The migration preflight's live read (agent/preflight/live.py) on a real PostgreSQL: the
one statement it sends answers what the three it replaced answered."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Connection

from agent.preflight import live
from tests.harness.postgres import PgDatabase, PostgresCluster

pytestmark = pytest.mark.postgres

# The three statements before issue #9 folded them into one.
FORMER_SIZES = text("""
SELECT n.name, c.oid::bigint, c.reltuples::float8, pg_total_relation_size(c.oid)
FROM unnest(CAST(:names AS text[]), CAST(:quoted AS text[])) AS n(name, quoted)
LEFT JOIN pg_class c ON c.oid = to_regclass(n.quoted)
""")
FORMER_LOCKERS = text("""
SELECT l.relation::bigint, l.pid, l.mode, l.granted, a.state, a.backend_type,
       a.application_name, EXTRACT(EPOCH FROM clock_timestamp() - a.xact_start)::float8,
       left(a.query, 200)
FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'relation' AND l.relation = ANY(CAST(:oids AS oid[]))
  AND l.pid <> pg_backend_pid()
ORDER BY l.granted DESC, l.pid
LIMIT :limit
""")
FORMER_OLD = text("""
SELECT pid, state, backend_type, application_name,
       EXTRACT(EPOCH FROM clock_timestamp() - xact_start)::float8, left(query, 200)
FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid() AND xact_start IS NOT NULL
  AND (state LIKE 'idle in transaction%' OR backend_type = 'autovacuum worker'
       OR application_name LIKE 'pg_dump%'
       OR clock_timestamp() - xact_start > make_interval(secs => :long))
ORDER BY xact_start
LIMIT :limit
""")


def former_query_live(conn: Connection, tables: list[str]) -> live.LiveState:
    """query_live as it was: sizes, then their lockers, then old transactions."""
    names = sorted(set(t for t in tables if t))
    sizes, oids = [], {}
    if names:
        for name, oid, reltuples, total in conn.execute(
                FORMER_SIZES, {"names": names, "quoted": [live.quote_name(n) for n in names]}):
            if oid is None:
                sizes.append(live.TableSize(name, False))
                continue
            oids[int(oid)] = name
            rows = None if reltuples is None or reltuples < 0 else int(reltuples)
            sizes.append(live.TableSize(name, True, rows, int(total or 0)))
    lockers = []
    if oids:
        for rel, pid, mode, granted, state, btype, app, xact, query in conn.execute(
                FORMER_LOCKERS, {"oids": list(oids), "limit": live.MAX_SESSIONS}):
            lockers.append(live.Session(
                int(pid), live.session_kind(state, btype, app, query, xact),
                oids.get(int(rel), ""), str(mode), bool(granted), state or "", xact,
                app or "", query or ""))
    old = []
    for pid, state, btype, app, xact, query in conn.execute(
            FORMER_OLD, {"long": live.LONG_TRANSACTION_SECONDS, "limit": live.MAX_SESSIONS}):
        old.append(live.Session(int(pid), live.session_kind(state, btype, app, query, xact),
                                state=state or "", transaction_seconds=xact,
                                application=app or "", query=query or ""))
    return live.LiveState(tuple(sizes), tuple(lockers), tuple(old))


def untimed(state: live.LiveState) -> Any:
    """A LiveState without the transaction ages (they grow between two reads)."""
    return (state.tables, state.error,
            [dataclasses.replace(s, transaction_seconds=None) for s in state.lockers],
            [dataclasses.replace(s, transaction_seconds=None) for s in state.old_transactions])


@pytest.mark.parametrize("tables", [[], ["items"], ["items", "public.items", "orders",
                                                    "missing", "Odd"]])
def test_the_one_statement_answers_what_the_three_did(pg: PostgresCluster,
                                                      pg_database: PgDatabase,
                                                      tables: list[str]) -> None:
    for sql in ("CREATE TABLE items (id int PRIMARY KEY, name text)",
                "INSERT INTO items SELECT g, 'x' FROM generate_series(1, 500) g",
                "ANALYZE items", "CREATE TABLE orders (id int)", 'CREATE TABLE "Odd" (x int)'):
        pg_database.execute(sql, as_owner=True)
    holders = []
    try:
        # Idle in transaction: holding a lock on items, on orders, and none.
        for sql in ("SELECT count(*) FROM items", "LOCK TABLE orders IN SHARE MODE",
                    "SELECT 1"):
            conn = pg.connect(pg_database.name, pg_database.owner, pg_database.password,
                              autocommit=False)
            conn.cursor().execute(sql)
            holders.append(conn)
        engine = create_engine(pg_database.url)
        try:
            with engine.connect() as conn:
                now = live.query_live(conn, tables)
                conn.rollback()
                before = former_query_live(conn, tables)
        finally:
            engine.dispose()
    finally:
        for conn in holders:
            conn.close()
    assert untimed(now) == untimed(before)
    assert len(now.old_transactions) == 3
    if "items" in tables:
        assert now.table("items") is not None and now.table("items").rows == 500
        assert {s.table for s in now.lockers} == {"items", "orders"} & {
            t.rsplit(".", 1)[-1] for t in tables}
