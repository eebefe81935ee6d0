"""The live schema's fingerprint (agent/privileged/sources/database.py) on a real PostgreSQL: the
same while nothing changes, different after each change a drift check would see."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine

from agent.privileged.sources.database import query_schema_fingerprint
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
