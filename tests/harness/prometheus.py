"""A real Prometheus (Debian's binary, unpacked into .tools/ by .ci/setup) on loopback."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tests.harness.postgres import free_port
from tests.harness.sandbox import REPO_ROOT

TOOLS = REPO_ROOT / ".tools" / "usr" / "bin"
PROMETHEUS = TOOLS / "prometheus"
PROMTOOL = TOOLS / "promtool"
RULES = REPO_ROOT / "packaging" / "prometheus" / "driftwatch-alerts.yml"


def prometheus_unavailable_reason() -> str | None:
    """Why a Prometheus cannot run here, or None."""
    if not PROMETHEUS.exists():
        return f"{PROMETHEUS} missing: run .ci/setup (it unpacks Debian's prometheus package)"
    return None


def rules_configure() -> Any:
    """packaging/prometheus/configure.py, the shipped rules' _config renderer, as a module."""
    spec = importlib.util.spec_from_file_location("driftwatch_rules_configure",
                                                  RULES.with_name("configure.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fast_rules(text: str, hold: str = "0s", **config: str) -> str:
    """The shipped rules with every `for:` shortened (and _config values changed), rendered by
    the shipped renderer: same expressions, so a test sees alerts fire in seconds."""
    return rules_configure().render(text, config, {"*": hold})


class PrometheusServer:
    """Prometheus scraping given targets every second and evaluating the driftwatch rules."""

    def __init__(self, targets: list[str], job: str = "driftwatch", rules: str | None = None,
                 alertmanager: str | None = None,
                 scrape_options: dict[str, Any] | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="driftwatch-prom-"))
        self.port = free_port()
        self.targets, self.job = targets, job
        self.rules = rules if rules is not None else fast_rules(RULES.read_text())
        self.alertmanager = alertmanager
        # Extra scrape_config keys, e.g. scheme/tls_config/basic_auth for an HTTPS target.
        self.scrape_options = scrape_options or {}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> "PrometheusServer":
        """Write config, rules, start the server, wait until it is ready."""
        (self.dir / "rules.yml").write_text(self.rules)
        config: dict[str, Any] = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s",
                       "scrape_timeout": "1s"},
            "rule_files": [str(self.dir / "rules.yml")],
            "scrape_configs": [{"job_name": self.job,
                                "static_configs": [{"targets": self.targets}],
                                **self.scrape_options}],
        }
        if self.alertmanager:
            host = self.alertmanager.split("://", 1)[-1]
            config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [host]}]}]}
        (self.dir / "prometheus.yml").write_text(json.dumps(config))
        log = open(self.dir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [str(PROMETHEUS), f"--config.file={self.dir / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
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
        raise RuntimeError(f"prometheus did not become ready: {self.log_tail()}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/PATH and return its data."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=5) as resp:
            body = json.load(resp)
        assert body["status"] == "success", body
        return body["data"]

    def firing(self) -> list[dict[str, Any]]:
        """Alerts currently firing."""
        return [a for a in self.api("alerts")["alerts"] if a["state"] == "firing"]

    def wait_for(self, predicate: Any, timeout: float = 60, what: str = "") -> Any:
        """Poll predicate() until truthy; return its value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for {what}; firing: "
                             f"{[a['labels'] for a in self.firing()]}\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join((self.dir / "prometheus.log").read_text().splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        """Stop our own Prometheus by PID and remove its files."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)
