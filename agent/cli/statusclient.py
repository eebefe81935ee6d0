"""agentctl status's client side: where the daemon listens, and fetching its /status."""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import pwd
import socket
import struct
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from agent.config import parse_listen_address

# Any-address listeners are reached over loopback; the client never leaves the host.
ANY_TO_LOOPBACK = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}
DEFAULT_SOCKET = "/run/driftwatch/agent.sock"
AGENT_USER = "driftwatch"   # a dedicated user the agent may run as, besides root


def client_address(listen_address: str) -> tuple[str, int]:
    """':9410' -> ('127.0.0.1', 9410); '[::]:9410' -> ('::1', 9410); ValueError when invalid."""
    host, port = parse_listen_address(listen_address)
    if port == 0:
        raise ValueError(f"listen address {listen_address!r} has port 0: no fixed port to ask")
    return ANY_TO_LOOPBACK.get(host, host), port


def display_address(host: str, port: int) -> str:
    """'127.0.0.1:9410' or '[::1]:9410'."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def status_url(host: str, port: int, unit: str | None = None) -> str:
    """http://HOST:PORT/status[?unit=UNIT]."""
    url = f"http://{display_address(host, port)}/status"
    return f"{url}?unit={quote(unit, safe='')}" if unit else url


@dataclass(frozen=True)
class AgentReply:
    """What the daemon said: ok with a snapshot body, or why it could not be used."""

    ok: bool
    address: str
    data: dict[str, Any] = field(default_factory=dict)
    reason: str = ""     # set when not ok: "no agent answers on ...", "... has no inspection yet"


def fetch_status(host: str, port: int, unit: str | None = None,
                 timeout: float = 2.0) -> AgentReply:
    """GET /status from the daemon; never raises, a missing or unhappy agent is a reason."""
    address = display_address(host, port)
    request = urllib.request.Request(status_url(host, port, unit),
                                     headers={"Accept": "application/json"})
    # No proxies: an http_proxy in the admin's shell must not catch a loopback request.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as exc:
        return _reply(address, exc.code, exc.read(), unit)
    except (urllib.error.URLError, OSError) as exc:
        why = getattr(exc, "reason", exc)
        return AgentReply(False, address, reason=f"no agent answers on {address} ({why})")
    return _reply(address, 200, body, unit)


def _error_text(body: bytes) -> str:
    try:
        return str(json.loads(body).get("error", "")) or "no detail"
    except (ValueError, AttributeError):
        return body.decode("utf-8", "replace").strip()[:200] or "no detail"


# -- the root-only unix socket --------------------------------------------------------------
def trusted_uids() -> set[int]:
    """Who may be the agent: root, and the dedicated 'driftwatch' user if it exists."""
    uids = {0}
    try:
        uids.add(pwd.getpwnam(AGENT_USER).pw_uid)
    except KeyError:
        pass
    return uids


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process on the other end of a unix socket (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a unix socket whose peer must be root (or the agent's user)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
            uid = peer_uid(sock)
            if uid not in trusted_uids():
                raise PermissionError(f"the process behind it runs as uid {uid}, not as root")
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def fetch_status_unix(path: str, unit: str | None = None, timeout: float = 2.0
                      ) -> tuple[AgentReply | None, str]:
    """GET /status over the unix socket: (reply, "") when an agent answered there, else
    (None, why not) so the caller can fall back to TCP and say so."""
    conn = _UnixHTTPConnection(path, timeout)
    target = f"/status?unit={quote(unit, safe='')}" if unit else "/status"
    try:
        conn.request("GET", target, headers={"Accept": "application/json"})
        resp = conn.getresponse()
        body = resp.read()
    except FileNotFoundError:
        return None, f"no unix socket {path}"
    except PermissionError as exc:
        return None, f"unix socket {path}: {exc.strerror or exc}"
    except (OSError, http.client.HTTPException) as exc:
        return None, f"unix socket {path}: {getattr(exc, 'strerror', None) or exc}"
    finally:
        conn.close()
    return _reply(path, resp.status, body, unit), ""


def _reply(address: str, status: int, body: bytes, unit: str | None) -> AgentReply:
    """An HTTP answer of an agent as an AgentReply."""
    if status != 200:
        detail = _error_text(body)
        if status == 503:
            return AgentReply(False, address, reason=f"the agent on {address} has no "
                                                     f"inspection yet ({detail})")
        if status == 404:
            return AgentReply(False, address, reason=f"the agent on {address} does not "
                                                     f"watch {unit}")
        return AgentReply(False, address, reason=f"the agent on {address} answered HTTP "
                                                 f"{status} ({detail})")
    try:
        data = json.loads(body)
        if not isinstance(data, dict) or not isinstance(data.get("units"), list):
            raise ValueError("no 'units' list")
    except ValueError as exc:
        return AgentReply(False, address, reason=f"{address} did not answer like a driftwatch "
                                                 f"agent ({exc})")
    return AgentReply(True, address, data=data)


# -- who listens on the TCP port ------------------------------------------------------------
def _proc_net_address(hex_addr: str) -> str:
    """/proc/net/tcp{,6} hex (host byte order words) -> an IP address string."""
    raw = bytes.fromhex(hex_addr)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(words))


def listener_uids(host: str, port: int, proc: str = "/proc") -> set[int]:
    """Uids owning a listening TCP socket that would take a connection to HOST:PORT (the exact
    address or a wildcard), from /proc/net/tcp and tcp6, readable by every user."""
    wanted = ipaddress.ip_address(host)
    uids: set[int] = set()
    for name in ("tcp", "tcp6"):
        try:
            with open(os.path.join(proc, "net", name), encoding="ascii") as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 8 or fields[3] != "0A":      # 0A: TCP_LISTEN
                continue
            addr_hex, _, port_hex = fields[1].partition(":")
            if int(port_hex, 16) != port:
                continue
            addr = ipaddress.ip_address(_proc_net_address(addr_hex))
            mapped = getattr(addr, "ipv4_mapped", None)
            if addr == wanted or addr.is_unspecified or mapped == wanted:
                uids.add(int(fields[7]))
    return uids


def untrusted_listener(host: str, port: int, proc: str = "/proc") -> str:
    """Why the process on HOST:PORT cannot be the agent, or '' (trusted, or not known)."""
    try:
        owners = listener_uids(host, port, proc)
    except ValueError:
        return ""
    strangers = sorted(owners - trusted_uids())
    if not strangers:
        return ""
    names = []
    for uid in strangers:
        try:
            names.append(f"uid {uid} ({pwd.getpwuid(uid).pw_name})")
        except KeyError:
            names.append(f"uid {uid}")
    return (f"the process listening on {display_address(host, port)} runs as "
            f"{', '.join(names)}, not as root: not the agent, not asked")
