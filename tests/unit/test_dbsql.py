"""agent.dbsql: the agent's text()/DBAPIError, on the session child's path and on a real
SQLAlchemy connection (SQLite in memory), and what importing it costs (no SQLAlchemy)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from agent.dbsql import DBAPIError, NullPool, SQLError, TextClause, create_engine, text
from agent.dburl import make_url


def test_text_is_the_sql_string_the_session_child_gets() -> None:
    clause = text("SELECT :x")
    assert isinstance(clause, TextClause)
    assert clause.text == "SELECT :x" == str(clause)
    # agent/privileged/dbclient.py sends str(getattr(clause, "text", clause))
    assert str(getattr(clause, "text", clause)) == "SELECT :x"


def test_a_real_sqlalchemy_connection_executes_it_and_its_errors_are_the_agents() -> None:
    engine = create_engine(make_url("sqlite://"), poolclass=NullPool)
    try:
        conn = engine.connect()
        try:
            assert conn.execute(text("SELECT :x + 1"), {"x": 41}).scalar() == 42
            assert conn.execute(text("SELECT 7")).scalar() == 7
            with pytest.raises(DBAPIError) as err:
                conn.execute(text("SELECT * FROM no_such_table"))
        finally:
            conn.close()
    finally:
        engine.dispose()
    assert isinstance(err.value, SQLError)
    assert type(err.value.orig).__name__ == "OperationalError"
    assert "no such table" in str(err.value)
    assert err.value.statement == "SELECT * FROM no_such_table"


def test_a_failed_connect_is_the_agents_dbapierror() -> None:
    engine = create_engine(make_url("sqlite:////nonexistent-dir/x.db"), poolclass=NullPool)
    with pytest.raises(DBAPIError) as err:
        engine.connect()
    assert "unable to open database file" in str(err.value.orig)


def test_the_server_error_code_stays_on_orig() -> None:
    class ServerError(Exception):
        pgcode = "55P03"

    exc = DBAPIError("SELECT 1", None, ServerError("lock timeout"))
    assert exc.orig.pgcode == "55P03"   # what database.is_lock_wait reads
    assert str(exc).startswith("(tests.unit.test_dbsql.ServerError) lock timeout")


def test_importing_roots_database_code_loads_no_sqlalchemy() -> None:
    code = ("import sys; import agent.privileged.inspector, agent.preflight.plan, "
            "agent.privileged.sources.database, agent.privileged.dbclient, agent.secrets; "
            "print(sorted(m for m in ('sqlalchemy', 'psycopg2', 'lxml') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"
