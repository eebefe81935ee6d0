"""PgBouncer between the workers and PostgreSQL: whether there is one, and its own view of
the workers' connections (its admin console's SHOW CLIENTS / SHOW DATABASES).

Behind a pooler the server sees the pooler's connections, never the workers': matching
pg_stat_activity by client address names nothing. PgBouncer itself knows each client's
address and port, the database name the client asked for and the role; SHOW DATABASES maps
that name to the server's host, port and database. The console is read as the unit's user
with the app's own credentials (it answers only roles in PgBouncer's stats_users or
admin_users); when it does not answer, the check says so honestly instead of guessing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import psutil
from agent.dburl import make_url

ADMIN_DATABASE = "pgbouncer"
# SHOW CLIENTS begins type, user, database, state, addr, port and SHOW DATABASES begins
# name, host, port, database in every PgBouncer since 1.x; later columns vary by version.
CLIENT_WIDTH, DATABASE_WIDTH = 6, 4


@dataclass(frozen=True)
class PoolerClient:
    """One client of PgBouncer as SHOW CLIENTS lists it."""

    addr: str
    port: int
    database: str   # the name the client asked PgBouncer for
    user: str


@dataclass(frozen=True)
class PoolerView:
    """What PgBouncer's console said: its clients, and where each database name leads."""

    clients: tuple[PoolerClient, ...] = ()
    # PgBouncer database name -> "host:port/dbname" on the server ("" when not configured).
    targets: tuple[tuple[str, str], ...] = ()
    error: str = ""

    def target(self, name: str) -> str:
        """Where PgBouncer sends clients of database `name` ('' when unknown)."""
        return dict(self.targets).get(name, "")


def parse_clients(rows: Iterable[Sequence[Any]]) -> tuple[PoolerClient, ...]:
    """Pure: SHOW CLIENTS rows -> the clients (the console's own sessions left out)."""
    out = []
    for row in rows:
        if len(row) < CLIENT_WIDTH:
            raise ValueError(f"a SHOW CLIENTS row has {len(row)} columns")
        _type, user, database, _state, addr, port = row[:CLIENT_WIDTH]
        if str(database) == ADMIN_DATABASE:
            continue
        try:
            number = int(port)
        except (TypeError, ValueError):
            number = -1  # a unix-socket client
        out.append(PoolerClient(str(addr or ""), number, str(database or ""), str(user or "")))
    return tuple(out)


def parse_databases(rows: Iterable[Sequence[Any]]) -> tuple[tuple[str, str], ...]:
    """Pure: SHOW DATABASES rows -> (name, 'host:port/dbname') pairs."""
    out = []
    for row in rows:
        if len(row) < DATABASE_WIDTH:
            raise ValueError(f"a SHOW DATABASES row has {len(row)} columns")
        name, host, port, database = row[:DATABASE_WIDTH]
        out.append((str(name), f"{host or 'localhost'}:{port}/{database or name}"))
    return tuple(out)


def read_console(conn: Any) -> PoolerView:
    """SHOW CLIENTS and SHOW DATABASES on an open console session (user_session with
    mode "pgbouncer_admin"); a refusal becomes the view's error."""
    try:
        clients = [tuple(r) for r in conn.execute("SHOW CLIENTS")]
        databases = [tuple(r) for r in conn.execute("SHOW DATABASES")]
    except Exception as exc:  # DBAPIError from the child, with the console's own words
        return PoolerView(error=str(getattr(exc, "orig", exc)))
    try:
        return PoolerView(parse_clients(clients), parse_databases(databases))
    except ValueError as exc:
        return PoolerView(error=f"PgBouncer's console answered in an unknown form ({exc})")


def name_clients(observed: Iterable[Any], view: PoolerView) -> list[tuple[Any, PoolerClient]]:
    """Pure: each worker TCP connection (agent.privileged.sources.connections.ObservedConnection) with
    the PgBouncer client entry of the same address and port."""
    by_addr = {(c.addr, c.port): c for c in view.clients}
    return [(conn, by_addr[(conn.local_addr, conn.local_port)]) for conn in observed
            if conn.kind == "tcp" and (conn.local_addr, conn.local_port) in by_addr]


def refused_by_pgbouncer(error: str) -> bool:
    """Pure: PgBouncer's own refusal of its console to a role not in stats_users/admin_users
    ("FATAL: not allowed"; PostgreSQL itself would say the database does not exist)."""
    return "not allowed" in error.lower()


def url_database(url: str) -> str:
    """The database name a URL asks its server (or PgBouncer) for ('' when none)."""
    try:
        return make_url(url).database or ""
    except Exception:  # the URL was judged elsewhere already
        return ""


def listener_name(addr: str, port: int) -> str:
    """The name of the local process listening on addr:port ('' when none is seen here or
    it cannot be read): 'pgbouncer' says what is at the other end of the workers' sockets."""
    try:
        listeners = psutil.net_connections(kind="inet")
    except (psutil.Error, OSError):
        return ""
    for c in listeners:
        if c.status != psutil.CONN_LISTEN or not c.pid or c.laddr.port != port:
            continue
        if c.laddr.ip not in (addr, "0.0.0.0", "::", f"::ffff:{addr}"):
            continue
        try:
            return psutil.Process(c.pid).name()
        except psutil.Error:
            return ""
    return ""
