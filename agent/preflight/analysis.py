"""Pure: what the SQL parser reports about one revision (locks, hazards), with no parser in it.

The parse itself runs in an unprivileged child (parse.py, sqlchild.py); root only ever holds
these plain dataclasses, rebuilt from the child's JSON by wire.py. Messages and safer forms
are looked up here by rule name, never taken from the child.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# What each effect means for the time the lock is held.
BRIEF, SCAN, REWRITE, INDEX_BUILD, DATA, FAILS = ("brief", "scan", "rewrite", "index build",
                                                   "data", "fails")
EFFECTS = (BRIEF, SCAN, REWRITE, INDEX_BUILD, DATA, FAILS)


@dataclass(frozen=True)
class Lock:
    """One table lock a statement takes."""

    table: str
    mode: str
    effect: str = BRIEF  # how long it is held: brief, or for a scan/rewrite/index build


@dataclass(frozen=True)
class Hazard:
    """A rule that fired on a statement."""

    rule: str
    statement: int          # index in the revision's statements
    table: str
    column: str = ""
    message: str = ""
    safer: str = ""
    breaks_old_code: bool = False   # drops/renames: running workers fail until restarted
    fails_if_rows: bool = False     # fails outright on a non-empty table
    fails: bool = False             # fails whatever the data
    new_type: tuple[str, tuple[int, ...]] | None = None  # changing-column-type: (name, typmods)


@dataclass(frozen=True)
class Statement:
    """One parsed statement: its text (shortened), kind, the locks it takes."""

    index: int
    sql: str
    kind: str
    locks: tuple[Lock, ...] = ()
    in_transaction: bool = False
    transaction: int = 0    # which BEGIN..COMMIT block (0 = none): locks last until its end


@dataclass(frozen=True)
class Analysis:
    """Everything read from one revision's SQL."""

    statements: tuple[Statement, ...] = ()
    hazards: tuple[Hazard, ...] = ()
    created_tables: tuple[str, ...] = ()
    error: str = ""


SAFER = {
    "require-concurrent-index-creation":
        "CREATE INDEX CONCURRENTLY in a revision of its own, outside the transaction: "
        "op.create_index(..., postgresql_concurrently=True) inside "
        "`with op.get_context().autocommit_block():` (or transaction_per_migration=True)",
    "ban-concurrent-index-creation-in-transaction":
        "run it inside `with op.get_context().autocommit_block():` in a revision of its own",
    "require-concurrent-index-deletion":
        "DROP INDEX CONCURRENTLY (op.drop_index(..., postgresql_concurrently=True) inside "
        "`with op.get_context().autocommit_block():`)",
    "adding-foreign-key-constraint":
        "add it NOT VALID (op.create_foreign_key(..., postgresql_not_valid=True)), then "
        "ALTER TABLE ... VALIDATE CONSTRAINT in a later revision",
    "constraint-missing-not-valid":
        "add it NOT VALID, then ALTER TABLE ... VALIDATE CONSTRAINT in a later revision",
    "adding-not-nullable-field":
        "ADD CONSTRAINT ... CHECK (col IS NOT NULL) NOT VALID, VALIDATE it, then SET NOT NULL "
        "(PostgreSQL 12+ uses the valid check and skips the scan), then drop the check",
    "adding-required-field":
        "add the column nullable (or with a constant default), backfill in batches, then "
        "enforce NOT NULL with a validated CHECK",
    "adding-field-with-default":
        "add the column without the volatile default, set it for new rows, backfill old "
        "rows in batches",
    "changing-column-type":
        "expand/contract: add a column of the new type, backfill in batches, switch the "
        "code, drop the old column in a later release",
    "disallowed-unique-constraint":
        "CREATE UNIQUE INDEX CONCURRENTLY, then ADD CONSTRAINT ... UNIQUE USING INDEX",
    "adding-serial-primary-key-field":
        "CREATE UNIQUE INDEX CONCURRENTLY, then ADD CONSTRAINT ... PRIMARY KEY USING INDEX",
    "renaming-column":
        "expand/contract: add the new column, write both, switch the readers, drop the old "
        "one in a later release",
    "renaming-table":
        "expand/contract: create the new table (or a view under the new name), switch the "
        "code, drop the old name in a later release",
    "ban-drop-column":
        "contract last: deploy code that no longer uses the column and restart, then drop it "
        "in a later release",
    "ban-drop-table":
        "contract last: deploy code that no longer uses the table and restart, then drop it "
        "in a later release",
}

MESSAGES = {
    "require-concurrent-index-creation":
        "CREATE INDEX without CONCURRENTLY holds SHARE on {t} (blocks writes) while the "
        "whole index is built",
    "ban-concurrent-index-creation-in-transaction":
        "CREATE INDEX CONCURRENTLY inside a transaction block fails (PostgreSQL refuses it)",
    "require-concurrent-index-deletion":
        "DROP INDEX {t} without CONCURRENTLY takes ACCESS EXCLUSIVE on its table",
    "adding-foreign-key-constraint":
        "a foreign key without NOT VALID holds SHARE ROW EXCLUSIVE on {t} and the table it "
        "references (blocks writes) while every row of {t} is checked",
    "constraint-missing-not-valid":
        "a CHECK constraint without NOT VALID holds ACCESS EXCLUSIVE on {t} while every row "
        "is checked",
    "adding-not-nullable-field":
        "SET NOT NULL on {t}.{c} holds ACCESS EXCLUSIVE (blocks reads and writes) while every "
        "row is scanned",
    "adding-required-field":
        "ADD COLUMN {t}.{c} NOT NULL without a default fails on a table that has rows",
    "adding-field-with-default":
        "ADD COLUMN {t}.{c} with a volatile default rewrites the whole table under ACCESS "
        "EXCLUSIVE",
    "changing-column-type":
        "changing the type of {t}.{c} rewrites the table (and its indexes) under ACCESS "
        "EXCLUSIVE, unless the types are binary-compatible",
    "disallowed-unique-constraint":
        "ADD UNIQUE on {t} builds its index under ACCESS EXCLUSIVE (blocks reads and writes)",
    "adding-serial-primary-key-field":
        "ADD PRIMARY KEY on {t} builds its index under ACCESS EXCLUSIVE (blocks reads and "
        "writes)",
    "renaming-column":
        "renaming {t}.{c}: code still using the old name fails",
    "renaming-table":
        "renaming {t}: code still using the old name fails",
    "ban-drop-column":
        "dropping {t}.{c}: code still selecting it fails",
    "ban-drop-table":
        "dropping {t}: code still using it fails",
}


def hazard(rule: str, statement: int, table: str, column: str = "", **flags: Any) -> Hazard:
    """A Hazard with the rule's own message and safer form (rule must be known)."""
    return Hazard(rule, statement, table, column, MESSAGES[rule].format(t=table, c=column),
                  SAFER[rule], **flags)


@dataclass(frozen=True)
class RuleInfo:
    """A rule, for the README and `agentctl plan --rules`."""

    name: str
    message: str
    safer: str
    tags: tuple[str, ...] = field(default_factory=tuple)


def rules() -> list[RuleInfo]:
    """Every rule this preflight applies."""
    return [RuleInfo(name, MESSAGES[name], SAFER[name]) for name in MESSAGES]
