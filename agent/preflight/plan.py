"""The preflight plan of one unit: offline SQL + rules + live database -> risk per revision."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from agent.dburl import ArgumentError, make_url

from agent.context import AppContext
from agent.preflight.analysis import Analysis
from agent.preflight.live import LiveState, Session, TableSize, read_live, user_reader
from agent.preflight.locks import sql_name
from agent.preflight.parse import analyze_all
from agent.preflight.probe import OfflineResult, run_offline
from agent.preflight.risk import (
    LEVELS,
    RevisionRisk,
    across_revisions,
    assess,
    describe_size,
    no_rewrite,
    worst,
)
from agent.snapshot import UnitSnapshot
from agent.privileged.sources.database import db_label

POSTGRES_ONLY = ("the migration preflight is PostgreSQL-only: a {backend} database gets no "
                 "lock analysis (metadata locks and ALGORITHM=INPLACE/INSTANT are not "
                 "modelled)")
LiveReader = Callable[..., LiveState]
# Names in the SQL come from the app's code: no terminal control characters get through.
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """text with control characters (escape sequences) shown as '?', newlines kept."""
    return _CONTROL.sub("?", text)  # (url, tables, columns=...) -> LiveState


@dataclass(frozen=True)
class Plan:
    """What upgrading one unit now would do to its database, revision by revision."""

    unit: str
    database: str = ""
    current: tuple[str, ...] = ()
    heads: tuple[str, ...] = ()
    revisions: tuple[RevisionRisk, ...] = ()
    tables: tuple[TableSize, ...] = ()
    sessions: tuple[Session, ...] = ()   # lockers on affected tables, then old transactions
    error: str = ""                      # no plan could be made (probe failed, not PG, ...)
    duration: float = 0.0
    transaction_per_migration: bool = False  # else one transaction for the whole upgrade

    @property
    def level(self) -> str:
        """The worst revision's risk ('low' with nothing pending)."""
        return worst([r.level for r in self.revisions])

    def counts(self) -> dict[str, int]:
        """Pending revisions per risk level (every level present)."""
        return {level: sum(1 for r in self.revisions if r.level == level) for level in LEVELS}

    @property
    def critical(self) -> tuple[RevisionRisk, ...]:
        return tuple(r for r in self.revisions if r.level == "critical")

    def as_dict(self) -> dict[str, Any]:
        return {
            "unit": self.unit, "database": self.database, "current": list(self.current),
            "heads": list(self.heads), "risk": self.level if self.revisions else "",
            "transaction_per_migration": self.transaction_per_migration,
            "counts": self.counts(), "error": self.error,
            "revisions": [r.as_dict() for r in self.revisions],
            "tables": [{"table": t.name, "exists": t.exists, "rows": t.rows,
                        "total_bytes": t.total_bytes} for t in self.tables],
            "sessions": [{"pid": s.pid, "kind": s.kind, "table": s.table,
                          "mode": s.mode, "granted": s.granted, "state": s.state,
                          "transaction_seconds": s.transaction_seconds,
                          "application": s.application} for s in self.sessions],
            "duration_seconds": self.duration,
        }


STALE_CODE_FINDINGS = ("code_newer_than_process", "cwd_stale", "venv_mismatch")


def stale_workers(findings: Iterable[Any]) -> bool:
    """True when the running workers do not run the code on disk (the probe's models)."""
    return any(getattr(f, "check", "") in STALE_CODE_FINDINGS for f in findings)


def backend_of(url: str) -> str:
    """'postgresql', 'mysql', ... ('' when the URL cannot be read)."""
    try:
        return make_url(url).get_backend_name()
    except (ArgumentError, ValueError):
        return ""


def affected_tables(analyses: Iterable[Any]) -> list[str]:
    """Every existing table a statement locks or a rule names."""
    names: set[str] = set()
    for analysis in analyses:
        for stmt in analysis.statements:
            names.update(lk.table for lk in stmt.locks if lk.table)
        names.update(h.table for h in analysis.hazards if h.table)
    return sorted(names)


def parseable(offline: OfflineResult) -> bool:
    """True when assemble() will parse offline's SQL (PostgreSQL, or a backend not known)."""
    return offline.ok and backend_of(offline.url) in ("", "postgresql")


def parse_revisions(offline: OfflineResult) -> list[Analysis]:
    """Each revision's SQL read by the rules, in the confined parser child (never in root)."""
    return analyze_all([r.sql for r in offline.revisions], offline.user)


def assemble(unit: str, current: tuple[str, ...], heads: tuple[str, ...],
             offline: OfflineResult, reader: LiveReader = read_live,
             stale_workers: bool = False, analyses: Sequence[Analysis] | None = None,
             ) -> Plan:
    """Rules on each revision's SQL, the live database read once, risk per revision.
    stale_workers: the running workers started before the deployed code changed, so their
    models may not be the ones the probe read. analyses: parse_revisions(offline), when the
    caller has them already (memoised)."""
    database = db_label(offline.url) if offline.url else ""
    base = Plan(unit, database, current, heads, duration=offline.duration)
    if not offline.ok:
        return Plan(**{**base.__dict__, "error": offline.error or "the offline probe failed"})
    backend = backend_of(offline.url)
    if backend and backend != "postgresql":
        return Plan(**{**base.__dict__, "error": POSTGRES_ONLY.format(backend=backend)})
    if analyses is None:
        analyses = parse_revisions(offline)
    columns = [(h.table, h.column) for a in analyses for h in a.hazards
               if h.rule == "changing-column-type" and h.column]
    live = reader(offline.url, affected_tables(analyses), columns=columns) if offline.url \
        else LiveState(error="the app has no database URL")
    analyses = [no_rewrite(a, live) for a in analyses]
    names = [r.revision for r in offline.revisions]
    inherited = [[] for _ in analyses] if offline.transaction_per_migration else \
        across_revisions(analyses, names, live)
    risks = tuple(assess(r.revision, a, live, offline.model_tables, doc=r.doc,
                         sql_error=r.error, ops=r.ops, inherited=tuple(extra),
                         stale_workers=stale_workers)
                  for r, a, extra in zip(offline.revisions, analyses, inherited))
    lockers = {s.pid for s in live.lockers}
    sessions = live.lockers + tuple(s for s in live.old_transactions if s.pid not in lockers)
    return Plan(unit, database, current, heads, risks, live.tables, sessions, "",
                offline.duration, offline.transaction_per_migration)


def make_plan(snapshot: UnitSnapshot, ctx: AppContext, timeout: float,
              reader: LiveReader | None = None, allow_root: bool = False,
              probe_user: str = "") -> Plan:
    """The plan for a unit whose inspection found pending revisions (else an empty plan)."""
    started = time.monotonic()
    m = snapshot.migrations
    if m is None:
        return Plan(snapshot.unit, snapshot.database or "",
                    error="the migration state is unknown (see agentctl check)")
    if not m.pending:
        return Plan(snapshot.unit, snapshot.database or "", tuple(m.current), tuple(m.heads))
    offline = run_offline(ctx, list(m.current), list(m.heads), timeout, allow_root)
    reader = reader or user_reader(ctx, probe_user, allow_root)
    plan = assemble(snapshot.unit, tuple(m.current), tuple(m.heads), offline, reader,
                    stale_workers=stale_workers(snapshot.findings))
    return Plan(**{**plan.__dict__, "duration": round(time.monotonic() - started, 3)})


def render_revision(n: int, r: RevisionRisk, verbose: bool = True) -> list[str]:
    """The lines of one revision in the text plan."""
    title = f"  {n}. {r.revision}  [{r.level}]" + (f"  {r.doc}" if r.doc and r.doc !=
                                                     r.revision else "")
    lines = [title, f"       why:    {r.reason}"]
    if r.rules:
        lines.append(f"       rules:  {', '.join(r.rules)}")
    if r.safer:
        lines.append(f"       safer:  {r.safer}")
    if not r.sql_available:
        lines.append(f"       sql:    not available offline: {r.sql_error} (the SQL before "
                     "the failure is analysed)")
    if verbose:
        # The offline error is on the sql: line already.
        lines += [f"       also:   [{i.level}] {i.reason}" for i in r.items[1:]
                  if i.level != "low" and not i.reason.startswith("no offline SQL")]
        for stmt in r.statements:
            locks = ", ".join(f"{sql_name(lk.mode)} on {lk.table}" +
                              (f" ({lk.effect})" if lk.effect != "brief" else "")
                              for lk in stmt.locks) or "no lock on an existing table"
            lines.append(f"       lock:   {locks}  <- {stmt.sql}")
    return lines


def render(plan: Plan, verbose: bool = True) -> str:
    """The text plan agentctl plan and agentctl upgrade show."""
    where = f" ({plan.database})" if plan.database else ""
    if plan.error:
        return printable(f"Migration preflight for {plan.unit}{where}: {plan.error}") + "\n"
    if not plan.revisions:
        return f"Migration preflight for {plan.unit}{where}: nothing pending.\n"
    current = ", ".join(plan.current) or "(empty)"
    scope = "a transaction per revision" if plan.transaction_per_migration else \
        "one transaction for all of them: no transaction_per_migration"
    lines = [f"Migration preflight for {plan.unit}{where}: at {current}, head "
             f"{', '.join(plan.heads)}, {len(plan.revisions)} pending, each rendered offline "
             f"and weighed against the live database ({scope}):"]
    for n, r in enumerate(plan.revisions, 1):
        lines += render_revision(n, r, verbose)
    touched = [t for t in plan.tables if t.exists]
    if touched:
        lines.append("  tables: " + "; ".join(f"{t.name} {describe_size(t)}" for t in touched))
    for s in plan.sessions[:10]:
        on = f" on {s.table}" if s.table else ""
        lines.append(f"  session: {s.describe()}{on}")
    counts = plan.counts()
    lines.append(f"  risk: {plan.level} ({', '.join(f'{counts[k]} {k}' for k in reversed(LEVELS))})")
    return printable("\n".join(lines)) + "\n"
