"""Pure: the database the running workers use (by name, as the server sees them) against the
one the unit's environment names, with both revision states side by side."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from agent.checks.migrations import MigrationState
from agent.model import Finding

MAX_LISTED = 5


@dataclass(frozen=True)
class DatabaseSide:
    """One side of the comparison: a database by name and what its version table says."""

    database: str
    user: str = ""
    state: MigrationState | None = None
    error: str = ""              # why its state could not be read


def describe_state(side: DatabaseSide, table: str = "alembic_version") -> str:
    """'never migrated (no alembic_version table)', 'at r2, 1 pending (r3)', 'at head r3'."""
    s = side.state
    if s is None:
        return f"revision state not readable ({side.error or 'no session'})"
    if not s.version_table_exists:
        return f"never migrated (no {table} table)"
    if not s.current:
        return f"{table} holds no revision"
    if s.unknown:
        return f"at {', '.join(s.unknown)}, a revision the deployed code does not know"
    if s.pending:
        shown = ", ".join(s.pending[:MAX_LISTED]) + (", ..." if len(s.pending) > MAX_LISTED
                                                     else "")
        return f"at {', '.join(s.current)}, {len(s.pending)} pending ({shown})"
    return f"at head {', '.join(s.heads)}"


def badness(side: DatabaseSide) -> int | None:
    """How far from serving the deployed code: 0 at head, N pending, worse when unknown."""
    s = side.state
    if s is None:
        return None
    if not s.version_table_exists or not s.current:
        return 10_000 + len(s.pending or ())
    if s.unknown or s.pending is None:
        return 100_000
    return len(s.pending)


def restart_verdict(now: DatabaseSide, restart: DatabaseSide) -> str:
    """'a restart would make it worse' / 'would fix it' / 'would not help' (or unknown)."""
    a, b = badness(now), badness(restart)
    if a is None or b is None:
        return "what a restart would give is not known"
    if b > a:
        return "a restart would make it worse"
    if b < a:
        return "a restart would fix the schema errors" if b == 0 else \
            "a restart would make it better, not good"
    return "a restart would not help"


def mismatch_findings(unit: str, server: str, now: DatabaseSide, restart: DatabaseSide,
                      connections: int, table: str = "alembic_version",
                      other: Sequence[str] = ()) -> list[Finding]:
    """database_mismatch: workers on `now`, the environment names `restart`, both states."""
    role = f" as role {now.user}" if now.user else ""
    also = f"; also to {', '.join(other)}" if other else ""
    now_text = describe_state(now, table)
    restart_text = describe_state(restart, table)
    message = (
        f"the running workers of {unit} are connected to database {now.database}{role} on "
        f"{server} ({connections} connection(s){also}), not to {restart.database} that the "
        f"unit's environment names. Running now: {now.database} {now_text}"
        + ("; the schema errors in the journal come from there" if badness(now) else "")
        + f". After a restart: {restart.database} {restart_text}: "
        f"{restart_verdict(now, restart)}")
    remedies = []
    if badness(now):
        remedies.append(f"now: bring {now.database} to head (flask db upgrade, or alembic "
                        f"upgrade for a plain Alembic app, with the URL that names "
                        f"{now.database}) so the running workers stop failing")
    else:
        remedies.append(f"now: {now.database} is fine for the running code")
    if badness(restart):
        remedies.append(f"before any restart: if {restart.database} is meant, migrate it "
                        f"first (agentctl upgrade {unit}, which migrates the database the "
                        f"environment names); if not, put {now.database} back in the unit's "
                        f"environment (agentctl env {unit} shows where the URL comes from)")
    else:
        remedies.append(f"then: systemctl restart {unit} to move the workers to "
                        f"{restart.database}")
    return [Finding("database_mismatch", "critical", message, "; ".join(remedies))]
