"""HTTP(S) endpoint: /metrics, /healthz, /status (JSON), a landing page at /; 404 otherwise."""

from __future__ import annotations

import errno
import html
import json
import logging
import os
import socket
import socketserver
import ssl
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.registry import CollectorRegistry

from agent import __version__
from agent.config import TLSConfig, parse_listen_address
from agent.errors import ConfigError, DriftwatchError
from agent.daemon.exposition import GZIP_MIN_BYTES, ExpositionCache, zlib_gzip
from agent.daemon.redact import redact_status
from agent.secrets import MASK, is_secret_name, mask_text, mask_url  # noqa: F401
from agent.daemon.webconfig import BasicAuth, WebConfig, WebTLS, make_ssl_context, peer_san_allowed

log = logging.getLogger(__name__)

StatusSource = Callable[[str | None], tuple[int, dict[str, Any]]]
HealthSource = Callable[[], tuple[bool, str]]


class ListenError(DriftwatchError):
    """The listen address cannot be bound (in use, not local, no permission)."""


# NAME=value in free text (a remedy saying "export PGPASSWORD=..."): masked by NAME.


def mask_strings(value: Any) -> Any:
    """Mask secrets in every string of a JSON-ready value: a last line of defence."""
    if isinstance(value, str):
        return mask_text(value)
    if isinstance(value, dict):
        return {k: mask_strings(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [mask_strings(v) for v in value]
    return value


LANDING = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>driftwatch agent</title></head>
<body><h1>driftwatch agent {version}</h1>
<p>Watches Flask apps run by gunicorn under systemd for un-applied migrations and schema drift.</p>
<ul>
<li><a href="/metrics">/metrics</a>: Prometheus metrics</li>
<li><a href="/status">/status</a>: the latest inspection as JSON (<code>?unit=NAME</code>)</li>
<li><a href="/healthz">/healthz</a>: liveness</li>
</ul></body></html>
"""


class _Handler(BaseHTTPRequestHandler):
    """Routes GET requests; the server object carries the sources, limits and web config."""

    server: _ServerBase  # type: ignore[assignment]
    server_version = f"driftwatch/{__version__}"
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        """Socket options, the connection's first deadline, then the TLS handshake (in this
        thread, under that deadline)."""
        self.timeout = self.server.request_timeout_seconds
        if self.server.address_family in (socket.AF_INET, socket.AF_INET6):
            # One write per response already; NODELAY also covers TLS records (issue: the
            # 40 ms keep-alive stall of Nagle + delayed ACK).
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().setup()
        self.trusted = self.server.trusted_peer(self.connection)
        self.user = ""
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.do_handshake()
            tls = self.server.web.tls
            cert = self.connection.getpeercert()
            if tls is not None and not peer_san_allowed(cert, tls.client_allowed_sans):
                log.debug("client certificate of %s has no allowed SAN", self.address_string())
                raise ConnectionAbortedError("client certificate SAN not allowed")
            if cert and tls is not None and tls.verifies_clients:
                self.user = "client certificate " + _subject_cn(cert)

    def handle(self) -> None:
        """Requests on this connection until it closes; each wait and each request has its
        own deadline, enforced by the server's reaper."""
        self.close_connection = True
        self._one()
        while not self.close_connection:
            self._one()

    def _one(self) -> None:
        self.server.limiter.mark(self.request, waiting=True)
        self.handle_one_request()

    def address_string(self) -> str:
        """Peer address; 'unix' for the local socket (its client_address is empty)."""
        if isinstance(self.client_address, tuple) and self.client_address:
            return str(self.client_address[0])
        return "unix"

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        """Authenticate, then dispatch on the path."""
        self.server.limiter.mark(self.request, waiting=False)
        url = urlsplit(self.path)
        if not self._authenticate():
            return
        routes = {"/metrics": self._metrics, "/healthz": self._healthz,
                  "/status": self._status, "/": self._landing}
        route = routes.get(url.path)
        if route is None:
            self._send(404, b"not found\n", "text/plain; charset=utf-8")
            return
        try:
            route(parse_qs(url.query))
        except (ConnectionError, TimeoutError, ssl.SSLError) as exc:
            # The client went away or was too slow: routine, not an error of ours.
            log.debug("client %s gone while serving %s: %s", self.address_string(), url.path,
                      exc)
            self.close_connection = True
        except Exception:  # one broken request must never take the server down
            log.exception("error serving %s", url.path)
            self._send(500, b"internal error\n", "text/plain; charset=utf-8")

    def _authenticate(self) -> bool:
        """exporter-toolkit's rule: with basic_auth_users every request needs valid
        credentials (the root-only unix socket is trusted as it is)."""
        auth = self.server.basic_auth
        if self.trusted or auth is None:
            return True
        user = auth.check(self.headers.get("Authorization"))
        if user is None:
            self._send(401, b"Unauthorized\n", "text/plain; charset=utf-8",
                       [("WWW-Authenticate", "Basic")])
            return False
        self.user = user
        return True

    @property
    def detailed(self) -> bool:
        """Whether this client may see /status detail: root on the socket or authenticated."""
        return self.trusted or bool(self.user)

    def _send(self, code: int, body: bytes, content_type: str,
              extra: list[tuple[str, str]] | None = None) -> None:
        """Status line, headers and body in one write (no Nagle/delayed-ACK stall)."""
        self.send_response(code)
        if self.server.limiter.crowded():
            # Near the cap, keep-alive ends after each response: clients queue in turn
            # instead of the connections already in holding every slot.
            self.send_header("Connection", "close")
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (*self.server.web.headers, *(extra or [])):
            self.send_header(name, value)
        self._headers_buffer.append(b"\r\n")  # what end_headers() adds, without its flush
        data = b"".join(self._headers_buffer) + body
        self._headers_buffer = []
        self.wfile.write(data)

    def _metrics(self, query: dict[str, list[str]]) -> None:
        encoder, content_type = choose_encoder(self.headers.get("Accept"))
        body = self.server.exposition.render(self.server.registry, encoder, content_type)
        self._send_maybe_compressed(200, body, content_type)

    def _send_maybe_compressed(self, code: int, body: bytes, content_type: str) -> None:
        """gzip only where it pays: a body that would not fill one TCP segment gains nothing
        but CPU; level 1 gets most of the size at a fraction of level 9's cost."""
        if len(body) >= GZIP_MIN_BYTES and gzip_accepted(self.headers.get("Accept-Encoding")):
            self._send(code, zlib_gzip(body), content_type, [("Content-Encoding", "gzip")])
        else:
            self._send(code, body, content_type)

    def _healthz(self, query: dict[str, list[str]]) -> None:
        ok, reason = self.server.health()
        self._send(200 if ok else 503, (b"ok\n" if ok else f"unhealthy: {reason}\n".encode()),
                   "text/plain; charset=utf-8")

    def _status(self, query: dict[str, list[str]]) -> None:
        unit = query.get("unit", [None])[0]
        code, data = self.server.status(unit)
        data = mask_strings(data)
        if not self.detailed:
            data = redact_status(data)
        body = json.dumps(data, indent=2, sort_keys=True).encode() + b"\n"
        self._send_maybe_compressed(code, body, "application/json")

    def _landing(self, query: dict[str, list[str]]) -> None:
        body = LANDING.format(version=html.escape(__version__)).encode()
        self._send(200, body, "text/html; charset=utf-8")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base signature
        """Access log at debug level only: scrapes every 15 s would flood the journal."""
        log.debug("%s %s", self.address_string(), format % args)


def _subject_cn(cert: dict[str, Any]) -> str:
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return "?"


def _shutdown(sock: socket.socket) -> None:
    """Unblock whatever thread reads or writes SOCK (the plain socket call: SSLSocket's own
    shutdown() would drop its SSL object under the other thread's feet)."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


@dataclass
class _Conn:
    waiting: bool            # waiting for (the rest of) a request: may be evicted
    since: float             # when the current wait or request began
    deadline: float
    served: int = 0          # requests answered: >0 and waiting means an idle keep-alive


class ConnectionLimiter:
    """At most max_connections open connections (so at most that many threads), each wait for
    a request and each request bounded by request_timeout_seconds in total.

    When full, a new connection closes an idle keep-alive connection (any HTTP client retries
    a GET on a fresh one), else the connection that has waited longest for its first request
    if that is longer than evict_after_seconds (a slow client makes room for a scrape, a burst
    of fresh connections does not evict itself); otherwise the accept loop waits for a slot
    (the rest queue in the kernel's backlog) and refuses only after a whole request timeout.
    """

    def __init__(self, max_connections: int, request_timeout_seconds: float,
                 clock: Callable[[], float] = time.monotonic,
                 evict_after_seconds: float | None = None) -> None:
        self.max_connections = max_connections
        self.request_timeout_seconds = request_timeout_seconds
        # A client that has not sent its request after this long is slow (or idle).
        self.evict_after_seconds = (min(1.0, request_timeout_seconds / 4)
                                    if evict_after_seconds is None else evict_after_seconds)
        self._clock = clock
        self._lock = threading.Condition()
        self._conns: dict[socket.socket, _Conn] = {}
        self.refused = self.evicted = self.expired = self.peak = 0
        self._closing = False

    def admit(self, sock: socket.socket, wait: float = 0.0) -> bool:
        """Register SOCK, evicting the longest-waiting connection when full, else waiting up
        to WAIT seconds for a busy one to finish; False: refuse."""
        victim = None
        with self._lock:
            end = time.monotonic() + wait
            while True:
                now = self._clock()
                live = [(c.since, s) for s, c in self._conns.items() if c.deadline > -1]
                idle = [(since, s) for since, s in live
                        if self._conns[s].waiting and self._conns[s].served]
                stale = idle or [(since, s) for since, s in live if self._conns[s].waiting
                                 and now - since >= self.evict_after_seconds]
                if len(live) < self.max_connections or stale:
                    break
                left = end - time.monotonic()
                if left <= 0 or self._closing:
                    self.refused += 1
                    return False
                self._lock.wait(min(left, 0.25))
            if len(live) >= self.max_connections:
                victim = min(stale, key=lambda item: item[0])[1]
                self._conns[victim].deadline = -1      # counted out; its thread is ending
                self.evicted += 1
            self._conns[sock] = _Conn(True, now, now + self.request_timeout_seconds)
            self.peak = max(self.peak, sum(1 for c in self._conns.values() if c.deadline > -1))
        if victim is not None:
            log.debug("connection limit %d reached: dropping the connection waiting longest",
                      self.max_connections)
            _shutdown(victim)
        return True

    def mark(self, sock: socket.socket, waiting: bool) -> None:
        """A new wait for a request (waiting) or a request being served starts now."""
        now = self._clock()
        with self._lock:
            conn = self._conns.get(sock)
            if conn is not None and conn.deadline > -1:
                if conn.waiting and not waiting:
                    conn.served += 1
                conn.waiting, conn.since = waiting, now
                conn.deadline = now + self.request_timeout_seconds

    def release(self, sock: socket.socket) -> None:
        """SOCK is closed."""
        with self._lock:
            self._conns.pop(sock, None)
            self._lock.notify()

    def expire(self) -> int:
        """Shut down every connection past its deadline; returns how many."""
        now = self._clock()
        with self._lock:
            late = [s for s, c in self._conns.items() if -1 < c.deadline <= now]
            for s in late:
                self._conns[s].deadline = -1
            self.expired += len(late)
        for s in late:
            _shutdown(s)
        if late:
            log.debug("closed %d connection(s) past the %.0fs request deadline", len(late),
                      self.request_timeout_seconds)
        return len(late)

    def crowded(self) -> bool:
        """Three quarters of the slots or more are taken."""
        return self.open_connections() * 4 >= self.max_connections * 3

    def close(self) -> None:
        """Stop waiting for free slots: the server is stopping."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()

    def open_connections(self) -> int:
        """Connections currently counted against the limit."""
        with self._lock:
            return sum(1 for c in self._conns.values() if c.deadline > -1)


class _ServerBase(socketserver.ThreadingMixIn):
    """What the TCP and the unix-socket server share: sources, web config, limits, reaper."""

    daemon_threads = True
    block_on_close = False
    # socketserver's default backlog of 5 turns a burst of scrapes into 1 s SYN retries.
    request_queue_size = 128
    address_family: socket.AddressFamily

    def _init_common(self, registry: CollectorRegistry, status: StatusSource,
                     health: HealthSource, web: WebConfig, max_connections: int,
                     request_timeout_seconds: float) -> None:
        self.registry = registry
        self.exposition = ExpositionCache()
        self.status = status
        self.health = health
        self.request_timeout_seconds = request_timeout_seconds
        self.limiter = ConnectionLimiter(max_connections, request_timeout_seconds)
        self.set_web(web)
        self._thread: threading.Thread | None = None
        self._reaper: threading.Thread | None = None
        self._stopping = threading.Event()

    def set_web(self, web: WebConfig) -> None:
        """Swap TLS context, users and headers (SIGHUP: certificate files are read again)."""
        self.ssl_context = make_ssl_context(web.tls) if web.tls is not None else None
        self.basic_auth = BasicAuth(web.users) if web.users else None
        self.web = web

    def trusted_peer(self, sock: socket.socket) -> bool:
        """Only the unix socket's root (or our own user) peers are trusted."""
        return False

    def process_request(self, request: Any, client_address: Any) -> None:
        """A thread per admitted connection; refused ones are closed at once."""
        if not self.limiter.admit(request, wait=self.request_timeout_seconds):
            log.debug("refusing a connection: %d connections busy", self.limiter.max_connections)
            self._refuse(request)
            return
        super().process_request(request, client_address)  # type: ignore[misc]

    def _refuse(self, request: socket.socket) -> None:
        if not isinstance(request, ssl.SSLSocket):
            try:
                request.setblocking(False)
                request.send(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                             b"Connection: close\r\nRetry-After: 1\r\n\r\n")
            except OSError:
                pass
        self.shutdown_request(request)  # type: ignore[attr-defined]

    def shutdown_request(self, request: Any) -> None:
        """Forget the connection, then close it."""
        self.limiter.release(request)
        super().shutdown_request(request)  # type: ignore[misc]

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Client errors (reset, timeout, TLS handshake refused) are routine: debug, no
        traceback on stderr."""
        log.debug("connection from %s ended: %s", client_address or "unix",
                  sys.exc_info()[1])

    def start(self) -> None:
        """Serve in a background thread; a reaper enforces the deadlines."""
        self._thread = threading.Thread(target=self.serve_forever,  # type: ignore[attr-defined]
                                        name=f"driftwatch-{self.kind}",
                                        kwargs={"poll_interval": 0.2}, daemon=True)
        self._thread.start()
        self._reaper = threading.Thread(target=self._reap, name="driftwatch-reaper",
                                        daemon=True)
        self._reaper.start()

    kind = "http"

    def _reap(self) -> None:
        while not self._stopping.wait(0.25):
            self.limiter.expire()

    def is_serving(self) -> bool:
        """True while the serving thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._stopping.set()
        self.limiter.close()
        if self._thread is not None:
            self.shutdown()  # type: ignore[attr-defined]
            self._thread.join(5)
        self.server_close()  # type: ignore[attr-defined]


class AgentHTTPServer(_ServerBase, HTTPServer):
    """The TCP endpoint, optionally TLS (per connection) and basic auth."""

    def __init__(self, address: str, registry: CollectorRegistry, status: StatusSource,
                 health: HealthSource, web: WebConfig | TLSConfig | None = None,
                 max_connections: int = 64, request_timeout_seconds: float = 10.0) -> None:
        if isinstance(web, TLSConfig):
            web = web_from_agent_tls(web)
        self.listen_address = address
        try:
            self._init_common(registry, status, health, web or WebConfig(), max_connections,
                              request_timeout_seconds)
        except ConfigError as exc:
            raise ListenError(str(exc)) from None
        host, port = parse_listen_address(address)
        family, bind_host = _family_for(host)
        self.address_family = family
        try:
            HTTPServer.__init__(self, (bind_host, port), _Handler)
        except OSError as exc:
            raise ListenError(_listen_error(address, exc)) from None

    def server_bind(self) -> None:
        """For ':PORT' listen on IPv6 and IPv4 both (dual-stack), like Go exporters do."""
        if self.address_family == socket.AF_INET6:
            try:
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            except OSError:
                pass
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, Any]:
        """Wrap each accepted connection in TLS lazily: the handshake runs in its own thread."""
        sock, addr = self.socket.accept()
        context = self.ssl_context
        if context is not None:
            sock = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    @property
    def port(self) -> int:
        """The bound port (useful when listening on port 0)."""
        return self.server_address[1]


class AgentUnixServer(_ServerBase, socketserver.UnixStreamServer):
    """The local endpoint: a unix socket only root can open; its peers see /status in full."""

    kind = "unix"

    def __init__(self, path: str, registry: CollectorRegistry, status: StatusSource,
                 health: HealthSource, max_connections: int = 16,
                 request_timeout_seconds: float = 10.0) -> None:
        self.path = path
        self._init_common(registry, status, health, WebConfig(), max_connections,
                          request_timeout_seconds)
        try:
            prepare_socket_path(path)
            old = os.umask(0o177)   # srw------- from the start: no window where others connect
            try:
                socketserver.UnixStreamServer.__init__(self, path, _Handler)
            finally:
                os.umask(old)
        except OSError as exc:
            raise ListenError(f"cannot listen on unix socket {path}: "
                              f"{exc.strerror or exc}") from None

    def trusted_peer(self, sock: socket.socket) -> bool:
        """Root, or the agent's own user (SO_PEERCRED): the file mode is not the only lock."""
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                    struct.calcsize("3i"))
        except OSError:
            return False
        _, uid, _ = struct.unpack("3i", creds)
        return uid in (0, os.geteuid())

    def server_close(self) -> None:
        """Close and remove the socket file (only if it is still ours)."""
        super().server_close()
        try:
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)
        except OSError:
            pass


def prepare_socket_path(path: str) -> None:
    """Create the socket's directory (0700) and remove a stale socket left by a crash."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o700, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, "it exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)      # nobody answers: left over by a crash
            return
    raise OSError(errno.EADDRINUSE, "another agent is listening on it")


def web_from_agent_tls(tls: TLSConfig) -> WebConfig:
    """agent.toml's [tls] in web-config terms: a client CA means RequireAndVerifyClientCert."""
    if not tls.enabled:
        return WebConfig()
    return WebConfig(tls=WebTLS(tls.cert_file, tls.key_file, tls.client_ca_file,
                                "RequireAndVerifyClientCert" if tls.client_ca_file
                                else "NoClientCert"), source="agent.toml [tls]")


def _family_for(host: str) -> tuple[socket.AddressFamily, str]:
    """Address family and bind host; '' means all interfaces (IPv6 dual-stack when possible)."""
    if host == "":
        return (socket.AF_INET6, "::") if socket.has_ipv6 and _ipv6_usable() \
            else (socket.AF_INET, "0.0.0.0")
    try:
        info = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ListenError(f"cannot listen on {host!r}: {exc.strerror}") from None
    family, _, _, _, sockaddr = info[0]
    return family, sockaddr[0]


def _ipv6_usable() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


def _listen_error(address: str, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return (f"cannot listen on {address}: address already in use (another process owns "
                "the port; pick another with --web.listen-address or listen_address)")
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {address}: not an address of this host"
    if exc.errno == errno.EACCES:
        return f"cannot listen on {address}: permission denied (ports below 1024 need root)"
    return f"cannot listen on {address}: {exc.strerror or exc}"
