"""The preflight inside every inspection: a summary for /status, the metric, and a finding.

The offline SQL only changes with the code or the database's revision, so it is memoised by
the probe's code fingerprint and the current revisions, and so is its parse (a child process);
the live part (sizes, lock holders) is read again on every inspection, since that is what
changes minute by minute.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.context import AppContext
from agent.model import Finding
from agent.preflight.analysis import Analysis
from agent.preflight.live import user_reader
from agent.preflight.parse import settled
from agent.preflight.plan import (
    LiveReader,
    Plan,
    assemble,
    parse_revisions,
    parseable,
    printable,
)
from agent.preflight.probe import OfflineResult, run_offline
from agent.preflight.risk import LEVELS
from agent.snapshot import MigrationState

log = logging.getLogger("driftwatch.preflight")
MAX_SUMMARY_REVISIONS = 20
OfflineRunner = Callable[[AppContext, list[str], list[str], float], OfflineResult]


def summary(plan: Plan) -> dict[str, Any]:
    """The /status form: overall risk, counts per level, one line per revision."""
    return {
        "risk": plan.level if plan.revisions else "",
        "counts": plan.counts(),
        "error": plan.error,
        "revisions": [{"revision": printable(r.revision), "risk": r.level,
                       "reason": printable(r.reason), "rules": list(r.rules), "safer": r.safer}
                      for r in plan.revisions[:MAX_SUMMARY_REVISIONS]],
    }


def finding(unit: str, plan: Plan) -> Finding | None:
    """A warning naming the first critical pending revision (None when there is none)."""
    critical = plan.critical
    if not critical:
        return None
    first = critical[0]
    return Finding("pending_migration_risk", "warning",
                   f"{unit}: {len(critical)} pending revision(s) rated critical by the "
                   f"preflight; {first.revision}: {first.reason}",
                   f"agentctl plan {unit} (safer: {first.safer or 'see the plan'})")


@dataclass
class _Memo:
    key: tuple[str, tuple[str, ...], tuple[str, ...]]
    offline: OfflineResult
    analyses: list[Analysis] | None = None  # parsed once per SQL (the parser is a child)


class PreflightWatch:
    """Per unit: the memoised offline SQL, re-weighed against the live database each time."""

    def __init__(self, timeout: float, offline: OfflineRunner = run_offline,
                 reader: LiveReader | None = None, probe_user: str = "") -> None:
        # reader None: the live database through the session held as the unit's user.
        self.timeout, self.offline, self.reader = timeout, offline, reader
        self.probe_user = probe_user
        self._memo: dict[str, _Memo] = {}
        self.offline_runs = 0
        self.parser_runs = 0

    def check(self, unit: str, ctx: AppContext, migrations: MigrationState | None,
              code_key: str, stale: bool = False,
              ) -> tuple[dict[str, Any] | None, Finding | None]:
        """(summary, finding) for a unit; never raises."""
        if migrations is None or migrations.in_progress:
            return None, None
        if not migrations.pending:
            self._memo.pop(unit, None)
            return {"risk": "", "counts": {level: 0 for level in LEVELS}, "error": "",
                    "revisions": []}, None
        key = (code_key, tuple(migrations.current), tuple(migrations.heads))
        try:
            memo = self._memo.get(unit)
            if memo is None or memo.key != key or not code_key:
                result = self.offline(ctx, list(migrations.current), list(migrations.heads),
                                      self.timeout)
                self.offline_runs += 1
                memo = _Memo(key, result)
                if result.ok:
                    self._memo[unit] = memo
            analyses = memo.analyses
            if analyses is None and parseable(memo.offline):
                analyses = parse_revisions(memo.offline)
                self.parser_runs += 1
                # A timeout may be the host's load, not the SQL: parsed again next time.
                if settled(analyses):
                    memo.analyses = analyses
            reader = self.reader or user_reader(ctx, self.probe_user)
            plan = assemble(unit, key[1], key[2], memo.offline, reader,
                            stale_workers=stale, analyses=analyses)
        except Exception as exc:  # the preflight must never cost the rest of the inspection
            log.exception("preflight of %s failed", unit)
            return {"risk": "", "counts": {}, "error": f"preflight failed: {exc}",
                    "revisions": []}, None
        return summary(plan), finding(unit, plan)

    def invalidate(self, unit: str | None = None) -> None:
        """Forget the memoised SQL (of one unit, or all)."""
        if unit is None:
            self._memo.clear()
        else:
            self._memo.pop(unit, None)
