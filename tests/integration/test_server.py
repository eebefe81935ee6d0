"""agent.daemon.server over real HTTP on 127.0.0.1: /metrics, gzip, /status, /healthz, 404, TLS, and
the write path (one write per response, TCP_NODELAY, gzip only where it pays)."""

from __future__ import annotations

import gzip
import http.client
import json
import shutil
import socket
import socketserver
import ssl
import statistics
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.config import Config, TLSConfig
from agent.daemon.main import Daemon
from agent.daemon.exposition import GZIP_MIN_BYTES
from agent.daemon.server import AgentHTTPServer, ListenError, _Handler
from agent.snapshot import Snapshot
from tests.unit.test_metrics import SECRET, broken_unit, unknown_unit
from tests.conftest import skip_or_fail


class FakeInspect:
    """Returns a literal snapshot after `delay`; counts calls."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, units: Sequence[str] | None) -> Snapshot:
        with self.lock:
            self.calls += 1
        time.sleep(self.delay)
        return Snapshot(units=(broken_unit(), unknown_unit()), duration_seconds=self.delay,
                        errors=(f"discovery: postgresql://u:{SECRET}@db/x unreachable",))


def start_daemon(inspect: FakeInspect, tls: TLSConfig | None = None) -> Daemon:
    config = Config(listen_address="127.0.0.1:0", tls=tls or TLSConfig())
    daemon = Daemon(config, lambda cfg: inspect, watcher_factory=None)
    daemon.start()
    return daemon


@pytest.fixture
def inspect() -> FakeInspect:
    return FakeInspect(delay=0.2)


@pytest.fixture
def daemon(inspect: FakeInspect, monkeypatch: pytest.MonkeyPatch) -> Iterator[Daemon]:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    d = start_daemon(inspect)
    yield d
    d.shutdown()


def get(daemon: Daemon, path: str, headers: dict[str, str] | None = None
        ) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", daemon.server.port, timeout=10)
    conn.request("GET", path, headers=headers or {})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body


def test_metrics_parse(daemon: Daemon) -> None:
    status, headers, body = get(daemon, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert families["driftwatch_pending_revisions"].samples[0].value == 3
    assert "driftwatch_build_info" in families
    assert SECRET.encode() not in body


def test_metrics_gzip(daemon: Daemon) -> None:
    status, headers, body = get(daemon, "/metrics", {"Accept-Encoding": "gzip"})
    assert status == 200 and headers["content-encoding"] == "gzip"
    assert b"driftwatch_unit_up" in gzip.decompress(body)


def test_openmetrics(daemon: Daemon) -> None:
    status, headers, body = get(daemon, "/metrics",
                                {"Accept": "application/openmetrics-text; version=1.0.0"})
    assert status == 200 and "openmetrics" in headers["content-type"]
    assert body.rstrip().endswith(b"# EOF")


def test_status_json(daemon: Daemon) -> None:
    status, headers, body = get(daemon, "/status")
    assert status == 200 and headers["content-type"] == "application/json"
    data = json.loads(body)
    assert [u["unit"] for u in data["units"]] == ["app.service", "down.service"]
    assert data["agent"]["inspections_total"] == 1
    assert SECRET not in body.decode()        # masked even where the inspector slipped
    status, _, body = get(daemon, "/status?unit=down.service")
    assert status == 200 and [u["unit"] for u in json.loads(body)["units"]] == ["down.service"]
    status, _, body = get(daemon, "/status?unit=nope.service")
    assert status == 404 and "not watched" in json.loads(body)["error"]


def test_healthz_landing_404(daemon: Daemon) -> None:
    assert get(daemon, "/healthz")[::2] == (200, b"ok\n")
    status, headers, body = get(daemon, "/")
    assert status == 200 and b'href="/metrics"' in body and headers["content-type"].startswith(
        "text/html")
    assert get(daemon, "/nope")[0] == 404
    assert get(daemon, "/metrics/extra")[0] == 404


def test_fifty_concurrent_scrapes_one_inspection(daemon: Daemon, inspect: FakeInspect) -> None:
    barrier = threading.Barrier(50)
    statuses: list[int] = []

    def scrape() -> None:
        barrier.wait()
        statuses.append(get(daemon, "/metrics")[0])

    start = time.perf_counter()
    threads = [threading.Thread(target=scrape) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    elapsed = time.perf_counter() - start
    assert statuses == [200] * 50
    assert inspect.calls == 1
    assert daemon.registry.get_sample_value("driftwatch_inspections_total") == 1
    print(f"\n50 concurrent scrapes: 1 inspection, {elapsed * 1000:.0f} ms wall "
          f"(inspection takes {inspect.delay * 1000:.0f} ms)")


def test_cached_scrape_latency(daemon: Daemon) -> None:
    get(daemon, "/metrics")
    samples = []
    for _ in range(50):
        start = time.perf_counter()
        get(daemon, "/metrics")
        samples.append(time.perf_counter() - start)
    median = statistics.median(samples)
    print(f"\ncached /metrics scrape: median {median * 1000:.2f} ms, "
          f"max {max(samples) * 1000:.2f} ms")
    assert median < 0.05


def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ListenError, match=f"127.0.0.1:{port}: address already in use"):
            AgentHTTPServer(f"127.0.0.1:{port}", None, None, None)  # type: ignore[arg-type]


def test_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        skip_or_fail("no IPv6")
    try:
        server = AgentHTTPServer("[::1]:0", None, None, lambda: (True, ""))  # type: ignore[arg-type]
    except ListenError as exc:
        skip_or_fail(f"IPv6 loopback unavailable: {exc}")
    server.start()
    try:
        conn = http.client.HTTPConnection("::1", server.port, timeout=5)
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200
    finally:
        server.stop()


# -- TLS ------------------------------------------------------------------------------------
def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway CA, a server cert for 127.0.0.1 and a client cert, via the openssl CLI."""
    if shutil.which("openssl") is None:
        skip_or_fail("openssl CLI not installed")
    d = tmp_path_factory.mktemp("pki")
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
             "-subj", "/CN=driftwatch-test-ca", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.crt", "-days", "1",
                 *(["-extfile", "san.ext"] if name == "server" else []), cwd=d)
    return d


def test_tls_with_client_certificates(pki: Path, inspect: FakeInspect,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    tls = TLSConfig(str(pki / "server.crt"), str(pki / "server.key"), str(pki / "ca.crt"))
    daemon = start_daemon(inspect, tls)
    url = f"https://127.0.0.1:{daemon.server.port}/metrics"
    try:
        with_cert = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        with_cert.load_cert_chain(str(pki / "client.crt"), str(pki / "client.key"))
        with urllib.request.urlopen(url, context=with_cert, timeout=10) as resp:
            assert resp.status == 200 and b"driftwatch_unit_up" in resp.read()

        no_cert = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        with pytest.raises((ssl.SSLError, ConnectionError, urllib.error.URLError,
                            http.client.HTTPException)):
            with urllib.request.urlopen(url, context=no_cert, timeout=10) as resp:
                resp.read()

        # Plain HTTP to the TLS port gets nothing useful, and the server survives it.
        with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
            conn = http.client.HTTPConnection("127.0.0.1", daemon.server.port, timeout=5)
            conn.request("GET", "/metrics")
            assert conn.getresponse().status != 200
        with urllib.request.urlopen(url, context=with_cert, timeout=10) as resp:
            assert resp.status == 200
    finally:
        daemon.shutdown()


def test_tls_bad_cert_is_a_clear_error(tmp_path: Path) -> None:
    tls = TLSConfig(str(tmp_path / "missing.crt"), str(tmp_path / "missing.key"))
    with pytest.raises(ListenError, match="TLS setup failed"):
        AgentHTTPServer("127.0.0.1:0", None, None, None, tls)  # type: ignore[arg-type]


# -- the write path: no keep-alive stall, compression only where it pays ----------------------
def test_reused_connection_one_write_per_response_and_nodelay(
        daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each response leaves in one socket write on a TCP_NODELAY socket: neither Nagle nor the
    peer's delayed ACK can hold the next request of a keep-alive connection (~40 ms each)."""
    writes: list[tuple[int, int]] = []          # (fileno, bytes) of each server-side write
    nodelay: list[int] = []
    real_write = socketserver._SocketWriter.write    # type: ignore[attr-defined]
    real_setup = _Handler.setup

    def counting_write(self: Any, data: bytes) -> int:
        writes.append((self._sock.fileno(), len(data)))
        return real_write(self, data)

    def recording_setup(self: _Handler) -> None:
        real_setup(self)
        nodelay.append(self.request.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    monkeypatch.setattr(socketserver._SocketWriter, "write", counting_write)  # type: ignore[attr-defined]
    monkeypatch.setattr(_Handler, "setup", recording_setup)
    get(daemon, "/metrics")                       # the inspection, outside the timing
    writes.clear()
    nodelay.clear()
    conn = http.client.HTTPConnection("127.0.0.1", daemon.server.port, timeout=10)
    samples = []
    try:
        for i in range(20):
            path = "/metrics" if i % 2 == 0 else "/status"
            start = time.perf_counter()
            conn.request("GET", path, headers={"Accept-Encoding": "gzip"})
            resp = conn.getresponse()
            resp.read()
            samples.append(time.perf_counter() - start)
            assert resp.status == 200 and not resp.will_close
    finally:
        conn.close()
    assert len(nodelay) == 1 and nodelay[0] != 0          # one connection, NODELAY on it
    assert len(writes) == 20 and len({fd for fd, _ in writes}) == 1
    p50 = statistics.median(samples)
    print(f"\n20 requests on one reused connection: 20 writes, p50 {p50 * 1000:.2f} ms "
          f"(a Nagle + delayed-ACK stall is ~40 ms)")
    assert p50 < 0.02


def test_gzip_only_where_it_pays(daemon: Daemon) -> None:
    gz = {"Accept-Encoding": "gzip"}
    status, headers, body = get(daemon, "/metrics", gz)
    assert len(gzip.decompress(body)) >= GZIP_MIN_BYTES and headers["content-encoding"] == "gzip"
    status, headers, body = get(daemon, "/status", gz)
    assert headers["content-encoding"] == "gzip" and json.loads(gzip.decompress(body))["units"]
    status, headers, body = get(daemon, "/status?unit=nope.service", gz)   # a short 404
    assert status == 404 and len(body) < GZIP_MIN_BYTES
    assert "content-encoding" not in headers and json.loads(body)["error"]
    status, headers, body = get(daemon, "/healthz", gz)
    assert "content-encoding" not in headers and body == b"ok\n"


def test_unchanged_snapshot_reuses_rendered_families(daemon: Daemon) -> None:
    """A second scrape of the same snapshot renders only the per-scrape families, and its body
    equals the full render but for the scrape duration."""
    first = get(daemon, "/metrics")[2]
    cache = daemon.server.exposition
    rendered = cache.rendered
    second = get(daemon, "/metrics")[2]
    assert cache.rendered - rendered <= 5 and cache.reused > 0
    assert _without_duration(first) == _without_duration(second)
    assert _without_duration(second) == _without_duration(generate_latest(daemon.registry))


def _without_duration(body: bytes) -> bytes:
    return b"\n".join(line for line in body.splitlines()
                      if not line.startswith(b"driftwatch_scrape_collection_duration"))
