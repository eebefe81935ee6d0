"""Pure: the /status summary an anonymous client gets: states and counts, no free text
(exception texts, query texts, journal lines, paths stay with authenticated clients)."""

from __future__ import annotations

from typing import Any

REDACTED = "(detail for authenticated clients only)"
# Free text that is safe: the same values /metrics exposes as labels, or fixed vocabularies.
_UNIT_TEXT = {"unit", "active_state", "database"}
_MIGRATION_TEXT = {"current", "heads", "pending", "unknown"}
_RISK_LEVELS = ("low", "high", "critical")


def _numbers(value: Any) -> Any:
    """Keep numbers, booleans and None (also inside lists and dicts); drop every string."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, dict):
        return {k: v for k, v in ((k, _numbers(v)) for k, v in value.items() if
                                  isinstance(k, str)) if v is not _DROP}
    if isinstance(value, (list, tuple)):
        kept = [_numbers(v) for v in value]
        return [v for v in kept if v is not _DROP]
    return _DROP


_DROP = object()


def _preflight(p: dict[str, Any]) -> dict[str, Any]:
    """The preflight summary: risk levels and counts, revision ids as /metrics shows them;
    the reasons (table names, SQL) stay with authenticated clients."""
    level = str(p.get("risk", ""))
    return {"risk": level if level in _RISK_LEVELS else "",
            "counts": _numbers(p.get("counts") or {}),
            "error": REDACTED if p.get("error") else "",
            "revisions": [{"revision": str(r.get("revision", "")),
                           "risk": str(r.get("risk", "")) if r.get("risk") in _RISK_LEVELS
                           else "", "reason": REDACTED}
                          for r in p.get("revisions") or () if isinstance(r, dict)]}


def _unit(u: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in u.items():
        if key in _UNIT_TEXT and isinstance(value, str):
            out[key] = value
        elif key == "migrations" and isinstance(value, dict):
            out[key] = {k: ([str(r) for r in v] if k in _MIGRATION_TEXT else _numbers(v))
                        for k, v in value.items()
                        if (k in _MIGRATION_TEXT and isinstance(v, (list, tuple)))
                        or (k not in _MIGRATION_TEXT and _numbers(v) is not _DROP)}
        elif key == "schema_drift" and isinstance(value, (list, tuple)):
            out[key] = [{"kind": str(i.get("kind", "")), "table": "", "name": "", "detail": ""}
                        for i in value if isinstance(i, dict)]
        elif key == "journal_schema_errors" and isinstance(value, dict):
            out[key] = {str(k): v for k, v in value.items() if isinstance(v, (int, float))}
        elif key == "preflight" and isinstance(value, dict):
            out[key] = _preflight(value)
        elif key == "checks" and isinstance(value, (list, tuple)):
            out[key] = [{"name": str(c.get("name", "")), "success": bool(c.get("success")),
                         "duration_seconds": c.get("duration_seconds", 0.0),
                         "error": REDACTED if c.get("error") else ""} for c in value]
        elif key == "findings" and isinstance(value, (list, tuple)):
            out[key] = [{"check": str(f.get("check", "")), "severity": str(f.get("severity", "")),
                         "message": REDACTED, "remedy": ""}
                        for f in value]
        elif isinstance(value, str):
            out[key] = REDACTED if value else ""     # a path or a text: say it is withheld
        else:
            kept = _numbers(value)
            if kept is not _DROP:
                out[key] = kept
    return out


def redact_status(data: dict[str, Any]) -> dict[str, Any]:
    """The anonymous view of a /status body: same shape, free text replaced or dropped."""
    out: dict[str, Any] = {"redacted": True}
    for key, value in data.items():
        if key == "units" and isinstance(value, (list, tuple)):
            out[key] = [_unit(u) for u in value if isinstance(u, dict)]
        elif key == "errors" and isinstance(value, (list, tuple)):
            out[key] = [REDACTED for _ in value]
        elif key == "error" and isinstance(value, str):
            # The few fixed reasons the daemon gives ("not watched", "no inspection yet").
            out[key] = value if not any(c in value for c in "/:") else REDACTED
        elif key == "agent" and isinstance(value, dict):
            agent = {k: v for k, v in value.items() if k == "version" and isinstance(v, str)}
            agent.update({k: v for k, v in _numbers(value).items()})
            if value.get("last_error"):
                agent["last_error"] = REDACTED
            out[key] = agent
        else:
            kept = _numbers(value)
            if kept is not _DROP:
                out[key] = kept
    return out
