"""PgBouncer's admin console read as the unit's user: its own view of the app's clients,
and nothing but the fixed SHOW commands ever sent (a real PgBouncer 1.18, a real cluster)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest
from agent.dbsql import DBAPIError

from agent.privileged.dbclient import user_session
from agent.privileged.sources import database, pooler
from agent.privileged.sources.connections import ObservedConnection
from tests.conftest import skip_or_fail
from tests.harness.pgbouncer import PgBouncer, pgbouncer_unavailable_reason
from tests.harness.postgres import PgDatabase
from tests.integration.test_user_session import TIMEOUTS, unit_ctx

pytestmark = pytest.mark.postgres


@pytest.fixture
def bouncer(pg_database: PgDatabase) -> Iterator[PgBouncer]:
    reason = pgbouncer_unavailable_reason()
    if reason:
        skip_or_fail(reason)
    with PgBouncer(pg_database.cluster, users={pg_database.owner: pg_database.password},
                   stats_users=(pg_database.owner,)) as b:
        yield b


def console_url(bouncer: PgBouncer, db: PgDatabase) -> str:
    return database.with_database(bouncer.url(db.owner, db.password, db.name),
                                  pooler.ADMIN_DATABASE)


def test_console_names_the_apps_client_and_refuses_anything_but_show(
        flask_venv: Path, bouncer: PgBouncer, pg_database: PgDatabase) -> None:
    db = pg_database
    app = psycopg2.connect(host=bouncer.host, port=bouncer.port, dbname=db.name, user=db.owner,
                           password=db.password)
    try:
        app.cursor().execute("SELECT 1")
        host, port = _local_address(app)  # the app's client socket, as a worker holds it
        with user_session(unit_ctx(flask_venv), console_url(bouncer, db), TIMEOUTS,
                          mode="pgbouncer_admin") as conn:
            view = pooler.read_console(conn)
            for refused in ("PAUSE", "SHOW CLIENTS; PAUSE", "SHUTDOWN", "SELECT 1"):
                with pytest.raises(DBAPIError) as err:
                    conn.execute(refused)
                assert "only SHOW CLIENTS, SHOW DATABASES" in str(err.value.orig) or \
                    "one statement" in str(err.value.orig), (refused, err.value.orig)
        assert not view.error, view.error
        worker = ObservedConnection(1, "tcp", host, port, bouncer.host, bouncer.port)
        named = pooler.name_clients([worker], view)
        assert [(c.database, c.user) for _, c in named] == [(db.name, db.owner)]
        assert view.target(db.name) == f"{db.cluster.host}:{db.cluster.port}/{db.name}"
    finally:
        app.close()
    assert bouncer.proc is not None and bouncer.proc.poll() is None  # never paused nor shut


def _local_address(conn: "psycopg2.extensions.connection") -> tuple[str, int]:
    """The client side of a psycopg2 connection (its socket's local address)."""
    import socket

    sock = socket.fromfd(conn.fileno(), socket.AF_INET, socket.SOCK_STREAM)
    try:
        addr, port = sock.getsockname()[:2]
    finally:
        sock.close()
    return addr, port
