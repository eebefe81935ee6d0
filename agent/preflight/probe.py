"""Agent side of the offline-SQL probe: each pending revision's SQL, rendered as the unit's user.

The probe child (agent/asuser/probe_child.py) runs with agent/asuser/offline_sql.py's text in front of
its own, in the app's interpreter and context, exactly as the inspection probe does; the
request says ``mode: offline_sql`` and which revisions the database is at. Nothing here
parses SQL: the text comes back and is read by rules.py, in the confined child of parse.py.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from agent.context import AppContext
from agent.privileged.probe_runner import (
    CHILD_SOURCE_PATH,
    PROTOCOL,
    ProbeRequest,
    ProbeResult,
    _run_child,
    child_request,
    parse_report,
    scrub,
    secret_values,
)

OFFLINE_SOURCE_PATH = Path(__file__).resolve().parent.parent / "asuser" / "offline_sql.py"
# The child's report is hostile input: bounds on what is kept (and later parsed, unprivileged).
MAX_TEXT = 200_000            # SQL per revision
MAX_TOTAL_TEXT = 2_000_000    # SQL over all revisions
MAX_REVISIONS = 200
MAX_MODEL_TABLES, MAX_MODEL_COLUMNS = 5000, 1000


@dataclass(frozen=True)
class OfflineRevision:
    """One pending revision as Alembic's offline mode renders it (or why it could not)."""

    revision: str
    down_revision: str = ""
    doc: str = ""
    sql: str = ""
    error: str = ""                 # offline SQL could not be produced (e.g. op.get_bind())
    ops: tuple[str, ...] = ()       # op.* calls read from the file when SQL is missing


@dataclass(frozen=True)
class OfflineResult:
    """What the offline probe found: per revision SQL, and the tables the models map."""

    ok: bool
    error: str = ""
    revisions: tuple[OfflineRevision, ...] = ()
    model_tables: dict[str, tuple[str, ...]] = field(default_factory=dict)
    duration: float = 0.0
    urls: dict[str, str] = field(default_factory=dict)  # the app's URLs: never shown
    # False (Alembic's default): `upgrade` runs every pending revision in ONE transaction,
    # so a lock taken by one revision lasts through all later ones.
    transaction_per_migration: bool = False
    user: str = ""  # the unit's User= the SQL was rendered as: the parser child runs as it

    @property
    def url(self) -> str:
        """The default bind's URL (else the first one), '' when none."""
        return self.urls.get("default") or next(iter(self.urls.values()), "")


def probe_source() -> str:
    """offline_sql.py, then probe_child.py: one source; probe_child.py's main() runs last and dispatches."""
    return OFFLINE_SOURCE_PATH.read_text() + "\n\n" + CHILD_SOURCE_PATH.read_text()


def offline_request(ctx: AppContext, current: list[str], heads: list[str],
                    allow_root: bool = False) -> dict[str, Any]:
    """The child request: the usual context, mode offline_sql, the range to render."""
    request = ProbeRequest(compare_schema=False, include_revisions=False,
                           allow_root=allow_root)
    return {**child_request(ctx, request), "mode": "offline_sql",
            "current": list(current), "heads": list(heads)}


def parse_offline(raw: bytes, secrets: list[str]) -> OfflineResult | None:
    """The child's JSON -> OfflineResult (None when it is not a usable offline report)."""
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("protocol") != PROTOCOL:
        return None
    urls = doc.get("urls") if isinstance(doc.get("urls"), dict) else {}
    urls = {str(k): str(v) for k, v in urls.items()}
    # Passwords inside the app's URLs are masked in everything, SQL and errors included.
    secrets = sorted(set(secrets) | set(secret_values({}, urls.values())), key=len,
                     reverse=True)
    revisions, budget = [], MAX_TOTAL_TEXT
    entries = doc.get("offline") if isinstance(doc.get("offline"), list) else []
    for entry in entries[:MAX_REVISIONS]:
        if not isinstance(entry, dict) or not entry.get("revision"):
            continue
        sql = str(entry.get("sql") or "")[:min(MAX_TEXT, budget)]
        budget -= len(sql)
        ops = entry.get("ops") if isinstance(entry.get("ops"), list) else []
        revisions.append(OfflineRevision(
            revision=str(entry["revision"])[:64],
            down_revision=str(entry.get("down_revision") or "")[:64],
            doc=scrub(str(entry.get("doc") or ""), secrets)[:200],
            sql=scrub(sql, secrets),
            error=scrub(str(entry.get("error") or ""), secrets)[:500],
            ops=tuple(str(o)[:64] for o in ops[:100])))
    tables = doc.get("model_tables") if isinstance(doc.get("model_tables"), dict) else {}
    model_tables = {str(k)[:200]: tuple(str(c)[:200] for c in v[:MAX_MODEL_COLUMNS])
                    for k, v in list(tables.items())[:MAX_MODEL_TABLES] if isinstance(v, list)}
    error = scrub(str(doc.get("error") or ""), secrets)
    return OfflineResult(ok=not error, error=error, revisions=tuple(revisions),
                         model_tables=model_tables, urls=urls,
                         transaction_per_migration=doc.get("transaction_per_migration") is True)


def run_offline(ctx: AppContext, current: list[str], heads: list[str], timeout: float,
                allow_root: bool = False) -> OfflineResult:
    """Render every pending revision's SQL in the unit's context as its user."""
    started = time.monotonic()
    secrets = secret_values(ctx.environment)
    request = ProbeRequest(compare_schema=False, include_revisions=False,
                           allow_root=allow_root)
    ran = _run_child(ctx, request, offline_request(ctx, current, heads, allow_root), timeout,
                     secrets, source_text=probe_source())
    if isinstance(ran, ProbeResult):
        return OfflineResult(ok=False, error=ran.error, duration=ran.duration)
    raw, returncode, tail, timed_out = ran
    duration = round(time.monotonic() - started, 3)
    parsed = None if timed_out else parse_offline(raw, secrets)
    if parsed is None:
        failed = parse_report(raw, returncode, tail, timed_out=timed_out, timeout=timeout,
                              duration=duration, secrets=secrets)
        return OfflineResult(ok=False, error=failed.error or "the probe's report is not usable",
                             duration=duration)
    return replace(parsed, duration=duration, user=ctx.user)
