"""A throwaway database server for tests: the start/stop/wait shape PostgreSQL's and
MariaDB's harnesses share, and the two pytest fixture bodies they share.

A subclass says how to install and serve its datadir; this base makes the temp directory,
retries on a port somebody took meanwhile, stops what it started by PID (never by name,
checking the PID still serves this datadir) and removes the directory.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self, TypeVar

HOST = "127.0.0.1"
ATTEMPTS = 5  # ports tried when the free port was taken between finding and binding it


def free_port(host: str = HOST) -> int:
    """A TCP port that was free on host a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def serves(pid: int, program: bytes, datadir_arg: bytes) -> bool:
    """True when pid is still PROGRAM with DATADIR_ARG among its arguments (guards against
    PID reuse)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError):
        return False
    return bool(argv) and argv[0].endswith(program) and datadir_arg in argv


def wait_gone(pid: int, timeout: float = 10.0) -> None:
    """Wait until pid is gone: reaped if it is our child, else exited (a zombie counts)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        try:
            # A daemonised server is not our child: once dead it is init's zombie to reap.
            if Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z":
                return
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return
        time.sleep(0.02)


@dataclass
class ThrowawayServer:
    """start() / stop(), or a context manager; subclasses fill in the hooks below."""

    base_dir: Path | None = None
    host: str = HOST
    port: int = 0
    pid: int | None = None
    _owns_base: bool = False

    prefix: ClassVar[str] = "driftwatch-db-"   # of the temp directory
    error: ClassVar[type[RuntimeError]] = RuntimeError
    program: ClassVar[bytes] = b""             # the server's argv[0] ends with this
    log_heading: ClassVar[str] = ""            # put before the log tail in errors

    # -- hooks -------------------------------------------------------------------------------
    def unavailable_reason(self) -> str | None:
        """Why the server cannot start here, or None."""
        return None

    def _prepare(self) -> None:
        """Directories and ownership inside base_dir, before installing."""

    def _install(self) -> None:
        """A fresh datadir."""

    def _serve(self, port: int, timeout: float) -> None:
        """Start serving on port (setting self.pid when known), or raise self.error."""

    def _started(self) -> None:
        """After the server answers on its port: e.g. read its PID, create extensions."""

    def _port_taken(self, exc: RuntimeError) -> bool:
        """True when a start failed only because the port was taken."""
        return "bind" in str(exc).lower()

    def _shutdown(self) -> None:
        """A server's own quick stop, before the SIGKILL by PID (nothing by default)."""

    def _datadir_arg(self) -> bytes:
        """The argument that names this server's datadir in its command line."""
        return str(self.datadir).encode()

    @property
    def datadir(self) -> Path:
        assert self.base_dir is not None
        return self.base_dir / "data"

    @property
    def logfile(self) -> Path:
        raise NotImplementedError

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> Self:
        """Install a datadir and start the server; self.error with the log on failure."""
        reason = self.unavailable_reason()
        if reason:
            raise self.error(reason)
        if self.base_dir is None:
            self.base_dir = Path(tempfile.mkdtemp(prefix=self.prefix))
            self._owns_base = True
        try:
            self._prepare()
            self._install()
            last_error: RuntimeError | None = None
            for _attempt in range(ATTEMPTS):
                port = self.port or free_port(self.host)
                try:
                    self._serve(port, timeout)
                    self.port = port
                    break
                except self.error as exc:  # a port race: somebody took it meanwhile
                    last_error = exc
                    if self.port or not self._port_taken(exc):
                        raise
            else:
                raise last_error or self.error("could not start the server on a free port")
            self._started()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """The server's own quick stop, then SIGKILL by PID if it lingers; rm -rf."""
        if self.base_dir is not None:
            self._shutdown()
        if self.pid is not None and serves(self.pid, self.program, self._datadir_arg()):
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            wait_gone(self.pid)
        self.pid = None
        if self._owns_base and self.base_dir is not None:
            shutil.rmtree(self.base_dir, ignore_errors=True)
            self.base_dir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _log_tail(self, lines: int = 20) -> str:
        try:
            tail = self.logfile.read_text(errors="replace").splitlines()[-lines:]
        except (FileNotFoundError, TypeError, AssertionError):
            return ""
        return self.log_heading + "\n".join(tail)


# -- pytest fixture bodies -------------------------------------------------------------------
S = TypeVar("S", bound=ThrowawayServer)


def running(unavailable_reason: Callable[[], str | None], make: Callable[[], S]) -> Iterator[S]:
    """A session fixture's body: skip (fail in CI) where the server cannot run; otherwise a
    start failure is a real error (with its log), never a skip."""
    reason = unavailable_reason()
    if reason:
        from tests.conftest import skip_or_fail  # late: conftest imports the fixture plugins

        skip_or_fail(reason)
    server = make().start()
    try:
        yield server
    finally:
        server.stop()


def fresh_database(server: Any) -> Iterator[Any]:
    """A test fixture's body: server.new_database(), dropped with server.drop() after."""
    database = server.new_database()
    try:
        yield database
    finally:
        server.drop(database)
