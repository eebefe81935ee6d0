"""Pure: Alembic revision state (current vs. heads, pending, branches) -> findings.

Inputs are plain data: the revisions read from the database's version table and the
revision graph read from the app's migration scripts. Schema drift (live schema vs. models)
is a different check: a database can be at head and still drift, or be behind and not.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.checks.commands import alembic_cli, where_to_run
from agent.model import Finding

# How many revision ids a message lists before it says "and N more".
MAX_LISTED = 8


@dataclass(frozen=True)
class Revision:
    """One migration script: its id, its parents, its branch labels."""

    revision: str
    down_revisions: tuple[str, ...] = ()
    branch_labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class MigrationState:
    """Where the database stands in the revision graph, and what is wrong with it."""

    unit: str
    version_table_exists: bool
    current: tuple[str, ...]
    heads: tuple[str, ...]
    # In upgrade order; None when it cannot be known (the database is at an unknown revision).
    pending: tuple[str, ...] | None
    unknown: tuple[str, ...]
    graph_errors: tuple[str, ...] = ()
    findings: tuple[Finding, ...] = field(default_factory=tuple)

    @property
    def pending_count(self) -> int | None:
        """Number of revisions not applied, None when unknowable."""
        return None if self.pending is None else len(self.pending)

    @property
    def at_head(self) -> bool:
        """True when the database is exactly at the code's head(s)."""
        return (self.version_table_exists and not self.unknown and self.pending == ()
                and bool(self.current))

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"unit": self.unit, "version_table_exists": self.version_table_exists,
                "current": list(self.current), "heads": list(self.heads),
                "pending": None if self.pending is None else list(self.pending),
                "pending_count": self.pending_count, "unknown": list(self.unknown),
                "graph_errors": list(self.graph_errors), "at_head": self.at_head,
                "findings": [f.as_dict() for f in self.findings]}


def revisions_from_dicts(items: Iterable[Mapping[str, Any]]) -> list[Revision]:
    """[{revision, down_revisions|down_revision, branch_labels}] -> Revisions (None/str/list ok)."""
    out = []
    for item in items:
        down = item.get("down_revisions", item.get("down_revision"))
        labels = item.get("branch_labels")
        out.append(Revision(str(item["revision"]), _as_tuple(down), _as_tuple(labels)))
    return out


def _as_tuple(value: Any) -> tuple[str, ...]:
    # Alembic writes down_revision as None, "abc" or ("abc", "def").
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)


def heads_of(graph: Sequence[Revision]) -> tuple[str, ...]:
    """Revisions no other revision names as its parent, in script order."""
    parents = {p for rev in graph for p in rev.down_revisions}
    return tuple(rev.revision for rev in graph if rev.revision not in parents)


def ancestry(graph: Sequence[Revision], revisions: Iterable[str]) -> set[str]:
    """The given (known) revisions and every revision below them."""
    by_id = {rev.revision: rev for rev in graph}
    seen: set[str] = set()
    stack = [r for r in revisions if r in by_id]
    while stack:
        rid = stack.pop()
        if rid in seen:
            continue
        seen.add(rid)
        stack.extend(p for p in by_id[rid].down_revisions if p in by_id)
    return seen


def upgrade_order(graph: Sequence[Revision], wanted: set[str]) -> tuple[str, ...]:
    """Topological order (parents first) of the wanted revisions; ties keep script order."""
    position = {rev.revision: i for i, rev in enumerate(graph)}
    by_id = {rev.revision: rev for rev in graph}
    waiting = {r: {p for p in by_id[r].down_revisions if p in wanted} for r in wanted}
    children: dict[str, list[str]] = {r: [] for r in wanted}
    for rid, parents in waiting.items():
        for parent in parents:
            children[parent].append(rid)
    ready = sorted((r for r, ps in waiting.items() if not ps), key=position.__getitem__)
    order: list[str] = []
    while ready:
        rid = ready.pop(0)
        order.append(rid)
        for child in children[rid]:
            waiting[child].discard(rid)
            if not waiting[child]:
                ready.append(child)
        ready.sort(key=position.__getitem__)
    return tuple(order)  # a cycle leaves its members out; graph_problems() reports it


def graph_problems(graph: Sequence[Revision]) -> tuple[str, ...]:
    """Duplicate ids, parents that no script defines, cycles: a broken migrations directory."""
    problems = []
    ids = [rev.revision for rev in graph]
    dupes = sorted({r for r in ids if ids.count(r) > 1})
    if dupes:
        problems.append(f"revision id defined twice: {_listed(dupes)}")
    known = set(ids)
    for rev in graph:
        missing = [p for p in rev.down_revisions if p not in known]
        if missing:
            problems.append(f"revision {rev.revision} names down_revision {_listed(missing)}, "
                            "which no migration script defines")
    if len(upgrade_order(graph, known)) < len(known):
        problems.append("the revision graph has a cycle")
    return tuple(problems)


def evaluate(unit: str, current: Sequence[str] | None, graph: Sequence[Revision],
             version_table: str = "alembic_version", graph_error: str = "",
             plain_alembic: bool = False) -> MigrationState:
    """Current revisions (None: no version table) + revision graph -> state and findings.

    GRAPH_ERROR: the scripts could not be read at all (reported as migration_scripts_broken
    by the probe); with no graph nothing can be said about the database's revisions.
    PLAIN_ALEMBIC: the probe loaded a plain Alembic app, so remedies name `alembic ...`."""
    heads = heads_of(graph)
    problems = graph_problems(graph)
    exists = current is not None
    current_t = tuple(dict.fromkeys(current or ()))  # several rows, order kept, dupes dropped
    if graph_error and not graph:
        state = MigrationState(unit, exists, current_t, (), None, ())
        return state
    known = {rev.revision for rev in graph}
    unknown = tuple(r for r in current_t if r not in known)
    pending: tuple[str, ...] | None
    if unknown:
        pending = None  # from an unknown revision there is no path we can name
    else:
        wanted = ancestry(graph, heads) - ancestry(graph, current_t)
        pending = upgrade_order(graph, wanted)
    state = MigrationState(unit, exists, current_t, heads, pending, unknown, problems)
    return MigrationState(**{**state.__dict__,
                             "findings": tuple(_findings(state, graph, version_table,
                                                          plain_alembic))})


def _findings(s: MigrationState, graph: Sequence[Revision], table: str,
              plain_alembic: bool = False) -> list[Finding]:
    unit = s.unit
    cli, where = alembic_cli(plain_alembic), where_to_run(plain_alembic)
    upgrade = f"run `agentctl upgrade {unit} --restart`"
    out: list[Finding] = []
    if s.graph_errors:
        out.append(Finding(
            "migration_graph_invalid", "critical",
            f"the migration scripts of {unit} are inconsistent: {'; '.join(s.graph_errors)}",
            "deploy the complete migrations/versions directory; fix the existing migration "
            "path instead of generating new migrations in production"))
    if not s.version_table_exists:
        if graph:
            out.append(Finding(
                "version_table_missing", "critical",
                f"the database of {unit} has no {table} table: it was never migrated, or "
                f"{unit} points at the wrong database ({len(s.pending or ())} migration(s) "
                "not applied)",
                f"check the database URL {unit} really uses (agentctl context {unit}); if it "
                f"is the right database, {upgrade}"))
        return out
    if not s.current and graph:
        out.append(Finding(
            "version_table_empty", "critical",
            f"{table} of {unit} exists but holds no revision (stamped or downgraded to base, "
            f"or a first upgrade failed): {len(s.pending or ())} migration(s) not applied",
            f"if the schema really is empty, {upgrade}; if the tables already exist, find the "
            f"revision the schema matches and `{cli} stamp` it{where} instead of upgrading"))
    if s.unknown:
        out.append(Finding(
            "db_revision_unknown", "critical",
            f"{table} of {unit} holds revision {_listed(s.unknown)}, which no deployed "
            f"migration script defines (code heads: {_listed(s.heads) or 'none'}): the "
            "database is ahead of the code (migration files not deployed, or code rolled "
            "back) or it is another app's database",
            "deploy the missing migrations/versions files (or the release that matches this "
            f"database) and rerun the upgrade; check the database URL {unit} uses"))
    if len(s.heads) > 1:
        out.append(Finding(
            "multiple_heads", "critical" if s.pending else "warning",
            f"the migrations of {unit} have {len(s.heads)} heads ({_listed(s.heads)}): the "
            f"history branched and `{cli} upgrade` cannot pick a single upgrade path",
            f"create a merge migration: {cli} merge heads (where you develop, not in "
            f"production), deploy it, then {upgrade}"))
    if s.pending and s.current:
        out.append(Finding(
            "pending_migrations", "critical",
            f"{len(s.pending)} migration(s) not applied to the database of {unit}: at "
            f"{_listed(s.current)}, code head {_listed(s.heads)}; pending, in order: "
            f"{_listed(s.pending)}",
            upgrade))
    return out


def _listed(items: Sequence[str] | Iterable[str]) -> str:
    items = list(items)
    shown = ", ".join(items[:MAX_LISTED])
    more = len(items) - MAX_LISTED
    return f"{shown} and {more} more" if more > 0 else shown


def privilege_findings(unit: str, user: str, schema: str, superuser: bool, can_create: bool,
                       not_owned: Sequence[tuple[str, str]]) -> list[Finding]:
    """Pure: the runbook's "insufficient DB permissions": no CREATE on the schema, or tables
    owned by another role (ALTER/DROP need ownership), for the role the app migrates as."""
    if superuser or (can_create and not not_owned):
        return []
    problems = []
    if not can_create:
        problems.append(f"may not CREATE in schema {schema}")
    if not_owned:
        names = [f"{table} (owner {owner})" for table, owner in not_owned]
        problems.append(f"does not own {len(not_owned)} table(s): {_listed(names)}")
    owners = sorted({owner for _t, owner in not_owned})
    remedy = []
    if not can_create:
        remedy.append(f"GRANT CREATE ON SCHEMA {schema} TO {user}")
    if owners:
        remedy.append(f"ALTER TABLE ... OWNER TO {user} (or GRANT {', '.join(owners)} TO {user})")
    return [Finding(
        "insufficient_db_privileges", "warning",
        f"database role {user} of {unit} {' and '.join(problems)}: the upgrade (`flask db "
        "upgrade`, or `alembic upgrade` for a plain Alembic app) will fail to create, alter or "
        "drop objects",
        "grant the required privileges to the production database user: " + "; ".join(remedy))]


def activity_findings(unit: str, sessions: Sequence[tuple[int, float, str, str]],
                      locked: bool = False, table: str = "alembic_version") -> list[Finding]:
    """Pure: another session migrating right now: (pid, seconds, reason, masked query).

    locked: the version table could not be read because of a lock: the current revision
    is not readable now (never "empty", "missing" or "unknown")."""
    if not sessions and not locked:
        return []
    described = [f"pid {pid} {reason} for {secs:.0f}s: {query}"
                 for pid, secs, reason, query in sessions] or [f"{table} is locked"]
    now = ("; current revision not readable now, so pending migrations and drift are held "
           "back until it finishes") if locked else "; drift is held back until it finishes"
    return [Finding(
        "migration_in_progress", "info",
        f"a migration is in progress on the database of {unit}: "
        + "; ".join(described[:3]) + now,
        f"wait for it to finish, then restart {unit}; do not start a second upgrade")]
