"""promtool on the live exposition and on the alert rules (and their unit tests)."""

from __future__ import annotations

import http.client
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import Config
from agent.daemon import Daemon
from tests.conftest import skip_or_fail
from tests.integration.test_server import FakeInspect

ROOT = Path(__file__).resolve().parents[2]
PROMTOOL = ROOT / ".tools/usr/bin/promtool"
RULES = ROOT / "packaging/prometheus/driftwatch-alerts.yml"
RULE_TESTS = ROOT / "packaging/prometheus/driftwatch-alerts.test.yml"


@pytest.fixture(scope="module")
def promtool() -> str:
    if not PROMTOOL.is_file():
        skip_or_fail(f"{PROMTOOL} missing (run .ci/setup)")
    return str(PROMTOOL)


@pytest.fixture
def exposition(monkeypatch: pytest.MonkeyPatch) -> Iterator[bytes]:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    daemon = Daemon(Config(listen_address="127.0.0.1:0"), lambda cfg: FakeInspect(),
                    watcher_factory=None)
    daemon.start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", daemon.server.port, timeout=10)
        conn.request("GET", "/metrics")
        yield conn.getresponse().read()
    finally:
        daemon.shutdown()


def run(argv: list[str], stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, input=stdin.decode() if stdin else None, capture_output=True,
                          text=True, timeout=60)
    return proc


def test_check_metrics_is_clean(promtool: str, exposition: bytes) -> None:
    proc = run([promtool, "check", "metrics"], exposition)
    # promtool prints lint problems (missing HELP, bad units, ...) and exits non-zero.
    assert proc.returncode == 0 and proc.stdout.strip() == "" and proc.stderr.strip() == "", \
        proc.stdout + proc.stderr


def test_check_rules(promtool: str) -> None:
    proc = run([promtool, "check", "rules", str(RULES)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_rule_unit_tests_pass(promtool: str) -> None:
    proc = run([promtool, "test", "rules", str(RULE_TESTS)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def alert_names(text: str) -> set[str]:
    return set(re.findall(r"^\s*-\s*alert:\s*(\S+)\s*$", text, re.MULTILINE))


def test_every_alert_is_tested_firing_and_quiet() -> None:
    alerts = alert_names(RULES.read_text())
    assert len(alerts) >= 17
    tests = RULE_TESTS.read_text()
    tested = set(re.findall(r"^\s*alertname:\s*(\S+)\s*$", tests, re.MULTILINE))
    assert alerts - tested == set(), "alerts without a promtool test"
    # Each alert needs one case expecting nothing (quiet) and one expecting an alert (fires).
    cases = re.findall(r"alertname:\s*(\S+)\s*\n\s*exp_alerts:\s*(\[\])?", tests)
    quiet = {name for name, empty in cases if empty}
    firing = {name for name, empty in cases if not empty}
    assert alerts - quiet == set(), "alerts never tested to stay quiet"
    assert alerts - firing == set(), "alerts never tested to fire"


def test_every_alert_has_severity_summary_description_and_metric_exists() -> None:
    text = RULES.read_text()
    blocks = re.split(r"^\s*-\s*alert:", text, flags=re.MULTILINE)[1:]
    from agent.metrics import ALL_SPECS
    names = {s.full_name for s in ALL_SPECS} | {"up"}
    for block in blocks:
        name = block.split()[0]
        assert re.search(r"severity:\s*(critical|warning|info)", block), name
        assert "summary:" in block and "description:" in block, name
        assert re.search(r"\bfor:\s*\d+m", block), name
        used = set(re.findall(r"\b(driftwatch_[a-z_]+|up)\b(?=[{\[ )]|$)", block))
        assert used and used <= names, (name, used - names)
