"""A throwaway MariaDB server for tests: Debian's mariadb-server in a temp datadir.

``mariadb-install-db`` makes a fresh datadir; ``mariadbd --no-defaults`` serves it on a free
port on 127.0.0.1 and on a unix socket in a directory the server user owns (mariadbd runs as
``mysql`` and cannot create its socket in a root-owned directory). Nothing of the machine's
own configuration (/etc/mysql) is read. ``stop()`` ends the server it started, by the PID in
its own pid file, and removes the directory. Every TCP login needs a password, as in
production; the harness itself talks to the server as root over the unix socket.
"""

from __future__ import annotations

import os
import pwd
import secrets
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from tests.harness.throwaway import ThrowawayServer
from tests.harness.throwaway import HOST, free_port  # noqa: F401 - tests import them from here

MARIADBD = Path(os.environ.get("DRIFTWATCH_MARIADBD", "/usr/sbin/mariadbd"))
INSTALL_DB = Path("/usr/bin/mariadb-install-db")
SERVER_USER = "mysql"
DRIVER = "mysql+pymysql"


class MariaDBError(RuntimeError):
    """The throwaway server could not be created or started, or a statement failed."""


def mariadb_unavailable_reason() -> str | None:
    """Why a throwaway MariaDB cannot be started here, or None when it can."""
    for tool in (MARIADBD, INSTALL_DB):
        if not os.access(tool, os.X_OK):
            return f"{tool} not found (apt-get install mariadb-server)"
    if os.geteuid() != 0:
        return "the throwaway MariaDB runs its server as the mysql user: needs root"
    try:
        pwd.getpwnam(SERVER_USER)
    except KeyError:
        return f"no {SERVER_USER!r} OS user (installed by mariadb-server)"
    try:
        import pymysql  # noqa: F401
    except ImportError:
        return "pymysql is not installed in the test venv (pip install -e '.[test]')"
    return None


@dataclass
class MariaDatabase:
    """One database with a user that has every privilege on it (``new_database()``)."""

    server: "MariaDBServer"
    name: str
    user: str
    password: str

    @property
    def url(self) -> str:
        """mysql+pymysql://user:password@127.0.0.1:port/name."""
        return self.server.url(self.user, self.password, self.name)

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] | None = None,
                as_user: bool = False) -> list[tuple[Any, ...]]:
        """Run sql in this database (as root unless as_user); rows."""
        if as_user:
            return self.server.execute(sql, params, db=self.name, user=self.user,
                                       password=self.password)
        return self.server.execute(sql, params, db=self.name)

    def alembic_versions(self, table: str = "alembic_version") -> list[str]:
        """The version_num rows of the version table ([] when it does not exist)."""
        if not self.execute("SELECT 1 FROM information_schema.tables WHERE table_schema = "
                            "%s AND table_name = %s", (self.name, table)):
            return []
        return sorted(r[0] for r in self.execute(f"SELECT version_num FROM `{table}`"))

    def tables(self) -> list[str]:
        """Base tables of the database, sorted."""
        return sorted(r[0] for r in self.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
            (self.name,)))


@dataclass
class MariaDBServer(ThrowawayServer):
    """A throwaway server. ``start()`` / ``stop()``, or use it as a context manager."""

    prefix = "driftwatch-mariadb-"
    error = MariaDBError
    program = b"mariadbd"

    @property
    def socket_path(self) -> Path:
        assert self.base_dir is not None
        return self.base_dir / "run" / "mariadb.sock"

    @property
    def logfile(self) -> Path:
        assert self.base_dir is not None
        return self.base_dir / "mariadb.log"

    @property
    def pidfile(self) -> Path:
        assert self.base_dir is not None
        return self.base_dir / "run" / "mariadb.pid"

    # -- lifecycle: ThrowawayServer's start() (install, serve) and stop() (SIGKILL) ---------
    def unavailable_reason(self) -> str | None:
        return mariadb_unavailable_reason()

    def _prepare(self) -> None:
        assert self.base_dir is not None
        (self.base_dir / "run").mkdir(parents=True, exist_ok=True)
        user = pwd.getpwnam(SERVER_USER)
        for path in (self.base_dir, self.base_dir / "run"):
            os.chown(path, user.pw_uid, user.pw_gid)
        self.base_dir.chmod(0o711)  # the socket's directory must be reachable by clients

    def _datadir_arg(self) -> bytes:
        return f"--datadir={self.datadir}".encode()

    # -- URLs and SQL -----------------------------------------------------------------------
    def url(self, user: str, password: str | None, db: str, driver: str = DRIVER) -> str:
        """SQLAlchemy URL for user/password/db over TCP."""
        auth = quote(user, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        return f"{driver}://{auth}@{self.host}:{self.port}/{quote(db, safe='')}"

    def connect(self, db: str | None = None, user: str | None = None,
                password: str | None = None, autocommit: bool = True) -> Any:
        """A PyMySQL connection: root over the unix socket, or user/password over TCP."""
        import pymysql

        if user is None:
            conn = pymysql.connect(unix_socket=str(self.socket_path), user="root",
                                   database=db, connect_timeout=10, autocommit=autocommit)
        else:
            conn = pymysql.connect(host=self.host, port=self.port, user=user,
                                   password=password or "", database=db, connect_timeout=10,
                                   autocommit=autocommit)
        return conn

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] | None = None,
                db: str | None = None, user: str | None = None,
                password: str | None = None) -> list[tuple[Any, ...]]:
        """One statement in autocommit (as root unless user is given); its rows."""
        conn = self.connect(db, user, password)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return list(cur.fetchall()) if cur.description is not None else []
        finally:
            conn.close()

    def new_database(self, prefix: str = "dw", grants: str = "ALL PRIVILEGES") -> MariaDatabase:
        """A fresh database and a user@'%' with `grants` on it and a random password."""
        suffix = secrets.token_hex(4)
        name, user, password = f"{prefix}_{suffix}", f"{prefix}_{suffix}_app", \
            secrets.token_urlsafe(16)
        self.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
        self.execute(f"CREATE USER '{user}'@'%%' IDENTIFIED BY %s", (password,))
        self.execute(f"GRANT {grants} ON `{name}`.* TO '{user}'@'%'")
        return MariaDatabase(self, name, user, password)

    def drop(self, database: MariaDatabase) -> None:
        """Drop a database made by new_database() and its user."""
        self.execute(f"DROP DATABASE IF EXISTS `{database.name}`")
        self.execute(f"DROP USER IF EXISTS '{database.user}'@'%'")

    # -- internals ---------------------------------------------------------------------------
    def _run(self, argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, cwd=self.base_dir,
                              env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"})
        if proc.returncode != 0:
            raise MariaDBError(f"{' '.join(argv)} exited {proc.returncode}:\n"
                               f"{proc.stdout}{proc.stderr}")
        return proc

    def _install(self) -> None:
        self._run([str(INSTALL_DB), "--no-defaults", f"--datadir={self.datadir}",
                   f"--user={SERVER_USER}", "--auth-root-authentication-method=normal",
                   "--skip-test-db", "--skip-name-resolve", "--innodb-buffer-pool-size=16M"])

    def _serve(self, port: int, timeout: float) -> None:
        if self.logfile.exists():
            self.logfile.unlink()
        argv = [str(MARIADBD), "--no-defaults", f"--datadir={self.datadir}",
                f"--user={SERVER_USER}", f"--port={port}", f"--bind-address={self.host}",
                f"--socket={self.socket_path}", f"--pid-file={self.pidfile}",
                f"--log-error={self.logfile}", "--skip-name-resolve", "--skip-log-bin",
                "--innodb-buffer-pool-size=16M", "--innodb-log-file-size=8M",
                "--innodb-flush-log-at-trx-commit=0", "--performance-schema=OFF",
                "--max-connections=100"]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        self.pid = proc.pid
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self.pid = None
                raise MariaDBError(f"mariadbd exited {proc.returncode}:\n{self._log_tail()}")
            try:
                self.execute("SELECT 1")
                return
            except Exception:
                time.sleep(0.1)
        raise MariaDBError(f"mariadbd did not answer within {timeout:g} s:\n{self._log_tail()}")
