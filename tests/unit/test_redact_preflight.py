"""The anonymous /status keeps the preflight's levels and revision ids, never its reasons,
and agentctl renders that redacted view (it once crashed with KeyError: 'risk')."""

from __future__ import annotations

from agent.daemon.redact import REDACTED, redact_status
from agent.cli.render import status_rows


def status_with_preflight() -> dict:
    return {"units": [{
        "unit": "app.service", "active_state": "active", "database": "db:5432/app",
        "migrations": {"current": ["r2"], "heads": ["r3"], "pending": ["r3"]},
        "preflight": {"risk": "critical", "counts": {"low": 0, "high": 0, "critical": 1},
                      "error": "", "revisions": [{
                          "revision": "r3", "risk": "critical",
                          "reason": "CREATE INDEX on public.secret_orders (1,000,000 rows)",
                          "rules": ["require-concurrent-index-creation"], "safer": "..."}]},
        "checks": [], "findings": []}]}


def test_redacted_preflight_keeps_levels_and_ids_not_reasons() -> None:
    out = redact_status(status_with_preflight())
    pre = out["units"][0]["preflight"]
    assert pre["risk"] == "critical" and pre["counts"]["critical"] == 1
    assert pre["revisions"] == [{"revision": "r3", "risk": "critical", "reason": REDACTED}]
    assert "secret_orders" not in repr(out)


def test_agentctl_renders_the_redacted_preflight() -> None:
    rows = dict(status_rows(redact_status(status_with_preflight())["units"][0], now=0.0))
    assert rows["preflight"] == f"critical: r3: {REDACTED}"
