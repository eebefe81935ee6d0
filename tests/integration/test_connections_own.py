"""The workers' connections from their own sockets (pidfd_getfd), never the host's tables."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import psutil
import pytest

from agent.privileged.sources import connections
from tests.skiprule import skip_or_fail
from tests.harness.postgres import PgDatabase, PostgresCluster

# A TCP and a unix-socket psycopg2 connection, an idle listener and a socketpair: only the
# two database connections are connections to report.
CLIENT = ("import psycopg2, socket, sys\n"
          "a = psycopg2.connect(sys.argv[1])\n"
          "b = psycopg2.connect(host=sys.argv[2], port=sys.argv[3], dbname=sys.argv[4],"
          " user='postgres')\n"
          "l = socket.socket(); l.bind(('127.0.0.1', 0)); l.listen()\n"
          "p = socket.socketpair()\n"
          "print('ready', flush=True)\n"
          "sys.stdin.read()\n")


@pytest.fixture
def client(pg: PostgresCluster, pg_database: PgDatabase) -> Iterator[int]:
    if os.geteuid() != 0:
        skip_or_fail("borrowing another process's sockets (pidfd_getfd) needs root")
    child = subprocess.Popen(
        [sys.executable, "-c", CLIENT,
         pg.libpq_dsn(pg_database.owner, pg_database.password, pg_database.name),
         str(pg.socket_dir), str(pg.port), pg_database.name],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        yield child.pid
    finally:
        child.kill()  # by its own Popen handle
        child.wait(10)


def _no_tables(*args: object, **kwargs: object) -> None:
    raise AssertionError("the host's socket tables were read")


def test_own_sockets_give_what_the_table_scan_gives(pg: PostgresCluster, client: int,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    scanned, errors = connections.observe_scan([client])
    assert errors == []
    monkeypatch.setattr(psutil, "net_connections", _no_tables)
    monkeypatch.setattr(psutil.Process, "net_connections", _no_tables)
    monkeypatch.setattr(connections, "unix_socket_table", _no_tables)
    own, errors = connections.observe([client])
    assert errors == []

    def seen(conns: list[connections.ObservedConnection]) -> list[tuple[object, ...]]:
        # The server side is only looked up for database sockets (the only ones named).
        return sorted((c.pid, c.kind, c.local_addr, c.local_port, c.remote_addr,
                       c.remote_port, c.socket_path,
                       c.peer_inode if c.looks_like_postgres() else 0) for c in conns)

    assert seen(own) == seen(scanned)
    assert len(own) == 4   # TCP, unix, both ends of the socketpair (no path)
    assert {c.endpoint for c in own if c.looks_like_postgres({pg.port})} == {
        f"127.0.0.1:{pg.port}", f"{pg.socket_dir}/.s.PGSQL.{pg.port}"}
    unix = next(c for c in own if c.kind == "unix" and c.socket_path)
    assert unix.peer_inode and psutil.Process(unix.peer_pid).name().startswith("postgres")


def test_the_unix_backend_is_found_among_the_postmasters_children(
        pg: PostgresCluster, client: int, monkeypatch: pytest.MonkeyPatch) -> None:
    observed, _ = connections.observe([client])
    unix = [c for c in observed if c.kind == "unix" and c.socket_path]
    monkeypatch.setattr(psutil, "process_iter", _no_tables)
    backends = connections.backend_pids(unix)
    assert set(backends) == set(unix)
    assert psutil.Process(backends[unix[0]]).ppid() == unix[0].peer_pid


def test_sockets_of_other_processes_are_not_looked_at(client: int) -> None:
    """Thousands of idle loopback sockets elsewhere on the host change nothing seen."""
    before, _ = connections.observe([client])
    listener = socket.create_server(("127.0.0.1", 0), backlog=512)
    idle = [socket.create_connection(listener.getsockname()) for _ in range(200)]
    try:
        after, _ = connections.observe([client])
    finally:
        for s in idle:
            s.close()
        listener.close()
    assert after == before
