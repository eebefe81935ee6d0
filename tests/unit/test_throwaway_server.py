"""Pure logic of the throwaway-server base the PostgreSQL and MariaDB harnesses share: a
port race is retried on another port, any other failure cleans up and is raised, stop()
ends only a process that still serves this datadir (a fake server; the real ones run in
tests/integration/test_harness.py, test_mysql.py and every PostgreSQL test)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.throwaway import ThrowawayServer, serves, wait_gone


class FakeError(RuntimeError):
    pass


class Fake(ThrowawayServer):
    error = FakeError
    failures: list[str]

    def _serve(self, port: int, timeout: float) -> None:
        self.tried = [*getattr(self, "tried", []), port]
        if self.failures:
            raise FakeError(self.failures.pop(0))


def fake(*failures: str) -> Fake:
    server = Fake()
    server.failures = list(failures)
    return server


def test_a_port_race_is_retried_on_another_port() -> None:
    server = fake("could not bind: address in use", "Bind failed")
    with server:
        assert len(server.tried) == 3 and server.port == server.tried[-1]
        assert server.base_dir is not None and server.base_dir.is_dir()
        base = server.base_dir
    assert not base.exists() and server.base_dir is None


def test_any_other_failure_cleans_up_and_is_raised() -> None:
    server = fake("initdb: out of disk")
    with pytest.raises(FakeError, match="out of disk"):
        server.start()
    assert server.base_dir is None and len(server.tried) == 1


def test_a_fixed_port_is_never_swapped() -> None:
    server = fake("bind failed")
    server.port = 1
    with pytest.raises(FakeError):
        server.start()
    assert server.tried == [1]


def test_five_port_races_give_the_last_error() -> None:
    server = fake(*(f"bind {i}" for i in range(5)))
    with pytest.raises(FakeError, match="bind 4"):
        server.start()


def test_stop_ends_only_a_process_serving_this_datadir(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; print(flush=True); "
                             "time.sleep(60)", f"--datadir={tmp_path}"], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"\n"  # it has exec'd
        assert serves(proc.pid, Path(sys.executable).name.encode(),
                      f"--datadir={tmp_path}".encode())
        assert not serves(proc.pid, b"mariadbd", f"--datadir={tmp_path}".encode())
        assert not serves(proc.pid, Path(sys.executable).name.encode(), b"--datadir=/other")
        server = Fake(base_dir=tmp_path, pid=proc.pid)
        server.program = b"mariadbd"      # not what runs there: left alone
        server.stop()
        assert proc.poll() is None
        server = Fake(base_dir=tmp_path, pid=proc.pid)
        server.program = Path(sys.executable).name.encode()
        server._datadir_arg = lambda: f"--datadir={tmp_path}".encode()  # type: ignore[method-assign]
        server.stop()
        # stop() killed it and reaped it (os.waitpid): nothing left, not even a zombie.
        assert not Path(f"/proc/{proc.pid}").exists() and server.pid is None
        proc.wait(timeout=10)
        assert tmp_path.exists()          # not ours to remove: the caller gave it
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wait_gone(proc.pid, timeout=1)        # already reaped: returns at once
