"""Pure: PostgreSQL's table lock modes, which conflict, and what each one blocks."""

from __future__ import annotations

# In strength order (docs: "Table-Level Lock Modes"); the names pg_locks.mode uses.
MODES = ("AccessShareLock", "RowShareLock", "RowExclusiveLock", "ShareUpdateExclusiveLock",
         "ShareLock", "ShareRowExclusiveLock", "ExclusiveLock", "AccessExclusiveLock")
ACCESS_SHARE, ROW_SHARE, ROW_EXCLUSIVE, SHARE_UPDATE_EXCLUSIVE, SHARE, SHARE_ROW_EXCLUSIVE, \
    EXCLUSIVE, ACCESS_EXCLUSIVE = MODES

# The conflict table of the PostgreSQL documentation, row by row.
_CONFLICTS: dict[str, frozenset[str]] = {
    ACCESS_SHARE: frozenset({ACCESS_EXCLUSIVE}),
    ROW_SHARE: frozenset({EXCLUSIVE, ACCESS_EXCLUSIVE}),
    ROW_EXCLUSIVE: frozenset({SHARE, SHARE_ROW_EXCLUSIVE, EXCLUSIVE, ACCESS_EXCLUSIVE}),
    SHARE_UPDATE_EXCLUSIVE: frozenset({SHARE_UPDATE_EXCLUSIVE, SHARE, SHARE_ROW_EXCLUSIVE,
                                       EXCLUSIVE, ACCESS_EXCLUSIVE}),
    SHARE: frozenset({ROW_EXCLUSIVE, SHARE_UPDATE_EXCLUSIVE, SHARE_ROW_EXCLUSIVE, EXCLUSIVE,
                      ACCESS_EXCLUSIVE}),
    SHARE_ROW_EXCLUSIVE: frozenset({ROW_EXCLUSIVE, SHARE_UPDATE_EXCLUSIVE, SHARE,
                                    SHARE_ROW_EXCLUSIVE, EXCLUSIVE, ACCESS_EXCLUSIVE}),
    EXCLUSIVE: frozenset({ROW_SHARE, ROW_EXCLUSIVE, SHARE_UPDATE_EXCLUSIVE, SHARE,
                          SHARE_ROW_EXCLUSIVE, EXCLUSIVE, ACCESS_EXCLUSIVE}),
    ACCESS_EXCLUSIVE: frozenset(MODES),
}


def conflicts(a: str, b: str) -> bool:
    """True when a lock in mode a and one in mode b cannot be held at once."""
    return b in _CONFLICTS.get(a, frozenset(MODES))


def stronger(a: str, b: str) -> str:
    """The stronger of two modes ('' counts as none)."""
    if not a:
        return b
    if not b:
        return a
    return a if MODES.index(a) >= MODES.index(b) else b


def sql_name(mode: str) -> str:
    """'AccessExclusiveLock' -> 'ACCESS EXCLUSIVE' (the LOCK TABLE spelling)."""
    words, word = [], ""
    for ch in mode.removesuffix("Lock"):
        if ch.isupper() and word:
            words.append(word)
            word = ""
        word += ch
    words.append(word)
    return " ".join(w.upper() for w in words)


def blocks(mode: str) -> str:
    """What ordinary traffic a granted or queued lock in mode holds up."""
    if conflicts(mode, ACCESS_SHARE):
        return "reads and writes"
    if conflicts(mode, ROW_EXCLUSIVE):
        return "writes"
    if conflicts(mode, SHARE_UPDATE_EXCLUSIVE):
        return "schema changes and VACUUM"
    return "nothing ordinary"


def blocks_traffic(mode: str) -> bool:
    """True when the mode holds up plain INSERT/UPDATE/DELETE or SELECT."""
    return conflicts(mode, ROW_EXCLUSIVE)
