"""driftwatch-agent as a real subprocess: READY=1, WATCHDOG=1, SIGHUP, SIGTERM, exit codes."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from agent.config import Config
from agent.snapshot import MigrationState, Snapshot, UnitSnapshot

ROOT = Path(__file__).resolve().parents[2]
AGENT = str(Path(sys.executable).parent / "driftwatch-agent")
INSPECTOR = "tests.integration.test_daemon:make_fake_inspector"


def make_probe_inspector(config: Config) -> object:
    """Hook for --inspector: every run starts a 'probe' in its own session, as the probe
    runner does, writes its PID to $DW_TEST_PROBE_PIDS and hangs on it."""
    def inspect(units: Sequence[str] | None) -> Snapshot:
        probe = subprocess.Popen(["sleep", "300"], start_new_session=True)
        with open(os.environ["DW_TEST_PROBE_PIDS"], "a") as f:
            f.write(f"{probe.pid}\n")
        probe.wait()
        return Snapshot(units=())
    return inspect


def make_fake_inspector(config: Config) -> object:
    """Hook for --inspector: one unit with a pending migration, no systemd or database."""
    def inspect(units: Sequence[str] | None) -> Snapshot:
        unit = UnitSnapshot(unit="gunicorn.service", timestamp=time.time(), unit_up=True,
                            app_loaded=True, db_up=True,
                            migrations=MigrationState(True, ("a",), ("b",), ("b",)))
        return Snapshot(units=(unit,))
    return inspect


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Notify:
    """A NOTIFY_SOCKET the test owns, as systemd would provide."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[str] = []

    def wait_for(self, state: str, timeout: float = 10.0) -> list[str]:
        """Receive until a datagram contains the line STATE; returns everything received."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.sock.settimeout(max(0.01, end - time.monotonic()))
            try:
                data = self.sock.recv(4096).decode()
            except TimeoutError:
                break
            self.messages.append(data)
            if state in data.splitlines():
                return self.messages
        raise AssertionError(f"{state} not received; got {self.messages}")

    def drain(self, seconds: float) -> list[str]:
        """Collect every datagram arriving within SECONDS."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                break
        return self.messages

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[Notify]:
    n = Notify(tmp_path / "notify.sock")
    yield n
    n.close()


def write_config(path: Path, port: int, extra: str = "") -> Path:
    path.write_text(f'[agent]\nlisten_address = "127.0.0.1:{port}"\nmin_interval_seconds = 1\n'
                    f"{extra}")
    return path


def spawn(args: list[str], tmp_path: Path, env_extra: dict[str, str] | None = None
          ) -> tuple[subprocess.Popen[bytes], Path]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(env_extra or {})
    stderr = tmp_path / "stderr.log"
    if not any(a.startswith("--web.unix-socket") for a in args):
        args = [*args, f"--web.unix-socket={tmp_path / 'agent.sock'}"]   # never the host's /run
    proc = subprocess.Popen([AGENT, *args], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=stderr.open("wb"))
    return proc, stderr


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Only ever our own child, by its PID."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(5)


def http_get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path)
    resp = conn.getresponse()
    return resp.status, resp.read()


def test_ready_reload_and_clean_stop(tmp_path: Path, notify: Notify) -> None:
    port = free_port()
    config = write_config(tmp_path / "agent.toml", port)
    proc, stderr = spawn(["--config.file", str(config), "--inspector", INSPECTOR], tmp_path,
                         {"NOTIFY_SOCKET": notify.path, "JOURNAL_STREAM": "8:1234"})
    try:
        start = time.monotonic()
        got = notify.wait_for("READY=1")
        print(f"\nREADY=1 after {time.monotonic() - start:.2f}s")
        assert any(line.startswith("STATUS=serving on 127.0.0.1:") for m in got
                   for line in m.splitlines())
        assert http_get(port, "/healthz") == (200, b"ok\n")
        status, body = http_get(port, "/metrics")
        assert status == 200 and b'driftwatch_pending_revisions{unit="gunicorn.service"} 1.0' \
            in body
        # After the first inspection the STATUS line summarises it.
        notify.wait_for("STATUS=watching 1 unit; 1 with pending migrations", timeout=5)

        # A bad config on SIGHUP is logged and the running one kept.
        config.write_text('[agent]\nlisten_adress = ":1"\n')
        proc.send_signal(signal.SIGHUP)
        notify.wait_for("READY=1")        # RELOADING=1 ... READY=1 (reload finished)
        assert any("RELOADING=1" in m for m in notify.messages)
        assert proc.poll() is None
        assert http_get(port, "/healthz")[0] == 200

        # A good config on SIGHUP is applied (here: a new port).
        new_port = free_port()
        write_config(config, new_port)
        proc.send_signal(signal.SIGHUP)
        notify.wait_for("READY=1")
        assert http_get(new_port, "/healthz")[0] == 200

        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(2) == 0
        print(f"SIGTERM -> exit 0 in {time.monotonic() - start:.2f}s")
        notify.wait_for("STOPPING=1", timeout=1)
    finally:
        stop(proc)
    log = stderr.read_text()
    assert "unknown key 'listen_adress' in [agent]" in log and "keeping the running" in log
    # journald format: priority prefix, no timestamp
    assert all(line.startswith("<") for line in log.splitlines()), log


def test_watchdog_pings(tmp_path: Path, notify: Notify) -> None:
    port = free_port()
    proc, _ = spawn(["--web.listen-address", f"127.0.0.1:{port}", "--inspector", INSPECTOR,
                     "--config.file", str(write_config(tmp_path / "a.toml", port))], tmp_path,
                    {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "400000"})
    try:
        notify.wait_for("READY=1")
        notify.wait_for("WATCHDOG=1", timeout=2)
        before = sum(m.count("WATCHDOG=1") for m in notify.messages)
        notify.drain(1.0)
        # WATCHDOG_USEC=0.4 s -> a ping every 0.2 s: about 5 in one second.
        assert sum(m.count("WATCHDOG=1") for m in notify.messages) >= before + 3
        proc.send_signal(signal.SIGINT)
        assert proc.wait(2) == 0
    finally:
        stop(proc)


def test_bad_config_at_start_exits_2_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('[agent]\nlisten_adress = ":9410"\n')
    proc, stderr = spawn(["--config.file", str(config), "--inspector", INSPECTOR], tmp_path)
    try:
        assert proc.wait(10) == 2
    finally:
        stop(proc)
    lines = stderr.read_text().splitlines()
    assert lines == [f"driftwatch-agent: {config}: unknown key 'listen_adress' in [agent] "
                     "(did you mean 'listen_address'?)"]


@pytest.mark.parametrize("args, fragment", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--log.level", "loud"], "invalid choice: 'loud'"),
    (["--web.listen-address", "9410"], "invalid listen address '9410'"),
    (["--config.file", "/nonexistent/agent.toml"], "config file not found"),
    (["--web.config.file", "/nonexistent/web.yml"], "cannot read web config file"),
])
def test_bad_flags_exit_2_with_one_line(tmp_path: Path, args: list[str], fragment: str) -> None:
    proc, stderr = spawn([*args, "--inspector", INSPECTOR], tmp_path)
    try:
        assert proc.wait(10) == 2
    finally:
        stop(proc)
    lines = stderr.read_text().splitlines()
    assert len(lines) == 1 and fragment in lines[0], lines


def test_request_timeout_shorter_than_scrape_wait_exits_2(tmp_path: Path) -> None:
    config = write_config(tmp_path / "a.toml", free_port(),
                          "scrape_wait_seconds = 5\nrequest_timeout_seconds = 3\n")
    proc, stderr = spawn(["--config.file", str(config), "--inspector", INSPECTOR], tmp_path)
    try:
        assert proc.wait(10) == 2
    finally:
        stop(proc)
    assert stderr.read_text().splitlines() == [
        f"driftwatch-agent: {config}: 'request_timeout_seconds' (3) must be larger than "
        "'scrape_wait_seconds' (5)"]


def test_port_in_use_exits_2(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc, stderr = spawn(["--web.listen-address", f"127.0.0.1:{port}",
                              "--config.file", str(write_config(tmp_path / "a.toml", port)),
                              "--inspector", INSPECTOR], tmp_path)
        try:
            assert proc.wait(10) == 2
        finally:
            stop(proc)
    assert "address already in use" in stderr.read_text()


def test_sigterm_outside_systemd_stops_the_probes_it_started(tmp_path: Path) -> None:
    port = free_port()
    pids_file = tmp_path / "probe.pids"
    proc, stderr = spawn(["--config.file", str(write_config(tmp_path / "a.toml", port)),
                          "--inspector", "tests.integration.test_daemon:make_probe_inspector"],
                         tmp_path, {"DW_TEST_PROBE_PIDS": str(pids_file)})
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if http_get(port, "/healthz")[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)
        http_get(port, "/metrics")      # starts an inspection: the probe starts and hangs
        while not pids_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        pid = int(pids_file.read_text().split()[0])
        assert Path(f"/proc/{pid}").exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        gone = time.monotonic() + 5
        while Path(f"/proc/{pid}").exists() and time.monotonic() < gone:
            time.sleep(0.05)
        alive = Path(f"/proc/{pid}").exists() and "Z" not in Path(
            f"/proc/{pid}/stat").read_text().split(")")[1].split()[0]
        assert not alive, f"probe {pid} survived the agent's SIGTERM"
    finally:
        stop(proc)
        for line in (pids_file.read_text().split() if pids_file.exists() else []):
            try:
                os.kill(int(line), signal.SIGKILL)   # only ever our own test probe
            except ProcessLookupError:
                pass
    assert "stopped 1 probe process group(s)" in stderr.read_text()


def worker_pids(proc: subprocess.Popen[bytes]) -> list[int]:
    """The agent's worker processes (its children running agent.daemon.worker)."""
    import psutil
    pids = []
    for child in psutil.Process(proc.pid).children():
        try:
            if "agent.daemon.worker" in " ".join(child.cmdline()):
                pids.append(child.pid)
        except psutil.Error:   # a zombie not reaped yet is no worker
            pass
    return pids


def test_inspection_runs_in_a_worker_that_is_replaced_when_killed(tmp_path: Path) -> None:
    port = free_port()
    proc, stderr = spawn(["--config.file", str(write_config(tmp_path / "a.toml", port)),
                          "--inspector", INSPECTOR, "--log.level", "debug"], tmp_path)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if http_get(port, "/healthz")[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)
        workers = worker_pids(proc)
        assert len(workers) == 1, workers
        assert b"driftwatch_pending_revisions" in http_get(port, "/metrics")[1]
        os.kill(workers[0], signal.SIGKILL)   # our agent's own worker, by its pid
        while time.monotonic() < deadline + 10:
            now = worker_pids(proc)
            if now and now != workers:
                break
            time.sleep(0.1)
        assert now and now != workers, "the killed worker was not replaced"
        # Scrapes go on, and the new worker inspects (everything was marked for re-inspection).
        assert http_get(port, "/healthz")[0] == 200
        status, body = http_get(port, "/metrics")
        assert status == 200 and b'driftwatch_pending_revisions{unit="gunicorn.service"} 1.0' \
            in body
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert not Path(f"/proc/{now[0]}").exists() or "Z" in Path(
            f"/proc/{now[0]}/stat").read_text().split(")")[1].split()[0]
    finally:
        stop(proc)
    assert "worker not running; restarting the worker" in stderr.read_text()


def https_get(port: int, path: str, ca: Path, user: str, password: str
              ) -> tuple[int, str]:
    """(status, the server certificate's CN) over TLS with basic auth."""
    import base64
    import ssl
    context = ssl.create_default_context(cafile=str(ca))
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    try:
        conn.request("GET", path, headers={"Authorization": f"Basic {token}"})
        resp = conn.getresponse()
        resp.read()
        cert = conn.sock.getpeercert()
        cn = dict(x[0] for x in cert["subject"])["commonName"]
        return resp.status, cn
    finally:
        conn.close()


def test_sighup_rereads_tls_and_users_and_keeps_them_on_a_bad_web_config(
        tmp_path: Path, notify: Notify) -> None:
    import shutil
    if shutil.which("openssl") is None:
        from tests.conftest import skip_or_fail
        skip_or_fail("openssl CLI not installed")
    from tests.integration.test_web import bcrypt_hash, make_pki
    pki = tmp_path / "pki"
    pki.mkdir()
    make_pki(pki, serial_cn="server-1")
    web = tmp_path / "web.yml"

    def write_web(password: str) -> None:
        web.write_text("tls_server_config:\n  cert_file: pki/server.crt\n"
                       "  key_file: pki/server.key\n"
                       f"basic_auth_users:\n  prometheus: '{bcrypt_hash(password)}'\n")

    write_web("first")
    port = free_port()
    proc, stderr = spawn(["--config.file", str(write_config(tmp_path / "a.toml", port)),
                          "--web.config.file", str(web), "--inspector", INSPECTOR], tmp_path,
                         {"NOTIFY_SOCKET": notify.path})
    ca = pki / "ca.crt"
    try:
        notify.wait_for("READY=1")
        assert https_get(port, "/metrics", ca, "prometheus", "first") == (200, "server-1")
        assert https_get(port, "/metrics", ca, "prometheus", "second")[0] == 401

        web.write_text("tls_server_config:\n  cert_file: [\n")        # broken YAML
        proc.send_signal(signal.SIGHUP)
        notify.wait_for("READY=1")
        assert https_get(port, "/metrics", ca, "prometheus", "first") == (200, "server-1")
        write_web("second")
        (pki / "server.key").write_text("not a key\n")                  # half-renewed
        proc.send_signal(signal.SIGHUP)
        notify.wait_for("READY=1")
        assert https_get(port, "/metrics", ca, "prometheus", "first") == (200, "server-1")

        make_pki(pki, serial_cn="server-2")      # renewed in place, same paths
        proc.send_signal(signal.SIGHUP)
        notify.wait_for("READY=1")
        assert https_get(port, "/metrics", ca, "prometheus", "second") == (200, "server-2")
        assert https_get(port, "/metrics", ca, "prometheus", "first")[0] == 401
        assert proc.poll() is None
    finally:
        stop(proc)
    log = stderr.read_text()
    assert log.count("reload failed, keeping the running configuration") == 2, log
    assert "not valid YAML" in log and "TLS setup failed" in log
    assert "Traceback" not in log
