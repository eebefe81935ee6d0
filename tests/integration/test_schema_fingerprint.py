"""The live schema's fingerprint (agent/privileged/sources/database.py) on a real PostgreSQL: the
same while nothing changes, different after each change a drift check would see."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, text

from agent.privileged.sources.database import SCHEMA_FINGERPRINT_SQL, query_schema_fingerprint
from tests.harness.postgres import PgDatabase

pytestmark = pytest.mark.postgres

CHANGES = (
    "ALTER TABLE a ADD COLUMN c int",
    "ALTER TABLE a ALTER COLUMN c SET NOT NULL",
    "ALTER TABLE a ALTER COLUMN c SET DEFAULT 1",
    "ALTER TABLE b DROP CONSTRAINT b_a_id_fkey",
    "ALTER TABLE b ADD CONSTRAINT b_a_id_fkey FOREIGN KEY (a_id) REFERENCES a (id) "
    "ON DELETE CASCADE",
    "CREATE UNIQUE INDEX ix_a_c ON a (c)",
    "ALTER TABLE b RENAME TO b2",
    "ALTER TABLE a ALTER COLUMN c TYPE bigint",
    "COMMENT ON COLUMN a.c IS 'cents'",
    "COMMENT ON TABLE a IS 'accounts'",
)


def test_fingerprint_changes_with_every_change_and_only_then(pg_database: PgDatabase) -> None:
    pg_database.execute("CREATE TABLE a (id serial PRIMARY KEY)", as_owner=True)
    pg_database.execute("CREATE TABLE b (id serial PRIMARY KEY, a_id int REFERENCES a (id))",
                        as_owner=True)
    engine = create_engine(pg_database.url)
    try:
        with engine.connect() as conn:
            seen = [query_schema_fingerprint(conn)]
            assert query_schema_fingerprint(conn) == seen[0]  # nothing changed
            for sql in CHANGES:
                pg_database.execute(sql, as_owner=True)
                seen.append(query_schema_fingerprint(conn))
    finally:
        engine.dispose()
    assert all(seen) and len(set(seen)) == len(CHANGES) + 1, seen


# The fingerprint query before it was made cheaper (issue #9): one join per branch.
FORMER_FINGERPRINT_SQL = """
SELECT md5(coalesce(string_agg(x, ' ' ORDER BY x), '')) FROM (
  SELECT concat_ws('|', 'col', n.nspname, c.relname, a.attname, a.atttypid, a.atttypmod,
                   a.attnotnull, d.adbin::text) AS x
    FROM pg_attribute a
    JOIN pg_class c ON c.oid = a.attrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace
    LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
   WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
     AND n.nspname <> 'information_schema' AND n.nspname !~ '^pg_'
  UNION ALL
  SELECT concat_ws('|', 'con', n.nspname, co.conname, co.contype, co.conrelid,
                   co.conkey::text, co.confrelid, co.confkey::text, co.conbin::text,
                   co.confupdtype, co.confdeltype, co.confmatchtype, co.condeferrable,
                   co.condeferred)
    FROM pg_constraint co JOIN pg_namespace n ON n.oid = co.connamespace
   WHERE n.nspname <> 'information_schema' AND n.nspname !~ '^pg_'
  UNION ALL
  SELECT concat_ws('|', 'idx', n.nspname, c.relname, i.indrelid, i.indkey::text, i.indisunique,
                   i.indexprs::text, i.indpred::text)
    FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace
   WHERE n.nspname <> 'information_schema' AND n.nspname !~ '^pg_'
  UNION ALL
  SELECT concat_ws('|', 'dsc', ds.objoid, ds.objsubid, ds.description)
    FROM pg_description ds JOIN pg_class c ON c.oid = ds.objoid
    JOIN pg_namespace n ON n.oid = c.relnamespace
   WHERE ds.classoid = 'pg_class'::regclass
     AND n.nspname <> 'information_schema' AND n.nspname !~ '^pg_'
) AS s
"""

SCHEMA = (
    "CREATE TABLE a (id serial PRIMARY KEY, name text NOT NULL DEFAULT 'x', "
    "price numeric(10, 2) CHECK (price > 0), code varchar(8) UNIQUE, gone int)",
    "ALTER TABLE a DROP COLUMN gone",
    "CREATE TABLE b (id serial PRIMARY KEY, a_id int REFERENCES a (id) ON DELETE CASCADE "
    "DEFERRABLE INITIALLY DEFERRED, at timestamptz DEFAULT now())",
    "CREATE INDEX ix_b_lower ON b (abs(a_id)) WHERE a_id > 0",
    "CREATE SCHEMA other",
    "CREATE TABLE other.c (x int, y int, UNIQUE (x, y))",
    "CREATE VIEW v AS SELECT id, name FROM a",
    "CREATE MATERIALIZED VIEW mv AS SELECT id FROM a",
    "CREATE SEQUENCE s",
    "COMMENT ON TABLE a IS 'accounts'",
    "COMMENT ON COLUMN other.c.x IS 'ex'",
    "COMMENT ON INDEX ix_b_lower IS 'an index comment'",
    "CREATE TYPE mood AS ENUM ('ok', 'sad')",
    "CREATE TABLE d (m mood)",
)


def test_the_cheaper_query_hashes_exactly_what_the_former_one_did(
        pg_database: PgDatabase) -> None:
    """Same rows, same md5: on an empty schema and after every step of one with every kind
    of object the fingerprint covers (and some it leaves out)."""
    engine = create_engine(pg_database.url)
    try:
        with engine.connect() as conn:
            def both() -> tuple[str, str]:
                return (conn.execute(text(SCHEMA_FINGERPRINT_SQL)).scalar(),
                        conn.execute(text(FORMER_FINGERPRINT_SQL)).scalar())
            pairs = [both()]
            for sql in SCHEMA:
                pg_database.execute(sql, as_owner=True)
                pairs.append(both())
    finally:
        engine.dispose()
    assert all(new == old for new, old in pairs), pairs
    assert len({new for new, _ in pairs}) > len(SCHEMA) // 2   # the steps were seen
