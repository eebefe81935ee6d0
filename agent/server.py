"""HTTP(S) endpoint: /metrics, /healthz, /status (JSON), a landing page at /; 404 otherwise."""

from __future__ import annotations

import errno
import html
import json
import logging
import re
import socket
import ssl
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.registry import CollectorRegistry

from agent import __version__
from agent.config import TLSConfig, parse_listen_address
from agent.errors import DriftwatchError
from agent.secrets import MASK, is_secret_name, mask_url

log = logging.getLogger(__name__)

StatusSource = Callable[[str | None], tuple[int, dict[str, Any]]]
HealthSource = Callable[[], tuple[bool, str]]


class ListenError(DriftwatchError):
    """The listen address cannot be bound (in use, not local, no permission)."""


# NAME=value in free text (a remedy saying "export PGPASSWORD=..."): masked by NAME.
_ASSIGNMENT = re.compile(r"\b(?P<name>[A-Za-z_][A-Za-z0-9_]*)=(?P<value>[^\s&;,'\"]+)")


def mask_text(text: str) -> str:
    """Mask URL passwords and values of secret-looking NAME=value pairs in free text."""
    text = mask_url(text)
    return _ASSIGNMENT.sub(lambda m: f"{m.group('name')}={MASK}"
                           if is_secret_name(m.group("name")) else m.group(0), text)


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
    """Routes GET requests; the server object carries the sources."""

    server: AgentHTTPServer  # type: ignore[assignment]
    server_version = f"driftwatch/{__version__}"
    protocol_version = "HTTP/1.1"
    timeout = 30   # a stuck client (or TLS handshake) never holds a thread forever

    def setup(self) -> None:
        """Finish the TLS handshake here, in the request thread, under the socket timeout."""
        super().setup()
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.do_handshake()

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        """Dispatch on the path."""
        url = urlsplit(self.path)
        routes = {"/metrics": self._metrics, "/healthz": self._healthz,
                  "/status": self._status, "/": self._landing}
        route = routes.get(url.path)
        if route is None:
            self._send(404, b"not found\n", "text/plain; charset=utf-8")
            return
        try:
            route(parse_qs(url.query))
        except Exception:  # one broken request must never take the server down
            log.exception("error serving %s", url.path)
            self._send(500, b"internal error\n", "text/plain; charset=utf-8")

    def _send(self, code: int, body: bytes, content_type: str,
              extra: list[tuple[str, str]] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in extra or []:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _metrics(self, query: dict[str, list[str]]) -> None:
        encoder, content_type = choose_encoder(self.headers.get("Accept"))
        body = encoder(self.server.registry)
        extra = []
        if gzip_accepted(self.headers.get("Accept-Encoding")):
            import gzip
            body = gzip.compress(body)
            extra.append(("Content-Encoding", "gzip"))
        self._send(200, body, content_type, extra)

    def _healthz(self, query: dict[str, list[str]]) -> None:
        ok, reason = self.server.health()
        self._send(200 if ok else 503, (b"ok\n" if ok else f"unhealthy: {reason}\n".encode()),
                   "text/plain; charset=utf-8")

    def _status(self, query: dict[str, list[str]]) -> None:
        unit = query.get("unit", [None])[0]
        code, data = self.server.status(unit)
        body = json.dumps(mask_strings(data), indent=2, sort_keys=True).encode() + b"\n"
        self._send(code, body, "application/json")

    def _landing(self, query: dict[str, list[str]]) -> None:
        body = LANDING.format(version=html.escape(__version__)).encode()
        self._send(200, body, "text/html; charset=utf-8")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base signature
        """Access log at debug level only: scrapes every 15 s would flood the journal."""
        log.debug("%s %s", self.address_string(), format % args)


class AgentHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer bound to a parsed listen address, optionally TLS per connection."""

    daemon_threads = True
    block_on_close = False
    # socketserver's default backlog of 5 turns a burst of scrapes into 1 s SYN retries.
    request_queue_size = 128

    def __init__(self, address: str, registry: CollectorRegistry, status: StatusSource,
                 health: HealthSource, tls: TLSConfig | None = None) -> None:
        self.registry = registry
        self.status = status
        self.health = health
        self.listen_address = address
        self.ssl_context = make_ssl_context(tls) if tls and tls.enabled else None
        host, port = parse_listen_address(address)
        family, bind_host = _family_for(host)
        self.address_family = family
        try:
            super().__init__((bind_host, port), _Handler)
        except OSError as exc:
            raise ListenError(_listen_error(address, exc)) from None
        self._thread: threading.Thread | None = None

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
        if self.ssl_context is not None:
            sock = self.ssl_context.wrap_socket(sock, server_side=True,
                                                do_handshake_on_connect=False)
        return sock, addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Client errors (reset, TLS handshake refused) are routine: log at debug, not stderr."""
        log.debug("connection from %s failed", client_address, exc_info=True)

    @property
    def port(self) -> int:
        """The bound port (useful when listening on port 0)."""
        return self.server_address[1]

    def start(self) -> None:
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self.serve_forever, name="driftwatch-http",
                                        kwargs={"poll_interval": 0.5}, daemon=True)
        self._thread.start()

    def is_serving(self) -> bool:
        """True while the serving thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join(5)
        self.server_close()


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


def make_ssl_context(tls: TLSConfig) -> ssl.SSLContext:
    """Server TLS context; with client_ca_file a client certificate is required and verified."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file)
        if tls.client_ca_file:
            context.load_verify_locations(cafile=tls.client_ca_file)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ListenError(f"TLS setup failed ({tls.cert_file}, {tls.key_file}"
                          f"{', ' + tls.client_ca_file if tls.client_ca_file else ''}): "
                          f"{exc}") from None
    return context
