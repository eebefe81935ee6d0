"""Pure: a revision that failed halfway (MySQL/MariaDB: DDL is not transactional).

The version table says N, but objects that the next revision N+1 creates already exist (or
ones it drops are gone): N+1 ran in part and failed, so every retry of `flask db upgrade`
fails on its first statement ("Table 'posts' already exists"). That is neither "pending"
nor "drift": the remedy is to finish N+1 by hand, then `stamp` it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent.checks.commands import alembic_cli, where_to_run
from agent.model import Finding

# The operations whose effect on the live schema can be seen by name.
KINDS = frozenset({"create_table", "drop_table", "add_column", "drop_column", "create_index",
                   "drop_index", "rename_table", "rename_column"})
MAX_OPS = 200
MAX_NAME = 128


@dataclass(frozen=True)
class Op:
    """One operation of a revision's upgrade(): kind, table, name (column/index/new name)."""

    kind: str
    table: str
    name: str = ""

    def describe(self) -> str:
        """'table posts', 'column users.name', 'index ix_users_email on users'."""
        if self.kind in ("create_table", "drop_table"):
            return f"table {self.table}"
        if self.kind in ("add_column", "drop_column"):
            return f"column {self.table}.{self.name}"
        if self.kind in ("create_index", "drop_index"):
            return f"index {self.name} on {self.table}"
        if self.kind == "rename_table":
            return f"table {self.table} renamed to {self.name}"
        old, _, new = self.name.partition(">")
        return f"column {self.table}.{old} renamed to {new}"


def ops_of(raw: Any) -> tuple[Op, ...] | None:
    """The probe's [[kind, table, name], ...] (hostile input: validated, bounded); None when
    the probe could not tell (or sent something else)."""
    if not isinstance(raw, list):
        return None
    out = []
    for item in raw[:MAX_OPS]:
        if not (isinstance(item, list) and len(item) == 3
                and all(isinstance(v, str) and len(v) <= MAX_NAME for v in item)):
            return None
        out.append(Op(*item))
    return tuple(out)


@dataclass(frozen=True)
class LiveObjects:
    """What the live database holds, for the tables the next revisions name."""

    tables: frozenset[str] = frozenset()
    # (table, column) and (table, index name)
    columns: frozenset[tuple[str, str]] = frozenset()
    indexes: frozenset[tuple[str, str]] = frozenset()


def done(op: Op, live: LiveObjects) -> bool | None:
    """Has op's effect already happened (None: cannot be told by name)."""
    if op.kind == "create_table":
        return op.table in live.tables
    if op.kind == "drop_table":
        return op.table not in live.tables
    if op.kind == "add_column":
        return (op.table, op.name) in live.columns
    if op.kind == "drop_column":
        return op.table in live.tables and (op.table, op.name) not in live.columns
    if op.kind == "create_index":
        return (op.table, op.name) in live.indexes if op.name else None
    if op.kind == "drop_index":
        return op.table in live.tables and (op.table, op.name) not in live.indexes \
            if op.name else None
    if op.kind == "rename_table":
        return op.table not in live.tables and op.name in live.tables
    if op.kind == "rename_column":
        old, _, new = op.name.partition(">")
        return (op.table, old) not in live.columns and (op.table, new) in live.columns
    return None


def next_revisions(current: Iterable[str], revisions: Sequence[Mapping[str, Any]]
                   ) -> list[Mapping[str, Any]]:
    """The revisions that come right after the current ones: every parent applied, itself
    not (N+1; one per branch)."""
    by_id = {str(r.get("revision")): r for r in revisions}
    applied: set[str] = set()
    todo = [c for c in current if c in by_id]
    while todo:
        rev = todo.pop()
        if rev in applied:
            continue
        applied.add(rev)
        todo += [str(d) for d in by_id[rev].get("down_revisions") or () if str(d) in by_id]
    out = []
    for rev, r in by_id.items():
        parents = [str(d) for d in r.get("down_revisions") or ()]
        # A base revision (no parent) is next when nothing is applied yet (empty table).
        if rev not in applied and all(p in applied for p in parents if p in by_id):
            out.append(r)
    return out


def tables_named(revisions: Iterable[Mapping[str, Any]]) -> set[str]:
    """Every table the given revisions' operations name (what to read from the database)."""
    names: set[str] = set()
    for r in revisions:
        for op in ops_of(r.get("ops")) or ():
            if op.kind in KINDS and op.table:
                names.add(op.table)
                if op.kind == "rename_table" and op.name:
                    names.add(op.name)
    return names


@dataclass(frozen=True)
class HalfApplied:
    """A revision that ran in part: what it already did and what is left."""

    revision: str
    doc: str
    done: tuple[Op, ...]
    left: tuple[Op, ...]
    unknown: int  # operations whose effect cannot be seen by name (data steps, raw SQL)


def half_applied(current: Sequence[str], revisions: Sequence[Mapping[str, Any]],
                 live: LiveObjects) -> list[HalfApplied]:
    """The next revisions whose effects are (partly) in the live schema already."""
    found = []
    for r in next_revisions(current, revisions):
        ops = ops_of(r.get("ops"))
        if not ops:
            continue
        states = [(op, done(op, live)) for op in ops]
        did = tuple(op for op, state in states if state is True)
        if did:
            found.append(HalfApplied(
                str(r.get("revision")), str(r.get("doc") or ""), did,
                tuple(op for op, state in states if state is False),
                sum(1 for _op, state in states if state is None)))
    return found


def _listed(ops: Sequence[Op], limit: int = 6) -> str:
    names = [op.describe() for op in ops[:limit]]
    more = f" and {len(ops) - limit} more" if len(ops) > limit else ""
    return ", ".join(names) + more


VERB_DONE = {"create_table": "exists", "add_column": "exists", "create_index": "exists",
             "drop_table": "is gone", "drop_column": "is gone", "drop_index": "is gone",
             "rename_table": "done", "rename_column": "done"}


def half_applied_findings(unit: str, current: Sequence[str], found: Sequence[HalfApplied],
                          table: str = "alembic_version", pending: int = 0,
                          plain_alembic: bool = False) -> list[Finding]:
    """Pure: one critical finding per revision that ran in part, with its objects and the
    remedy (finish it by hand, then stamp it); `alembic ...` for a plain Alembic app."""
    cli, where = alembic_cli(plain_alembic), where_to_run(plain_alembic)
    out = []
    at = ", ".join(current) or "(empty)"
    for h in found:
        did = "; ".join(f"{op.describe()} {VERB_DONE.get(op.kind, 'done')}" for op in h.done)
        name = f"revision {h.revision}" + (f" ({h.doc})" if h.doc else "")
        if h.left:
            state = f"{name} ran in part and failed: already done: {did}; not done: " \
                f"{_listed(h.left)}"
            remedy = (f"finish revision {h.revision} by hand ({_listed(h.left)}), then "
                      f"`{cli} stamp {h.revision}`{where} (agentctl exec {unit} -- {cli} stamp "
                      f"{h.revision})")
        else:
            state = f"{name} is applied but was not recorded: {did}"
            remedy = (f"check the objects of revision {h.revision}, then `{cli} stamp "
                      f"{h.revision}`{where} (agentctl exec {unit} -- {cli} stamp "
                      f"{h.revision})")
        if h.unknown:
            state += f" ({h.unknown} step(s) of it, e.g. raw SQL or data changes, cannot be " \
                "checked)"
        rest = pending - 1
        after = f"; then `{cli} upgrade` for the {rest} revision(s) after it" if rest > 0 \
            else ""
        out.append(Finding(
            "half_applied_revision", "critical",
            f"{table} of {unit} says {at}, but {state}: `{cli} upgrade` would fail on the "
            "objects that already exist (MySQL/MariaDB cannot roll DDL back)",
            remedy + after))
    return out
