"""agentctl plan UNIT, and the preflight agentctl upgrade shows before it asks."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TextIO

from agent.errors import DriftwatchError
from agent.privileged.inspection import inspect_unit
from agent.preflight.plan import Plan, make_plan, render
from agent.snapshot import UnitSnapshot
from agent.privileged.sources.systemd import SystemdSource

EXIT_OK, EXIT_RISK, EXIT_ERROR = 0, 1, 2
# Checks without which no plan can be made.
NEEDED_CHECKS = ("unit", "app_load", "database", "migrations")


def plan_unit(snapshot: UnitSnapshot, systemd: SystemdSource, timeout: float) -> Plan:
    """The plan for an inspected unit (its failed checks become the plan's error)."""
    for check in snapshot.checks:
        if check.name in NEEDED_CHECKS and not check.success:
            return Plan(snapshot.unit, snapshot.database or "",
                        error=f"cannot inspect ({check.name}): {check.error}")
    try:
        ctx = inspect_unit(systemd, snapshot.unit).context
    except DriftwatchError as exc:
        return Plan(snapshot.unit, snapshot.database or "", error=str(exc))
    return make_plan(snapshot, ctx, timeout)


def plan_exit_code(plan: Plan) -> int:
    """0 nothing risky (or nothing pending), 1 a high or critical revision, 2 no plan."""
    if plan.error:
        return EXIT_ERROR
    return EXIT_RISK if plan.level in ("high", "critical") and plan.revisions else EXIT_OK


def write_plan(plan: Plan, as_json: bool, out: TextIO) -> int:
    """Print the plan (text or JSON) and return agentctl plan's exit code."""
    if as_json:
        json.dump(plan.as_dict(), out, indent=2)
        out.write("\n")
    else:
        out.write(render(plan))
    return plan_exit_code(plan)


def refusal(plan: Plan, accept_risk: bool) -> str:
    """Why agentctl upgrade must not go on ('' when it may)."""
    critical = plan.critical
    if not critical or accept_risk:
        return ""
    return (f"refusing to upgrade {plan.unit}: {len(critical)} pending revision(s) rated "
            f"critical by the preflight ({', '.join(r.revision for r in critical)}), see "
            "above; fix them (or what they would queue behind), or pass --accept-risk")


Preflight = Callable[[UnitSnapshot], Plan]


def upgrade_preflight(systemd: SystemdSource, timeout: float) -> Preflight:
    """The preflight agentctl upgrade runs on the unit it has just inspected."""
    return lambda snapshot: plan_unit(snapshot, systemd, timeout)
