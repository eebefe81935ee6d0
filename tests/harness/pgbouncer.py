"""A real PgBouncer (Debian's ``pgbouncer``) in transaction-pooling mode, for tests.

``PgBouncer(cluster, users={role: password}).start()`` writes a config in a temp dir,
runs ``pgbouncer`` in the foreground on a free 127.0.0.1 port (as the ``postgres`` OS user
when the tests run as root: it refuses root), every database forwarded to the cluster, and
``stop()`` ends exactly the process it started. One server connection per database/user
pair (``default_pool_size = 1``), so tests can show what a session-level ``SET`` would leak
to the next client of that server connection.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from tests.harness.postgres import PG_OS_USER, PostgresCluster, free_port

PGBOUNCER = os.environ.get("DRIFTWATCH_PGBOUNCER", "/usr/sbin/pgbouncer")


class PgBouncerError(RuntimeError):
    """PgBouncer could not be started."""


def pgbouncer_unavailable_reason() -> str | None:
    """Why a PgBouncer cannot be started here, or None when it can."""
    if not os.access(PGBOUNCER, os.X_OK):
        return f"{PGBOUNCER} not found (apt-get install pgbouncer)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(PG_OS_USER)
        except KeyError:
            return f"no {PG_OS_USER!r} OS user to run pgbouncer as (it refuses root)"
    return None


@dataclass
class PgBouncer:
    """One throwaway pgbouncer in front of cluster."""

    cluster: PostgresCluster
    users: dict[str, str] = field(default_factory=dict)
    pool_mode: str = "transaction"
    # Roles allowed on the admin console's SHOW commands (the "pgbouncer" database).
    stats_users: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 0
    base_dir: Path | None = None
    proc: subprocess.Popen[bytes] | None = None

    def url(self, user: str, password: str | None, db: str,
            driver: str = "postgresql+psycopg2") -> str:
        """A SQLAlchemy URL through the bouncer."""
        auth = quote(user, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        return f"{driver}://{auth}@{self.host}:{self.port}/{quote(db, safe='')}"

    def start(self, timeout: float = 20.0) -> "PgBouncer":
        """Write the config and start pgbouncer; returns once it accepts connections."""
        self.base_dir = Path(tempfile.mkdtemp(prefix="driftwatch-pgbouncer-"))
        self.port = self.port or free_port(self.host)
        users = {self.cluster.superuser: self.cluster.superuser_password, **self.users}
        userlist = "".join(f'"{u}" "{p}"\n' for u, p in users.items())
        (self.base_dir / "userlist.txt").write_text(userlist)
        (self.base_dir / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host={self.cluster.host} port={self.cluster.port}\n"
            "[pgbouncer]\n"
            f"listen_addr = {self.host}\nlisten_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = scram-sha-256\n"
            f"auth_file = {self.base_dir}/userlist.txt\n"
            f"pool_mode = {self.pool_mode}\n"
            "default_pool_size = 1\nmax_client_conn = 50\n"
            f"logfile = {self.base_dir}/pgbouncer.log\n"
            "server_reset_query =\n"
            "ignore_startup_parameters = extra_float_digits\n"
            + (f"stats_users = {', '.join(self.stats_users)}\n" if self.stats_users else ""))
        argv = [PGBOUNCER, str(self.base_dir / "pgbouncer.ini")]
        if os.geteuid() == 0:
            user = pwd.getpwnam(PG_OS_USER)
            for path in [self.base_dir, *self.base_dir.iterdir()]:
                os.chown(path, user.pw_uid, user.pw_gid)
            os.chmod(self.base_dir, 0o700)
            argv = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}",
                    "--init-groups", "--", *argv]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, cwd=self.base_dir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PgBouncerError(f"pgbouncer exited {self.proc.returncode}:\n{self.log()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise PgBouncerError(f"pgbouncer did not listen within {timeout:g} s:\n{self.log()}")

    def log(self) -> str:
        """pgbouncer's own log."""
        try:
            return (self.base_dir / "pgbouncer.log").read_text(errors="replace")  # type: ignore[operator]
        except (OSError, TypeError):
            return ""

    def stop(self) -> None:
        """End the pgbouncer this object started (by its PID) and remove its directory."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        if self.base_dir is not None:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> "PgBouncer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
