"""agentctl status's client side: where the daemon listens, and fetching its /status."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from agent.config import parse_listen_address

# Any-address listeners are reached over loopback; the client never leaves the host.
ANY_TO_LOOPBACK = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


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
        detail = _error_text(exc.read())
        if exc.code == 503:
            return AgentReply(False, address, reason=f"the agent on {address} has no "
                                                     f"inspection yet ({detail})")
        if exc.code == 404:
            return AgentReply(False, address, reason=f"the agent on {address} does not "
                                                     f"watch {unit}")
        return AgentReply(False, address, reason=f"the agent on {address} answered HTTP "
                                                 f"{exc.code} ({detail})")
    except (urllib.error.URLError, OSError) as exc:
        why = getattr(exc, "reason", exc)
        return AgentReply(False, address, reason=f"no agent answers on {address} ({why})")
    try:
        data = json.loads(body)
        if not isinstance(data, dict) or not isinstance(data.get("units"), list):
            raise ValueError("no 'units' list")
    except ValueError as exc:
        return AgentReply(False, address, reason=f"{address} did not answer like a driftwatch "
                                                 f"agent ({exc})")
    return AgentReply(True, address, data=data)


def _error_text(body: bytes) -> str:
    try:
        return str(json.loads(body).get("error", "")) or "no detail"
    except (ValueError, AttributeError):
        return body.decode("utf-8", "replace").strip()[:200] or "no detail"
