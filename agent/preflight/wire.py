"""Pure: an Analysis to JSON-able data (in the parser child) and back, validated (in root).

What comes back from the child is treated as hostile: every field is checked for type,
range and length, lock modes, effects and rule names must be known ones, and a hazard's
message and safer form are looked up by rule name in root (never taken from the child).
"""

from __future__ import annotations

import re
from typing import Any

from agent.preflight.analysis import EFFECTS, MESSAGES, Analysis, Hazard, Lock, Statement, hazard
from agent.preflight.locks import MODES

MAX_STATEMENTS = 20_000     # per revision (200,000 characters of SQL hold fewer)
MAX_LOCKS = 64              # per statement
MAX_HAZARDS = 20_000
MAX_CREATED = 10_000
MAX_NAME = 300              # schema.table: PostgreSQL truncates each part to 63 bytes
MAX_SQL = 200               # Statement.sql is shortened to 160 characters by the child
MAX_ERROR = 500
MAX_INT = 2**31 - 1
# Statement kinds: "ALTER TABLE", "CREATE INDEX CONCURRENTLY", "ALTER ... RENAME", "CreateSeq".
_KIND = re.compile(r"[A-Za-z][A-Za-z .]{0,63}")


class WireError(ValueError):
    """The child's reply is not a valid analysis."""


def to_wire(analysis: Analysis) -> dict[str, Any]:
    """Analysis -> plain JSON-able dict (messages left out: root looks them up)."""
    return {
        "statements": [{"index": s.index, "sql": s.sql, "kind": s.kind,
                        "locks": [[lk.table, lk.mode, lk.effect] for lk in s.locks],
                        "in_transaction": s.in_transaction, "transaction": s.transaction}
                       for s in analysis.statements],
        "hazards": [{"rule": h.rule, "statement": h.statement, "table": h.table,
                     "column": h.column, "breaks_old_code": h.breaks_old_code,
                     "fails_if_rows": h.fails_if_rows, "fails": h.fails,
                     "new_type": [h.new_type[0], list(h.new_type[1])] if h.new_type else None}
                    for h in analysis.hazards],
        "created_tables": list(analysis.created_tables),
        "error": analysis.error,
    }


def _list(value: Any, limit: int, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise WireError(f"{what}: not a list")
    if len(value) > limit:
        raise WireError(f"{what}: {len(value)} entries (at most {limit})")
    return value


def _str(value: Any, limit: int, what: str, pattern: re.Pattern[str] | None = None) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise WireError(f"{what}: not a string of at most {limit} characters")
    if pattern is not None and not pattern.fullmatch(value):
        raise WireError(f"{what}: unexpected characters")
    return value


def _int(value: Any, what: str) -> int:
    # bool is an int in Python: refused, as is anything out of range.
    if type(value) is not int or not 0 <= value <= MAX_INT:
        raise WireError(f"{what}: not a non-negative integer")
    return value


def _bool(value: Any, what: str) -> bool:
    if type(value) is not bool:
        raise WireError(f"{what}: not a boolean")
    return value


def _fields(value: Any, keys: set[str], what: str) -> dict[str, Any]:
    if not isinstance(value, dict) or set(value) != keys:
        raise WireError(f"{what}: not an object with exactly {sorted(keys)}")
    return value


def _lock(value: Any, what: str) -> Lock:
    if not isinstance(value, list) or len(value) != 3:
        raise WireError(f"{what}: not [table, mode, effect]")
    table, mode, effect = value
    if mode not in MODES:
        raise WireError(f"{what}: unknown lock mode")
    if effect not in EFFECTS:
        raise WireError(f"{what}: unknown effect")
    return Lock(_str(table, MAX_NAME, f"{what} table"), mode, effect)


def _statement(value: Any, n: int) -> Statement:
    what = f"statement {n}"
    d = _fields(value, {"index", "sql", "kind", "locks", "in_transaction", "transaction"}, what)
    locks = tuple(_lock(lk, f"{what} lock {i}")
                  for i, lk in enumerate(_list(d["locks"], MAX_LOCKS, f"{what} locks")))
    return Statement(_int(d["index"], f"{what} index"), _str(d["sql"], MAX_SQL, f"{what} sql"),
                     _str(d["kind"], 64, f"{what} kind", _KIND), locks,
                     _bool(d["in_transaction"], f"{what} in_transaction"),
                     _int(d["transaction"], f"{what} transaction"))


def _new_type(value: Any, what: str) -> tuple[str, tuple[int, ...]] | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 2:
        raise WireError(f"{what}: not [name, typmods]")
    mods = _list(value[1], 8, f"{what} typmods")
    # A typmod is a small integer; the child uses -1 for one it could not read.
    if any(type(m) is not int or not -1 <= m <= MAX_INT for m in mods):
        raise WireError(f"{what}: typmods not integers")
    return _str(value[0], 64, f"{what} name"), tuple(mods)


def _hazard(value: Any, n: int) -> Hazard:
    what = f"hazard {n}"
    d = _fields(value, {"rule", "statement", "table", "column", "breaks_old_code",
                        "fails_if_rows", "fails", "new_type"}, what)
    if d["rule"] not in MESSAGES:
        raise WireError(f"{what}: unknown rule")
    return hazard(d["rule"], _int(d["statement"], f"{what} statement"),
                  _str(d["table"], MAX_NAME, f"{what} table"),
                  _str(d["column"], MAX_NAME, f"{what} column"),
                  breaks_old_code=_bool(d["breaks_old_code"], f"{what} breaks_old_code"),
                  fails_if_rows=_bool(d["fails_if_rows"], f"{what} fails_if_rows"),
                  fails=_bool(d["fails"], f"{what} fails"),
                  new_type=_new_type(d["new_type"], f"{what} new_type"))


def from_wire(value: Any) -> Analysis:
    """The child's JSON for one revision -> Analysis; WireError when anything is off."""
    d = _fields(value, {"statements", "hazards", "created_tables", "error"}, "analysis")
    statements = tuple(_statement(s, i) for i, s in
                       enumerate(_list(d["statements"], MAX_STATEMENTS, "statements")))
    hazards = tuple(_hazard(h, i) for i, h in
                    enumerate(_list(d["hazards"], MAX_HAZARDS, "hazards")))
    created = tuple(_str(t, MAX_NAME, "created table")
                    for t in _list(d["created_tables"], MAX_CREATED, "created_tables"))
    return Analysis(statements, hazards, created, _str(d["error"], MAX_ERROR, "error"))
