"""A real Alertmanager (Debian's binary, unpacked into .tools/ by .ci/setup) and a webhook
receiver, both on loopback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.harness.postgres import free_port
from tests.harness.sandbox import REPO_ROOT

TOOLS = REPO_ROOT / ".tools" / "usr" / "bin"
ALERTMANAGER = TOOLS / "prometheus-alertmanager"
AMTOOL = TOOLS / "amtool"
INHIBIT_RULES = REPO_ROOT / "packaging" / "alertmanager" / "driftwatch-inhibit.yml"


def alertmanager_unavailable_reason() -> str | None:
    """Why an Alertmanager cannot run here, or None."""
    if not ALERTMANAGER.exists():
        return (f"{ALERTMANAGER} missing: run .ci/setup (it unpacks Debian's "
                "prometheus-alertmanager package)")
    if os.geteuid() != 0:
        return "Alertmanager's templates are mounted in a mount namespace: needs root"
    return None


class WebhookReceiver:
    """A loopback HTTP server that keeps every webhook notification it is sent, in order."""

    def __init__(self) -> None:
        self.notifications: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with outer._lock:
                    outer.notifications.append(json.loads(body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def since(self, index: int) -> list[dict[str, Any]]:
        """Notifications received after the first `index` ones."""
        with self._lock:
            return list(self.notifications[index:])

    def mark(self) -> int:
        """The current count, to read what arrives next with since()."""
        with self._lock:
            return len(self.notifications)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def pages(notifications: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(status, alertname, unit) of every alert in the notifications, in arrival order."""
    return [(a["status"], a["labels"]["alertname"], a["labels"].get("unit", ""))
            for n in notifications for a in n["alerts"]]


def config_text(receiver_url: str, group_wait: str = "1s", group_interval: str = "1s",
                repeat_interval: str = "24h") -> str:
    """alertmanager.yml: one route to the webhook, grouped as the README asks, with the
    shipped inhibit rules appended verbatim."""
    head = {
        "route": {"receiver": "hook", "group_by": ["alertname", "instance", "unit"],
                  "group_wait": group_wait, "group_interval": group_interval,
                  "repeat_interval": repeat_interval},
        "receivers": [{"name": "hook", "webhook_configs": [
            {"url": receiver_url, "send_resolved": True}]}],
    }
    # JSON is YAML: the generated part, then the shipped snippet as it is.
    lines = [f"{key}: {json.dumps(value)}" for key, value in head.items()]
    return "\n".join(lines) + "\n" + INHIBIT_RULES.read_text()


class AlertmanagerServer:
    """Alertmanager on loopback, no clustering, its data in a temporary directory."""

    def __init__(self, config: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="driftwatch-am-"))
        self.port = free_port()
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> "AlertmanagerServer":
        """Write the config, start, wait until ready."""
        (self.dir / "alertmanager.yml").write_text(self.config)
        log = open(self.dir / "alertmanager.log", "wb")
        argv = [str(ALERTMANAGER), f"--config.file={self.dir / 'alertmanager.yml'}",
                f"--storage.path={self.dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--cluster.listen-address="]
        # Debian's build reads its default templates from /usr/share/prometheus/alertmanager
        # only: give it the unpacked ones through a read-only overlay of /usr/share in a mount
        # namespace of its own (the machine's /usr/share is untouched). unshare and sh exec,
        # so the PID is Alertmanager's.
        share = TOOLS.parent / "share"
        script = ('mount -t overlay overlay -o "lowerdir=$1:/usr/share" /usr/share && '
                  'shift && exec "$@"')
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
             str(share), *argv],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"alertmanager did not become ready: {self.log_tail()}")

    def alerts(self) -> list[dict[str, Any]]:
        """What Alertmanager holds now (with status.inhibitedBy)."""
        with urllib.request.urlopen(f"{self.url}/api/v2/alerts", timeout=5) as resp:
            return json.load(resp)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join((self.dir / "alertmanager.log").read_text().splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        """Stop our own Alertmanager by PID and remove its files."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)
