"""promtool on the live exposition and on the alert rules (and their unit tests)."""

from __future__ import annotations

import http.client
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import Config
from agent.daemon.main import Daemon
from tests.conftest import skip_or_fail
from tests.integration.test_server import FakeInspect

ROOT = Path(__file__).resolve().parents[2]
PROMTOOL = ROOT / ".tools/usr/bin/promtool"
RULES = ROOT / "packaging/prometheus/driftwatch-alerts.yml"
RULE_TESTS = ROOT / "packaging/prometheus/driftwatch-alerts.test.yml"
AMTOOL = ROOT / ".tools/usr/bin/amtool"
INHIBIT = ROOT / "packaging/alertmanager/driftwatch-inhibit.yml"
AM_EXAMPLE = ROOT / "packaging/alertmanager/alertmanager.example.yml"
README = ROOT / "README.md"


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
    from agent.daemon.metrics import ALL_SPECS
    names = {s.full_name for s in ALL_SPECS} | {"up"}
    for block in blocks:
        name = block.split()[0]
        assert re.search(r"severity:\s*(critical|warning|info)", block), name
        assert "summary:" in block and "description:" in block, name
        assert re.search(r"\bfor:\s*\d+m", block), name
        used = set(re.findall(r"\b(driftwatch_[a-z_]+|up)\b(?=[{\[ )]|$)", block))
        assert used and used <= names, (name, used - names)


def test_every_alert_has_a_runbook_anchor_in_the_readme() -> None:
    anchors = set(re.findall(r'<a id="([\w-]+)"></a>', README.read_text()))
    urls = re.findall(r"runbook_url:\s*(\S+)", RULES.read_text())
    assert len(urls) == len(alert_names(RULES.read_text()))
    missing = {u.split("#", 1)[1] for u in urls} - anchors
    assert missing == set(), f"runbook anchors missing in README.md: {missing}"


def test_rule_tests_use_the_label_values_the_agent_exports() -> None:
    """Every series in the promtool tests: a real metric, its real labels, real values."""
    from agent.daemon.metrics import ALL_SPECS, LABEL_VALUES
    specs = {s.full_name: s for s in ALL_SPECS}
    series = re.findall(r'series:\s*"?([a-z_]+)\{(.*?)\}"?\s*$',
                        RULE_TESTS.read_text(), re.MULTILINE)
    assert len(series) > 40
    for name, labels in series:
        pairs = dict(re.findall(r'(\w+)=\\?"([^"\\]*)\\?"', labels))
        if name == "up":
            continue
        assert name in specs, name
        spec = specs[name]
        assert set(pairs) - {"job", "instance"} == set(spec.labels), (name, pairs)
        for label, allowed in LABEL_VALUES.get(spec, {}).items():
            assert pairs[label] in allowed, (name, label, pairs[label], allowed)
    # ...and the rules themselves only match values the agent exports.
    for label, values in re.findall(r'(kind|check|severity)=~?"([^"]+)"', RULES.read_text()):
        exported = {v for spec in LABEL_VALUES.values() for v in spec.get(label, ())}
        assert set(values.split("|")) <= exported, (label, values)


def test_configure_renders_the_shipped_rules_and_only_their_config() -> None:
    import importlib.util
    spec = importlib.util.spec_from_file_location("configure", RULES.with_name("configure.py"))
    assert spec and spec.loader
    configure = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(configure)
    text = RULES.read_text()
    assert configure.render(text) == text  # the shipped file is the defaults' rendering
    other = configure.render(text, {"selector": 'job="apps"', "hold": "2h",
                                    "runbook": "https://wiki.example/dw.md"}, {"*": "1m"})
    assert 'job="driftwatch"' not in other and "[1h]" not in other
    assert other.count("for: 1m") == len(alert_names(text))
    assert "https://wiki.example/dw.md#finding-pending_migrations" in other
    # Only the values changed: every expression keeps its shape.
    def shape(t: str) -> list[str]:
        return re.findall(r"expr:[^\n]*(?:\n {10}[^\n]*)*", t)
    strip = re.compile(r'job="\w+"|\[\w+\]')
    assert [strip.sub("", e) for e in shape(other)] == [strip.sub("", e) for e in shape(text)]
    with pytest.raises(configure.ConfigError, match="hold"):
        configure.render(text, {"hold": "soon"})
    with pytest.raises(configure.ConfigError, match="selector"):
        configure.render(text, {"selector": 'job="a"} or vector(1) #'})


def test_amtool_accepts_the_shipped_alertmanager_config() -> None:
    if not AMTOOL.is_file():
        skip_or_fail(f"{AMTOOL} missing (run .ci/setup)")
    proc = run([str(AMTOOL), "check-config", str(AM_EXAMPLE)])
    assert proc.returncode == 0 and "SUCCESS" in proc.stdout, proc.stdout + proc.stderr
    assert "4 inhibit rules" in proc.stdout
    # The example carries the snippet verbatim, and the snippet names only real alerts.
    snippet = INHIBIT.read_text().split("inhibit_rules:", 1)[1]
    assert AM_EXAMPLE.read_text().rstrip().endswith(snippet.rstrip())
    named = set(re.findall(r"Driftwatch[A-Za-z]+", snippet))
    assert named and named <= alert_names(RULES.read_text()), named - alert_names(RULES.read_text())
