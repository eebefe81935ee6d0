"""packaging/grafana/driftwatch.json: importable, every query on real metric names, valid PromQL.

Validity is checked by promtool itself: every expression (template variables replaced by
literal values) becomes a recording rule in a temporary rules file for `promtool check rules`.
Then a real Prometheus scrapes a real agent and every expression must return series.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import Config
from agent.daemon.main import Daemon
from agent.daemon.metrics import ALL_SPECS
from tests.conftest import skip_or_fail
from tests.harness.prometheus import PrometheusServer, prometheus_unavailable_reason
from tests.integration.test_server import FakeInspect

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "packaging/grafana/driftwatch.json"
PROMTOOL = ROOT / ".tools/usr/bin/promtool"
DS_VARIABLE = "DS_PROMETHEUS"
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}

SPECS = {spec.full_name: spec for spec in ALL_SPECS}
KNOWN_METRICS = {*SPECS, "up"}

# What Grafana substitutes before a query reaches Prometheus, as literal values.
SUBSTITUTIONS = {
    "instance": "app1.example:9410",
    "unit": "gunicorn.service",
    "__rate_interval": "1m",
    "__interval": "30s",
    "__range": "6h",
}
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")

# PromQL words that look like identifiers but are not metric names.
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
             "or", "unless", "offset", "inf", "nan", "atan2"}
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_IDENTIFIER = re.compile(r"(?<![\w:.])([A-Za-z_:][\w:]*)(\s*\()?")
_SELECTOR = re.compile(r"(?<![\w:])([A-Za-z_:][\w:]*)\s*(\{[^}]*\})?")
_RATE_ARG = re.compile(r"\b(?:rate|irate|increase)\s*\(\s*([A-Za-z_:][\w:]*)")
_LABEL_VALUES = re.compile(r"^label_values\((?:(?P<selector>.+),\s*)?(?P<label>\w+)\)$")


def load() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside collapsed rows."""
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def query_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in all_panels(dashboard["panels"]) if p.get("type") != "row"]


def expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expr) for every panel target and every template variable query selector."""
    found = []
    for panel in query_panels(dashboard):
        for target in panel.get("targets", []):
            found.append((f"panel {panel['title']!r} target {target.get('refId')}",
                          target["expr"]))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = _LABEL_VALUES.match(variable["definition"])
        assert match, f"variable {variable['name']}: not label_values(...): " \
                      f"{variable['definition']}"
        found.append((f"variable ${variable['name']}", match["selector"]))
    return found


def substitute(expr: str, **values: str) -> str:
    """The expression as Grafana would send it, with literal values for the variables."""
    values = {**SUBSTITUTIONS, **values}

    def value(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        assert name in values, f"unknown template variable ${name} in {expr}"
        return values[name]
    return _VARIABLE.sub(value, expr)


def metric_names(expr: str) -> set[str]:
    """Metric names used by a PromQL expression (identifiers that are not functions,
    keywords, label names or durations)."""
    text = _STRINGS.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)       # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)      # range and subquery durations
    text = _LABEL_LISTS.sub("", text)           # by (...), on (...), group_left (...)
    names = set()
    for m in _IDENTIFIER.finditer(text):
        name, call = m.group(1), m.group(2)
        if call or name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names


# -- the file --------------------------------------------------------------------------------

def test_json_parses_and_is_importable() -> None:
    dashboard = load()
    assert dashboard["title"] and dashboard["uid"] == "driftwatch"
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard.get("id") is None          # importable into any Grafana
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables[DS_VARIABLE]["type"] == "datasource"
    assert variables[DS_VARIABLE]["query"] == "prometheus"
    for name in ("instance", "unit"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"] == DATASOURCE
        assert variables[name]["definition"].startswith("label_values(")
        assert variables[name]["query"]["query"] == variables[name]["definition"]


def test_every_panel_has_title_datasource_and_fits_the_grid() -> None:
    dashboard = load()
    ids = [p["id"] for p in all_panels(dashboard["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in all_panels(dashboard["panels"]):
        assert panel.get("title", "").strip(), f"panel {panel.get('id')} has no title"
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
    panels = query_panels(dashboard)
    assert len(panels) >= 10
    for panel in panels:
        assert panel.get("datasource") == DATASOURCE, f"{panel['title']}: datasource"
        assert panel.get("targets"), f"{panel['title']}: no queries"
        for target in panel["targets"]:
            assert target.get("datasource") == DATASOURCE, f"{panel['title']}: target datasource"
            assert target.get("expr", "").strip(), f"{panel['title']}: empty query"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), f"{panel['title']}: duplicate refId"


def test_the_panels_an_admin_needs_are_there() -> None:
    used = set()
    for _, expr in expressions(load()):
        used |= metric_names(expr)
    for needed in ("driftwatch_pending_revisions", "driftwatch_revision_info",
                   "driftwatch_schema_drift_objects", "driftwatch_app_load_success",
                   "driftwatch_db_up", "driftwatch_check_success", "driftwatch_needs_restart",
                   "driftwatch_venv_mismatch", "driftwatch_environment_stale_variables",
                   "driftwatch_database_mismatch", "driftwatch_journal_schema_errors_total",
                   "driftwatch_inspection_duration_seconds", "driftwatch_inspections_total",
                   "driftwatch_scrape_collection_duration_seconds", "driftwatch_build_info"):
        assert needed in used, f"no panel shows {needed}"


# -- the queries -----------------------------------------------------------------------------

def test_metric_name_extraction() -> None:
    """The extractor itself, so a silently empty result cannot pass the next test."""
    assert metric_names('sum by (unit, kind) (rate(driftwatch_journal_schema_errors_total'
                        '{unit=~"$unit", kind="x"}[$__rate_interval])) > 0') == {
        "driftwatch_journal_schema_errors_total"}
    assert metric_names("time() - driftwatch_snapshot_timestamp_seconds offset 5m") == {
        "driftwatch_snapshot_timestamp_seconds"}
    assert metric_names("a / on (unit) group_left (db) b > bool 1 or up") == {"a", "b", "up"}


def test_every_expression_uses_only_existing_metrics() -> None:
    unknown = []
    for where, expr in expressions(load()):
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr}"
        unknown += [f"{where}: {name}" for name in sorted(names - KNOWN_METRICS)]
    assert not unknown, "metrics not defined in agent.daemon.metrics.ALL_SPECS:\n" + "\n".join(unknown)


def test_rates_only_over_counters() -> None:
    for where, expr in expressions(load()):
        for name in _RATE_ARG.findall(expr):
            assert name in SPECS and SPECS[name].counter, f"{where}: rate() over gauge {name}"


def test_every_query_honours_the_template_variables() -> None:
    """A panel that ignores $instance / $unit would show the whole fleet: wrong on-call."""
    for where, expr in expressions(load()):
        if where.startswith("variable $instance"):
            continue  # the variable that defines $instance cannot filter by it
        for name, matchers in _SELECTOR.findall(expr):
            if name not in KNOWN_METRICS:
                continue
            assert 'instance=~"$instance"' in matchers, f"{where}: {name} ignores $instance"
            if name in SPECS and "unit" in SPECS[name].labels and not where.startswith(
                    "variable $unit"):
                assert 'unit=~"$unit"' in matchers, f"{where}: {name} ignores $unit"


@pytest.fixture(scope="module")
def promtool() -> str:
    if not PROMTOOL.is_file():
        skip_or_fail(f"{PROMTOOL} missing (run .ci/setup)")
    return str(PROMTOOL)


def test_every_expression_is_valid_promql(promtool: str, tmp_path: Path) -> None:
    exprs = expressions(load())
    rules = [{"record": f"dashboard:expr_{i}", "expr": substitute(expr)}
             for i, (_, expr) in enumerate(exprs)]
    for rule in rules:
        assert "$" not in rule["expr"], f"unsubstituted variable: {rule['expr']}"
    path = tmp_path / "dashboard-rules.yml"
    # JSON is YAML: no YAML library needed.
    path.write_text(json.dumps({"groups": [{"name": "grafana-dashboard", "rules": rules}]},
                               indent=2))
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                          text=True, timeout=60)
    legend = "\n".join(f"  dashboard:expr_{i} = {where}: {rules[i]['expr']}"
                       for i, (where, _) in enumerate(exprs))
    assert proc.returncode == 0, f"{proc.stdout}{proc.stderr}\nrules:\n{legend}"
    assert f"{len(rules)} rules found" in proc.stdout, proc.stdout


def test_promtool_rejects_a_broken_expression(promtool: str, tmp_path: Path) -> None:
    """The check above can fail: promtool refuses what Grafana would send broken."""
    path = tmp_path / "broken.yml"
    path.write_text(json.dumps({"groups": [{"name": "g", "rules": [
        {"record": "dashboard:broken", "expr": substitute(
            'sum by (unit) (rate(driftwatch_inspections_total{instance=~"$instance"}))')}]}]}))
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0, proc.stdout


def test_every_query_shows_data_from_a_real_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    """A real Prometheus scrapes a real agent; every query (as Grafana sends it for one
    instance and one unit) returns series: no panel of the dashboard stays empty."""
    reason = prometheus_unavailable_reason()
    if reason:
        skip_or_fail(reason)
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    daemon = Daemon(Config(listen_address="127.0.0.1:0"), lambda cfg: FakeInspect(),
                    watcher_factory=None)
    daemon.start()
    prom = None
    try:
        target = f"127.0.0.1:{daemon.server.port}"
        prom = PrometheusServer([target]).start()
        # rate() needs two samples inside its window: wait for two scrapes.
        prom.wait_for(lambda: prom.api("query", query="count_over_time(up[1m]) >= 2")["result"],
                      timeout=30, what="two scrapes of the agent")
        empty = []
        for where, expr in expressions(load()):
            query = substitute(expr, instance=target, unit="app.service")
            if not prom.api("query", query=query)["result"]:
                empty.append(f"{where}: {query}")
        assert not empty, "queries without data:\n" + "\n".join(empty)
    finally:
        if prom is not None:
            prom.stop()
        daemon.shutdown()
