"""A throwaway PostgreSQL cluster for tests: initdb in a temp dir, a free port on 127.0.0.1.

The cluster runs as the ``postgres`` OS user when the tests run as root (initdb and the
server refuse to run as root), otherwise as the current user. It is started with settings
that trade durability for speed and with ``pg_stat_statements`` preloaded, so tests can
count the queries something made. ``stop()`` ends the postmaster it started (by the PID
in its own ``postmaster.pid``) and removes the directory.

Every TCP connection needs a password (scram-sha-256), as in production; the superuser
``postgres`` gets a random one. The unix socket lives in the temp dir and is only used by
the cluster's own tools.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from tests.harness.throwaway import ThrowawayServer, serves, wait_gone
from tests.harness.throwaway import HOST, free_port  # noqa: F401 - tests import them from here

PG_BIN_DIR = Path(os.environ.get("DRIFTWATCH_PG_BIN", "/usr/lib/postgresql/15/bin"))
PG_OS_USER = "postgres"
SUPERUSER = "postgres"
SQLALCHEMY_DRIVER = "postgresql+psycopg2"

FAST_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_preload_libraries": "'pg_stat_statements'",
    "pg_stat_statements.track": "all",
    "max_connections": "100",
    "shared_buffers": "32MB",
    "log_min_messages": "warning",
    "log_min_error_statement": "panic",
}


class PostgresError(RuntimeError):
    """The throwaway cluster could not be created, started, or a statement failed."""


def postgres_unavailable_reason(bin_dir: Path = PG_BIN_DIR) -> str | None:
    """Why a throwaway cluster cannot be started here, or None when it can."""
    missing = [tool for tool in ("initdb", "pg_ctl", "postgres")
               if not os.access(bin_dir / tool, os.X_OK)]
    if missing:
        return (f"PostgreSQL server binaries not found: {', '.join(missing)} missing in "
                f"{bin_dir} (apt-get install postgresql-15 postgresql-contrib, or set "
                f"DRIFTWATCH_PG_BIN to the directory holding initdb and pg_ctl)")
    if not (bin_dir.parent / "lib" / "pg_stat_statements.so").exists():
        return f"pg_stat_statements.so not found beside {bin_dir} (install postgresql-contrib)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(PG_OS_USER)
        except KeyError:
            return (f"running as root, but there is no {PG_OS_USER!r} OS user to run "
                    f"initdb/postgres as (they refuse to run as root)")
        if shutil.which("setpriv") is None:
            return "setpriv (util-linux) is needed to drop from root to the postgres user"
    return None


def sqlalchemy_url(user: str, password: str | None, db: str, host: str, port: int,
                   driver: str = SQLALCHEMY_DRIVER) -> str:
    """A SQLAlchemy URL with user and password quoted as URLs require."""
    auth = quote(user, safe="")
    if password is not None:
        auth += ":" + quote(password, safe="")
    return f"{driver}://{auth}@{host}:{port}/{quote(db, safe='')}"


@dataclass
class PgDatabase:
    """One database with its owner role, as handed out by the ``pg_database`` fixture."""

    cluster: "PostgresCluster"
    name: str
    owner: str
    password: str

    @property
    def url(self) -> str:
        """SQLAlchemy URL (postgresql+psycopg2://owner:password@127.0.0.1:port/name)."""
        return self.dsn()

    def dsn(self, driver: str = SQLALCHEMY_DRIVER) -> str:
        """The owner's URL with another driver prefix, e.g. ``postgresql`` for an app."""
        return self.cluster.dsn(self.owner, self.password, self.name, driver=driver)

    def execute(self, sql: Any, params: Sequence[Any] | dict[str, Any] | None = None,
                as_owner: bool = False) -> list[tuple[Any, ...]]:
        """Run sql in this database (as the superuser unless as_owner) and return rows."""
        if as_owner:
            return self.cluster.execute(sql, params, db=self.name, user=self.owner,
                                        password=self.password)
        return self.cluster.execute(sql, params, db=self.name)

    def alembic_versions(self) -> list[str]:
        """The version_num rows of alembic_version ([] when the table does not exist)."""
        rows = self.execute("SELECT to_regclass('public.alembic_version') IS NOT NULL")
        if not rows[0][0]:
            return []
        return sorted(r[0] for r in self.execute("SELECT version_num FROM alembic_version"))


@dataclass
class PostgresCluster(ThrowawayServer):
    """A throwaway cluster. ``start()`` / ``stop()``, or use it as a context manager."""

    bin_dir: Path = PG_BIN_DIR
    superuser: str = SUPERUSER
    superuser_password: str = field(default_factory=lambda: secrets.token_hex(12))

    prefix = "driftwatch-pg-"
    error = PostgresError
    program = b"postgres"
    log_heading = "server log:\n"

    # -- paths -----------------------------------------------------------------------------
    @property
    def socket_dir(self) -> Path:
        assert self.base_dir is not None
        return self.base_dir / "sock"

    @property
    def logfile(self) -> Path:
        assert self.base_dir is not None
        return self.base_dir / "postgres.log"

    # -- lifecycle: ThrowawayServer's start() (initdb, pg_ctl start) and stop() -----------
    def unavailable_reason(self) -> str | None:
        return postgres_unavailable_reason(self.bin_dir)

    def _prepare(self) -> None:
        assert self.base_dir is not None
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.base_dir.chmod(0o700)
        self.socket_dir.mkdir(exist_ok=True)
        self._chown_to_server_user(self.base_dir)

    def _install(self) -> None:
        self._initdb()

    def _serve(self, port: int, timeout: float) -> None:
        self._pg_ctl_start(port, timeout)

    def _port_taken(self, exc: RuntimeError) -> bool:
        return "could not bind" in str(exc).lower()

    def _started(self) -> None:
        self.pid = self._postmaster_pid()
        self.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")

    def _shutdown(self) -> None:
        """pg_ctl stop -m immediate (the base then SIGKILLs the postmaster if it lingers)."""
        if self.datadir.joinpath("postmaster.pid").exists():
            self._run_as_server_user(
                [str(self.bin_dir / "pg_ctl"), "stop", "-D", str(self.datadir),
                 "-m", "immediate", "-w", "-t", "20"], check=False)

    # -- DSNs ------------------------------------------------------------------------------
    def dsn(self, user: str, password: str | None, db: str,
            driver: str = SQLALCHEMY_DRIVER) -> str:
        """SQLAlchemy URL for user/password/db on this cluster (postgresql+psycopg2://...)."""
        return sqlalchemy_url(user, password, db, self.host, self.port, driver=driver)

    def superuser_dsn(self, db: str = "postgres", driver: str = SQLALCHEMY_DRIVER) -> str:
        """SQLAlchemy URL of the superuser."""
        return self.dsn(self.superuser, self.superuser_password, db, driver=driver)

    def libpq_dsn(self, user: str | None = None, password: str | None = None,
                  db: str = "postgres") -> str:
        """A libpq keyword DSN (for psycopg2.connect / psql)."""
        user = user or self.superuser
        if password is None and user == self.superuser:
            password = self.superuser_password
        parts = {"host": self.host, "port": str(self.port), "dbname": db, "user": user}
        if password is not None:
            parts["password"] = password
        return " ".join(f"{k}={_libpq_quote(v)}" for k, v in parts.items())

    # -- SQL -----------------------------------------------------------------------------------
    def connect(self, db: str = "postgres", user: str | None = None,
                password: str | None = None, autocommit: bool = True) -> Any:
        """A psycopg2 connection (autocommit by default)."""
        import psycopg2

        conn = psycopg2.connect(self.libpq_dsn(user, password, db), connect_timeout=10)
        conn.autocommit = autocommit
        return conn

    def execute(self, sql: Any, params: Sequence[Any] | dict[str, Any] | None = None,
                db: str = "postgres", user: str | None = None,
                password: str | None = None) -> list[tuple[Any, ...]]:
        """Run one statement (str or psycopg2.sql.Composed) in autocommit, as the superuser
        unless user is given; return its rows ([] for statements without a result)."""
        conn = self.connect(db, user, password)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return list(cur.fetchall()) if cur.description is not None else []
        finally:
            conn.close()

    def create_role(self, name: str, password: str | None, login: bool = True,
                    superuser: bool = False) -> None:
        """CREATE ROLE name [LOGIN] [SUPERUSER] PASSWORD '...'."""
        from psycopg2 import sql

        stmt = sql.SQL("CREATE ROLE {} {} {}").format(
            sql.Identifier(name),
            sql.SQL("LOGIN" if login else "NOLOGIN"),
            sql.SQL("SUPERUSER" if superuser else "NOSUPERUSER"))
        if password is not None:
            stmt = sql.SQL("{} PASSWORD {}").format(stmt, sql.Literal(password))
        self.execute(stmt)

    def drop_role(self, name: str) -> None:
        """DROP ROLE IF EXISTS name."""
        from psycopg2 import sql

        self.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))

    def create_database(self, name: str, owner: str | None = None) -> None:
        """CREATE DATABASE name OWNER owner (template0, UTF8)."""
        from psycopg2 import sql

        stmt = sql.SQL("CREATE DATABASE {} TEMPLATE template0 ENCODING 'UTF8'").format(
            sql.Identifier(name))
        if owner:
            stmt = sql.SQL("{} OWNER {}").format(stmt, sql.Identifier(owner))
        self.execute(stmt)

    def drop_database(self, name: str) -> None:
        """DROP DATABASE IF EXISTS name WITH (FORCE): also ends its sessions."""
        from psycopg2 import sql

        self.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                     .format(sql.Identifier(name)))

    def new_database(self, prefix: str = "dw") -> PgDatabase:
        """A fresh database owned by a fresh LOGIN role with a random password."""
        suffix = secrets.token_hex(4)
        name, owner, password = f"{prefix}_{suffix}", f"{prefix}_{suffix}_owner", \
            secrets.token_urlsafe(16)
        self.create_role(owner, password)
        self.create_database(name, owner)
        return PgDatabase(self, name, owner, password)

    def drop(self, database: PgDatabase) -> None:
        """Drop a database made by new_database() and its owner role."""
        self.drop_database(database.name)
        self.drop_role(database.owner)

    # -- pg_stat_statements ------------------------------------------------------------
    def reset_statements(self) -> None:
        """Forget everything pg_stat_statements counted so far."""
        self.execute("SELECT pg_stat_statements_reset()")

    def statements(self, db: str | None = None, user: str | None = None,
                   ) -> list[tuple[str, int]]:
        """(query, calls) counted by pg_stat_statements, filtered by database and role."""
        rows = self.execute(
            "SELECT s.query, s.calls FROM pg_stat_statements s "
            "JOIN pg_database d ON d.oid = s.dbid JOIN pg_roles r ON r.oid = s.userid "
            "WHERE (%(db)s::text IS NULL OR d.datname = %(db)s) "
            "AND (%(user)s::text IS NULL OR r.rolname = %(user)s) ORDER BY s.calls DESC",
            {"db": db, "user": user})
        return [(q, int(c)) for q, c in rows]

    # -- internals -----------------------------------------------------------------------
    def _server_user(self) -> pwd.struct_passwd | None:
        return pwd.getpwnam(PG_OS_USER) if os.geteuid() == 0 else None

    def _chown_to_server_user(self, path: Path) -> None:
        user = self._server_user()
        if user is None:
            return
        for p in [path, *path.rglob("*")]:
            os.chown(p, user.pw_uid, user.pw_gid)

    def _run_as_server_user(self, argv: list[str], check: bool = True,
                            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        user = self._server_user()
        if user is not None:
            argv = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}",
                    "--init-groups", "--", *argv]
        env = {"PATH": f"{self.bin_dir}:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
               "HOME": str(self.base_dir)}
        proc = subprocess.run(argv, capture_output=True, text=True, env=env,
                              cwd=self.base_dir, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise PostgresError(f"{' '.join(argv)} exited {proc.returncode}:\n"
                                f"{proc.stdout}{proc.stderr}{self._log_tail()}")
        return proc

    def _initdb(self) -> None:
        assert self.base_dir is not None
        pwfile = self.base_dir / "pwfile"
        pwfile.write_text(self.superuser_password + "\n")
        pwfile.chmod(0o600)
        self._chown_to_server_user(pwfile)
        self._run_as_server_user(
            [str(self.bin_dir / "initdb"), "-D", str(self.datadir), "-U", self.superuser,
             f"--pwfile={pwfile}", "--auth-host=scram-sha-256", "--auth-local=trust",
             "--encoding=UTF8", "--locale=C.UTF-8", "--no-sync", "--no-instructions"])
        pwfile.unlink()
        conf = self.datadir / "postgresql.conf"
        with conf.open("a") as fh:
            fh.write("\n# driftwatch test settings\n")
            for key, value in FAST_SETTINGS.items():
                fh.write(f"{key} = {value}\n")
            fh.write(f"unix_socket_directories = '{self.socket_dir}'\n")
            fh.write(f"listen_addresses = '{self.host}'\n")

    def _pg_ctl_start(self, port: int, timeout: float) -> None:
        if self.logfile.exists():
            self.logfile.unlink()
        proc = self._run_as_server_user(
            [str(self.bin_dir / "pg_ctl"), "start", "-D", str(self.datadir),
             "-l", str(self.logfile), "-w", "-t", str(int(timeout)), "-o", f"-p {port}"],
            check=False, timeout=timeout + 10)
        if proc.returncode != 0:
            # pg_ctl may have left a postmaster behind (e.g. timed out): stop it by PID.
            pid = self._postmaster_pid(missing_ok=True)
            if pid is not None and serves(pid, self.program, self._datadir_arg()):
                os.kill(pid, signal.SIGKILL)
                wait_gone(pid)
            raise PostgresError(f"pg_ctl start exited {proc.returncode}: "
                                f"{proc.stdout}{proc.stderr}\n{self._log_tail()}")

    def _postmaster_pid(self, missing_ok: bool = False) -> int | None:
        try:
            return int(self.datadir.joinpath("postmaster.pid").read_text().split("\n")[0])
        except (FileNotFoundError, ValueError, IndexError):
            if missing_ok:
                return None
            raise PostgresError("postmaster.pid missing after pg_ctl start")


def _libpq_quote(value: str) -> str:
    if value and all(c.isalnum() or c in "._-/" for c in value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
