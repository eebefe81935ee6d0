"""Pure: a revision's locks and hazards weighed against live table sizes and sessions.

low: nothing that holds up reads or writes for longer than a catalog update, and nothing
the lock would queue behind. high: a table-long lock on a table of some size, a drop or
rename old workers may still use, SQL that cannot be known offline. critical: a table-long
lock on a large table, a lock request that would queue behind a session holding a
conflicting lock right now (every later reader or writer then queues behind the request),
a statement that will fail, or a drop/rename of what the code's models still map.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from agent.preflight.analysis import BRIEF, DATA, REWRITE, Analysis, Hazard, Statement
from agent.preflight.live import LiveState, Session, TableSize
from agent.preflight.locks import blocks, blocks_traffic, conflicts, sql_name, stronger

LEVELS = ("low", "high", "critical")
# Table size classes: below SMALL a table-long lock is short; from LARGE on it is an outage.
SMALL_ROWS, SMALL_BYTES = 10_000, 16 * 1024 ** 2
LARGE_ROWS, LARGE_BYTES = 1_000_000, 1024 ** 3


def worst(levels: list[str]) -> str:
    """The highest of levels ('low' for none)."""
    return max(levels, key=LEVELS.index) if levels else "low"


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def describe_size(size: TableSize | None) -> str:
    """'1,000,000 rows, 73.1 MiB' (rows 'unknown' before the first ANALYZE)."""
    if size is None or not size.exists:
        return "size unknown"
    rows = f"{size.rows:,} rows" if size.rows is not None else "rows not yet analysed"
    return f"{rows}, {human_bytes(size.total_bytes)}"


def size_level(size: TableSize | None) -> str:
    """low / high / critical for a lock held as long as the table takes to read."""
    if size is None or not size.exists:
        return "low"
    rows = size.rows if size.rows is not None else 0
    if rows >= LARGE_ROWS or size.total_bytes >= LARGE_BYTES:
        return "critical"
    if rows >= SMALL_ROWS or size.total_bytes >= SMALL_BYTES:
        return "high"
    return "low"


@dataclass(frozen=True)
class Item:
    """One reason behind a revision's risk."""

    level: str
    reason: str
    safer: str = ""
    rule: str = ""
    table: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"level": self.level, "reason": self.reason, "safer": self.safer,
                "rule": self.rule, "table": self.table}


@dataclass(frozen=True)
class RevisionRisk:
    """A pending revision: its statements, rules fired, risk and the one-line reason."""

    revision: str
    doc: str = ""
    level: str = "low"
    reason: str = ""
    safer: str = ""
    items: tuple[Item, ...] = ()
    statements: tuple[Statement, ...] = ()
    hazards: tuple[Hazard, ...] = ()
    sql_available: bool = True
    sql_error: str = ""
    ops: tuple[str, ...] = ()

    @property
    def rules(self) -> tuple[str, ...]:
        """Rule names fired, in statement order, once each."""
        return tuple(dict.fromkeys(h.rule for h in self.hazards))

    def as_dict(self) -> dict[str, Any]:
        return {
            "revision": self.revision, "doc": self.doc, "risk": self.level,
            "reason": self.reason, "safer": self.safer, "rules": list(self.rules),
            "sql_available": self.sql_available, "sql_error": self.sql_error,
            "ops": list(self.ops),
            "items": [i.as_dict() for i in self.items],
            "statements": [{"sql": s.sql, "kind": s.kind, "in_transaction": s.in_transaction,
                            "locks": [{"table": lk.table, "mode": sql_name(lk.mode),
                                       "effect": lk.effect} for lk in s.locks]}
                           for s in self.statements],
        }


def _models_use(model_tables: dict[str, tuple[str, ...]], table: str,
                column: str = "") -> bool:
    short = table.rsplit(".", 1)[-1]
    for name, columns in model_tables.items():
        if name == table or name.rsplit(".", 1)[-1] == short:
            return not column or column in columns
    return False


# regtype's names and the parser's names for the types whose changes can skip the rewrite.
_VARCHAR = {"character varying", "varchar"}
_TEXT = {"text"}
_NUMERIC = {"numeric"}


def describe_type(old: tuple[str, int]) -> str:
    """('character varying', 104) -> 'varchar(100)'."""
    name, typmod = old
    if name in _VARCHAR:
        return f"varchar({typmod - 4})" if typmod > 4 else "varchar"
    if name in _NUMERIC and typmod > 4:
        return f"numeric({(typmod - 4) >> 16},{(typmod - 4) & 0xFFFF})"
    return name


def describe_new_type(new: tuple[str, tuple[int, ...]]) -> str:
    name, mods = new
    return f"{name}({','.join(str(m) for m in mods)})" if mods else name


def binary_compatible(old: tuple[str, int], new: tuple[str, tuple[int, ...]]) -> bool:
    """True for the type changes PostgreSQL makes without rewriting the table: varchar to
    text or to a longer varchar, text to unbounded varchar, numeric to more precision at the
    same scale."""
    name, typmod = old
    new_name, mods = new
    if name in _VARCHAR | _TEXT and new_name in _TEXT:
        return True
    if name in _VARCHAR | _TEXT and new_name in _VARCHAR:
        if not mods:
            return True
        return name in _VARCHAR and typmod > 4 and mods[0] >= typmod - 4
    if name in _NUMERIC and new_name in _NUMERIC and typmod > 4 and len(mods) == 2:
        precision, scale = (typmod - 4) >> 16, (typmod - 4) & 0xFFFF
        return mods[1] == scale and mods[0] >= precision
    return False


def no_rewrite(analysis: Analysis, live: LiveState) -> Analysis:
    """The analysis with binary-compatible type changes (known from the live column types)
    holding their lock briefly instead of for a rewrite."""
    brief = {h.statement for h in analysis.hazards if h.rule == "changing-column-type" and
             h.new_type and (h.table, h.column) in live.columns and
             binary_compatible(live.columns[(h.table, h.column)], h.new_type)}
    if not brief:
        return analysis
    statements = tuple(
        replace(s, locks=tuple(replace(lk, effect=BRIEF) if lk.effect == REWRITE else lk
                               for lk in s.locks)) if s.index in brief else s
        for s in analysis.statements)
    return replace(analysis, statements=statements)


def _queue_items(stmt: Statement, live: LiveState) -> list[Item]:
    """A lock request that conflicts with what another session holds or awaits now."""
    items = []
    for lock in stmt.locks:
        short = lock.table.rsplit(".", 1)[-1]
        ahead: list[Session] = [
            s for s in live.lockers if s.table.rsplit(".", 1)[-1] == short and
            conflicts(lock.mode, s.mode)]
        if not ahead:
            continue
        first = ahead[0]
        more = f" and {len(ahead) - 1} more" if len(ahead) > 1 else ""
        if blocks_traffic(lock.mode):
            items.append(Item(
                "critical", f"{stmt.kind} needs {sql_name(lock.mode)} on {lock.table} and would "
                f"queue behind {first.describe()}{more}; while it waits, {blocks(lock.mode)} "
                f"of {lock.table} queue behind it",
                "end or wait out that session first, and run the upgrade with a lock_timeout "
                "so a queued lock gives up instead of blocking",
                table=lock.table))
        else:
            items.append(Item(
                "high", f"{stmt.kind} needs {sql_name(lock.mode)} on {lock.table} and would "
                f"wait for {first.describe()}{more}", table=lock.table))
    return items


def _lock_items(stmt: Statement, live: LiveState) -> list[Item]:
    """Locks held for a scan, rewrite or index build: the longer the table, the longer."""
    items = []
    for lock in stmt.locks:
        if lock.effect == BRIEF or not blocks_traffic(lock.mode):
            continue
        size = live.table(lock.table)
        level = size_level(size)
        if lock.effect == DATA:
            level = "high" if level == "critical" else "low"
            reason = (f"{stmt.kind} of {lock.table} ({describe_size(size)}) locks every row "
                      f"it changes until the revision commits")
        else:
            reason = (f"{lock.effect} of {lock.table} ({describe_size(size)}) under "
                      f"{sql_name(lock.mode)}: {blocks(lock.mode)} wait until it ends")
        items.append(Item(level, reason, table=lock.table))
    return items


def held_through(earlier: Statement, later: Statement, live: LiveState,
                 where: str = "earlier in the same transaction",
                 safer: str = "split the revision: the long statement in a revision (or "
                              "autocommit_block) of its own") -> list[Item]:
    """A lock taken by earlier is held until COMMIT: through later's scan, rewrite or index
    build, whatever table that one works on (unless later's own lock already says as much)."""
    items = []
    for long in (lk for lk in later.locks if lk.effect not in (BRIEF, DATA)):
        for lock in earlier.locks:
            if not blocks_traffic(lock.mode) or (
                    lock.table == long.table and stronger(lock.mode, long.mode) == long.mode):
                continue
            size = live.table(long.table)
            items.append(Item(
                size_level(size), f"{sql_name(lock.mode)} on {lock.table}, taken by "
                f"{earlier.kind} {where}, is held until COMMIT, through the {long.effect} of "
                f"{long.table} ({describe_size(size)}): {blocks(lock.mode)} of {lock.table} "
                "wait as long", safer, table=lock.table))
    return items


def _held_items(statements: tuple[Statement, ...], live: LiveState) -> list[Item]:
    """held_through for every pair of statements of one transaction of a revision."""
    items = []
    for n, stmt in enumerate(statements):
        if stmt.transaction:
            for later in statements[n + 1:]:
                if later.transaction == stmt.transaction:
                    items += held_through(stmt, later, live)
    return items


def across_revisions(analyses: list[Analysis], names: list[str],
                     live: LiveState) -> list[list[Item]]:
    """Without transaction_per_migration `upgrade` runs every pending revision in one
    transaction: a lock from an earlier revision lasts through a later one's long statement.
    Items per revision (attributed to the later one)."""
    out: list[list[Item]] = [[] for _ in analyses]
    for j, later_analysis in enumerate(analyses):
        for later in (s for s in later_analysis.statements if s.in_transaction):
            for i in range(j):
                for earlier in (s for s in analyses[i].statements if s.in_transaction):
                    out[j] += held_through(
                        earlier, later, live, where=f"in revision {names[i]}",
                        safer="transaction_per_migration=True (Migrate(app, db, "
                              "transaction_per_migration=True) or in env.py), so each "
                              "revision commits before the next starts")
    return out


def _hazard_item(h: Hazard, stmt: Statement | None, live: LiveState,
                 model_tables: dict[str, tuple[str, ...]], stale_workers: bool = False) -> Item:
    """The level of one fired rule: from its lock and the table, or from what it breaks."""
    size = live.table(h.table)
    if h.fails:
        return Item("critical", f"will fail: {h.message}", h.safer, h.rule, h.table)
    if h.fails_if_rows:
        rows = size.rows if size is not None and size.rows is not None else None
        if rows == 0 and size is not None and size.total_bytes <= 16384:
            return Item("low", f"{h.message} ({h.table} is empty now)", h.safer, h.rule,
                        h.table)
        return Item("critical", f"will fail: {h.message} ({describe_size(size)})", h.safer,
                    h.rule, h.table)
    if h.breaks_old_code:
        if _models_use(model_tables, h.table, h.column if h.rule.endswith("column") else ""):
            what = f"{h.table}.{h.column}" if h.column else h.table
            return Item("critical", f"{h.message}: the code's models still map {what}, so the "
                        "running workers fail between the upgrade and the restart", h.safer,
                        h.rule, h.table)
        if stale_workers:
            return Item("high", f"{h.message}: the deployed models no longer map it, but the "
                        "running workers started before the code changed and may still use "
                        "it: restart first, then upgrade", h.safer, h.rule, h.table)
        return Item("high", f"{h.message}: make sure no running worker still uses it",
                    h.safer, h.rule, h.table)
    if h.rule == "changing-column-type":
        old = live.columns.get((h.table, h.column))
        if old is not None and h.new_type and binary_compatible(old, h.new_type):
            return Item("low", f"{h.message}: here {describe_type(old)} -> "
                        f"{describe_new_type(h.new_type)} is binary-compatible, so no rewrite "
                        "(a brief ACCESS EXCLUSIVE)", h.safer, h.rule, h.table)
    long_locks = [lk for lk in (stmt.locks if stmt else ()) if lk.effect != BRIEF and
                  blocks_traffic(lk.mode) and lk.table.rsplit(".", 1)[-1] ==
                  h.table.rsplit(".", 1)[-1]]
    level = worst([size_level(live.table(lk.table)) for lk in long_locks])
    return Item(level, f"{h.message} ({describe_size(size)})", h.safer, h.rule, h.table)


def assess(revision: str, analysis: Analysis, live: LiveState,
           model_tables: dict[str, tuple[str, ...]], *, doc: str = "",
           sql_error: str = "", ops: tuple[str, ...] = (),
           inherited: tuple[Item, ...] = (), stale_workers: bool = False) -> RevisionRisk:
    """One revision's risk: every item, the worst level, its reason and safer form."""
    items: list[Item] = []
    by_index = {s.index: s for s in analysis.statements}
    for h in analysis.hazards:
        items.append(_hazard_item(h, by_index.get(h.statement), live, model_tables,
                                  stale_workers))
    for stmt in analysis.statements:
        items += _queue_items(stmt, live)
        covered = {h.table.rsplit(".", 1)[-1] for h in analysis.hazards
                   if h.statement == stmt.index}
        items += [i for i in _lock_items(stmt, live)
                  if i.table.rsplit(".", 1)[-1] not in covered]
    items += _held_items(analysis.statements, live)
    items += inherited
    if sql_error:
        known = f"known: op.{', op.'.join(ops)}" if ops else "nothing else is known"
        items.append(Item("high", f"no offline SQL: {sql_error}; a data migration that "
                          f"queries the database cannot be rendered offline ({known}; the "
                          "SQL before the failure is analysed)",
                          "move data changes into a separate revision written with "
                          "op.execute() (batched), so its SQL can be reviewed"))
    if analysis.error:
        items.append(Item("high", analysis.error))
    if live.error:
        items.append(Item("high", f"the live database could not be read, so sizes and "
                          f"blockers are unknown: {live.error}"))
    items.sort(key=lambda i: -LEVELS.index(i.level))
    top = items[0] if items else None
    level = top.level if top else "low"
    reason = top.reason if top else (
        "only brief catalog locks, nothing to queue behind" if analysis.statements
        else "no schema statements")
    safer = next((i.safer for i in items if i.level == level and i.safer), "")
    return RevisionRisk(revision, doc, level, reason, safer, tuple(items), analysis.statements,
                        analysis.hazards, not sql_error, sql_error, ops)
