"""Pure: one revision's SQL, read by PostgreSQL's own parser (pglast), into locks and hazards.

Each statement becomes a Statement (the tables it locks and in which mode, whether it
rewrites, scans or builds an index under that lock) and zero or more Hazards named with
squawk's rule names. Tables created earlier in the same revision are new and empty: what
happens to them is harmless and not reported.
"""

from __future__ import annotations

from typing import Any

from pglast import ast, parse_sql
from pglast.enums import AlterTableType as AT
from pglast.enums import ConstrType as CT
from pglast.enums import ObjectType as OT
from pglast.enums import TransactionStmtKind as TK
from pglast.parser import ParseError

from agent.preflight.analysis import (  # re-exported: the parse tree's vocabulary
    BRIEF,
    DATA,
    FAILS,
    INDEX_BUILD,
    MESSAGES,
    REWRITE,
    SAFER,
    SCAN,
    Analysis,
    Hazard,
    Lock,
    RuleInfo,
    Statement,
    hazard,
    rules,
)
from agent.preflight.locks import (
    ACCESS_EXCLUSIVE,
    ROW_EXCLUSIVE,
    SHARE,
    SHARE_ROW_EXCLUSIVE,
    SHARE_UPDATE_EXCLUSIVE,
    stronger,
)

MAX_SQL_SHOWN = 160
# Functions whose DEFAULT forces a rewrite of every row (volatile; PostgreSQL 11+ stores a
# non-volatile default in the catalog instead).
VOLATILE_FUNCTIONS = frozenset({"random", "gen_random_uuid", "uuid_generate_v4",
                                "uuid_generate_v1", "clock_timestamp", "timeofday",
                                "nextval", "txid_current", "uuidv4", "uuidv7"})
SERIAL_TYPES = frozenset({"serial", "bigserial", "smallserial", "serial4", "serial8",
                          "serial2"})
__all__ = ["BRIEF", "DATA", "FAILS", "INDEX_BUILD", "MESSAGES", "REWRITE", "SAFER", "SCAN",
           "Analysis", "Hazard", "Lock", "RuleInfo", "Statement", "analyze", "hazard", "rules"]


def relname(rv: Any) -> str:
    """RangeVar -> 'schema.table' or 'table'."""
    if rv is None:
        return ""
    return f"{rv.schemaname}.{rv.relname}" if getattr(rv, "schemaname", None) else rv.relname


def _names(node: Any) -> list[str]:
    return [getattr(n, "sval", "") for n in (node or ())]


def _short(sql: str) -> str:
    text = " ".join(sql.split())
    return text if len(text) <= MAX_SQL_SHOWN else text[:MAX_SQL_SHOWN - 3] + "..."


def _is_volatile(expr: Any) -> bool:
    """True when a DEFAULT expression calls a volatile function (anywhere inside it)."""
    found = False

    def visit(node: Any) -> None:
        nonlocal found
        if isinstance(node, ast.FuncCall) and _names(node.funcname)[-1:] and \
                _names(node.funcname)[-1].lower() in VOLATILE_FUNCTIONS:
            found = True
        if isinstance(node, ast.Node):
            for name in node:
                visit(getattr(node, name))
        elif isinstance(node, tuple):
            for item in node:
                visit(item)
    visit(expr)
    return found


def _type_of(col: Any) -> tuple[str, tuple[int, ...]] | None:
    """ColumnDef of ALTER COLUMN TYPE -> ('varchar', (200,)) ('' parts when unknown)."""
    type_name = getattr(col, "typeName", None)
    if type_name is None:
        return None
    names = [n.lower() for n in _names(type_name.names)]
    mods = tuple(getattr(getattr(m, "val", None), "ival", -1) or 0
                 for m in type_name.typmods or ())
    return (names[-1] if names else "", mods)


class _Reader:
    """Walks one revision's statements, keeping transaction state and created tables."""

    def __init__(self, version_tables: frozenset[str]) -> None:
        self.version_tables = version_tables
        self.in_tx = False
        self.tx = 0
        self.created: list[str] = []
        self.statements: list[Statement] = []
        self.hazards: list[Hazard] = []

    def new(self, table: str) -> bool:
        return table in self.created or table.rsplit(".", 1)[-1] in self.created

    def hazard(self, rule: str, index: int, table: str, column: str = "", **kw: Any) -> None:
        if self.new(table) and rule not in ("ban-concurrent-index-creation-in-transaction",):
            return
        self.hazards.append(hazard(rule, index, table, column, **kw))

    def read(self, index: int, sql: str, stmt: Any) -> None:
        locks: list[Lock] = []
        kind = type(stmt).__name__.removesuffix("Stmt")
        if isinstance(stmt, ast.TransactionStmt):
            if stmt.kind in (TK.TRANS_STMT_BEGIN, TK.TRANS_STMT_START):
                self.in_tx = True
                self.tx += 1
            elif stmt.kind in (TK.TRANS_STMT_COMMIT, TK.TRANS_STMT_ROLLBACK,
                               TK.TRANS_STMT_PREPARE):
                self.in_tx = False
            return
        if isinstance(stmt, ast.IndexStmt):
            locks += self.index(index, stmt)
            kind = "CREATE INDEX" + (" CONCURRENTLY" if stmt.concurrent else "")
        elif isinstance(stmt, ast.CreateStmt):
            table = relname(stmt.relation)
            self.created.append(table)
            for elt in stmt.tableElts or ():
                for con in (elt.constraints or ()) if isinstance(elt, ast.ColumnDef) else \
                        (elt,) if isinstance(elt, ast.Constraint) else ():
                    if isinstance(con, ast.Constraint) and con.contype == CT.CONSTR_FOREIGN:
                        locks.append(Lock(relname(con.pktable), SHARE_ROW_EXCLUSIVE))
            kind = "CREATE TABLE"
        elif isinstance(stmt, ast.AlterTableStmt) and stmt.objtype == OT.OBJECT_TABLE:
            locks += self.alter(index, stmt)
            kind = "ALTER TABLE"
        elif isinstance(stmt, ast.RenameStmt):
            locks += self.rename(index, stmt)
            kind = "ALTER ... RENAME"
        elif isinstance(stmt, ast.DropStmt):
            locks += self.drop(index, stmt)
            kind = "DROP"
        elif isinstance(stmt, (ast.UpdateStmt, ast.DeleteStmt, ast.InsertStmt)):
            table = relname(stmt.relation)
            if table.rsplit(".", 1)[-1] in self.version_tables:
                return  # Alembic's own bookkeeping
            effect = DATA if not isinstance(stmt, ast.InsertStmt) else BRIEF
            locks.append(Lock(table, ROW_EXCLUSIVE, effect))
            kind = kind.upper()
        elif isinstance(stmt, ast.TruncateStmt):
            locks += [Lock(relname(r), ACCESS_EXCLUSIVE) for r in stmt.relations or ()]
            kind = "TRUNCATE"
        elif isinstance(stmt, (ast.VariableSetStmt, ast.SelectStmt)):
            return
        if any(lk.table and lk.table.rsplit(".", 1)[-1] in self.version_tables
               for lk in locks):
            return
        locks = [lk for lk in locks if lk.table and not self.new(lk.table)]
        self.statements.append(Statement(index, _short(sql), kind, tuple(locks), self.in_tx,
                                         self.tx if self.in_tx else 0))

    def index(self, index: int, stmt: Any) -> list[Lock]:
        table = relname(stmt.relation)
        if stmt.concurrent:
            if self.in_tx:
                self.hazard("ban-concurrent-index-creation-in-transaction", index, table,
                            fails=True)
            return [Lock(table, SHARE_UPDATE_EXCLUSIVE, INDEX_BUILD)]
        self.hazard("require-concurrent-index-creation", index, table)
        return [Lock(table, SHARE, INDEX_BUILD)]

    def alter(self, index: int, stmt: Any) -> list[Lock]:
        table = relname(stmt.relation)
        mode, effect, extra = "", BRIEF, []
        order = [BRIEF, DATA, SCAN, INDEX_BUILD, REWRITE]

        def take(m: str, e: str = BRIEF) -> None:
            nonlocal mode, effect
            mode = stronger(mode, m)
            if order.index(e) > order.index(effect):
                effect = e

        for cmd in stmt.cmds or ():
            sub, d = cmd.subtype, cmd.def_
            if sub == AT.AT_AddColumn and isinstance(d, ast.ColumnDef):
                take(ACCESS_EXCLUSIVE)
                self.add_column(index, table, d, take, extra)
            elif sub == AT.AT_DropColumn:
                take(ACCESS_EXCLUSIVE)
                self.hazard("ban-drop-column", index, table, cmd.name or "",
                            breaks_old_code=True)
            elif sub == AT.AT_AlterColumnType:
                take(ACCESS_EXCLUSIVE, REWRITE)
                self.hazard("changing-column-type", index, table, cmd.name or "",
                            new_type=_type_of(d))
            elif sub == AT.AT_SetNotNull:
                take(ACCESS_EXCLUSIVE, SCAN)
                self.hazard("adding-not-nullable-field", index, table, cmd.name or "")
            elif sub == AT.AT_AddConstraint and isinstance(d, ast.Constraint):
                self.add_constraint(index, table, d, take, extra)
            elif sub == AT.AT_ValidateConstraint:
                take(SHARE_UPDATE_EXCLUSIVE, SCAN)  # the safe half: reads and writes go on
            elif sub in (AT.AT_SetLogged, AT.AT_SetUnLogged, AT.AT_SetAccessMethod,
                         AT.AT_SetTableSpace):
                take(ACCESS_EXCLUSIVE, REWRITE)
            else:
                take(ACCESS_EXCLUSIVE)  # conservative: most ALTER TABLE forms take it
        return [Lock(table, mode or ACCESS_EXCLUSIVE, effect), *extra]

    def add_column(self, index: int, table: str, col: Any, take: Any,
                   extra: list[Lock]) -> None:
        name = col.colname or ""
        type_names = [n.lower() for n in _names(col.typeName.names if col.typeName else ())]
        has_default = False
        not_null = bool(col.is_not_null)
        for con in col.constraints or ():
            if con.contype == CT.CONSTR_DEFAULT:
                has_default = True
                if _is_volatile(con.raw_expr):
                    take(ACCESS_EXCLUSIVE, REWRITE)
                    self.hazard("adding-field-with-default", index, table, name)
            elif con.contype == CT.CONSTR_GENERATED or con.contype == CT.CONSTR_IDENTITY:
                has_default = True
                take(ACCESS_EXCLUSIVE, REWRITE)
                self.hazard("adding-field-with-default", index, table, name)
            elif con.contype == CT.CONSTR_NOTNULL:
                not_null = True
            elif con.contype == CT.CONSTR_PRIMARY:
                take(ACCESS_EXCLUSIVE, INDEX_BUILD)
                self.hazard("adding-serial-primary-key-field", index, table, name)
            elif con.contype == CT.CONSTR_UNIQUE:
                take(ACCESS_EXCLUSIVE, INDEX_BUILD)
                self.hazard("disallowed-unique-constraint", index, table, name)
            elif con.contype == CT.CONSTR_FOREIGN:
                extra.append(Lock(relname(con.pktable), SHARE_ROW_EXCLUSIVE))
        if type_names and type_names[-1] in SERIAL_TYPES:
            has_default = True
            take(ACCESS_EXCLUSIVE, REWRITE)  # nextval() is volatile: every row is written
            self.hazard("adding-field-with-default", index, table, name)
        if not_null and not has_default:
            self.hazard("adding-required-field", index, table, name, fails_if_rows=True)

    def add_constraint(self, index: int, table: str, con: Any, take: Any,
                       extra: list[Lock]) -> None:
        if con.contype == CT.CONSTR_FOREIGN:
            validated = not con.skip_validation
            take(SHARE_ROW_EXCLUSIVE, SCAN if validated else BRIEF)
            extra.append(Lock(relname(con.pktable), SHARE_ROW_EXCLUSIVE,
                              SCAN if validated else BRIEF))
            if validated:
                self.hazard("adding-foreign-key-constraint", index, table)
        elif con.contype == CT.CONSTR_CHECK:
            validated = not con.skip_validation
            take(ACCESS_EXCLUSIVE, SCAN if validated else BRIEF)
            if validated:
                self.hazard("constraint-missing-not-valid", index, table)
        elif con.contype in (CT.CONSTR_UNIQUE, CT.CONSTR_PRIMARY):
            if con.indexname:  # USING INDEX: the index already exists
                take(ACCESS_EXCLUSIVE)
            else:
                take(ACCESS_EXCLUSIVE, INDEX_BUILD)
                self.hazard("disallowed-unique-constraint" if con.contype == CT.CONSTR_UNIQUE
                            else "adding-serial-primary-key-field", index, table)
        else:
            take(ACCESS_EXCLUSIVE)

    def rename(self, index: int, stmt: Any) -> list[Lock]:
        table = relname(stmt.relation)
        if stmt.renameType == OT.OBJECT_COLUMN:
            self.hazard("renaming-column", index, table, stmt.subname or "",
                        breaks_old_code=True)
        elif stmt.renameType == OT.OBJECT_TABLE:
            self.hazard("renaming-table", index, table, breaks_old_code=True)
        return [Lock(table, ACCESS_EXCLUSIVE)] if table else []

    def drop(self, index: int, stmt: Any) -> list[Lock]:
        locks = []
        for obj in stmt.objects or ():
            name = ".".join(_names(obj)) if isinstance(obj, tuple) else ""
            if stmt.removeType == OT.OBJECT_TABLE:
                self.hazard("ban-drop-table", index, name, breaks_old_code=True)
                locks.append(Lock(name, ACCESS_EXCLUSIVE))
            elif stmt.removeType == OT.OBJECT_INDEX:
                # The table's name is not in the SQL; every query on the table also locks its
                # indexes (the planner opens them), so the index's own locks show who waits.
                if stmt.concurrent:
                    locks.append(Lock(name, SHARE_UPDATE_EXCLUSIVE))
                else:
                    self.hazard("require-concurrent-index-deletion", index, name)
                    locks.append(Lock(name, ACCESS_EXCLUSIVE))
        return locks


def analyze(sql: str, version_tables: frozenset[str] = frozenset({"alembic_version"}),
            ) -> Analysis:
    """Parse one revision's offline SQL and apply every rule; a parse error is reported."""
    try:
        parsed = parse_sql(sql)
    except ParseError as exc:
        return Analysis(error=f"PostgreSQL's parser rejects the SQL: {exc}")
    reader = _Reader(version_tables)
    raw = sql.encode()  # stmt_location/stmt_len are byte offsets
    for index, item in enumerate(parsed):
        start = item.stmt_location or 0
        end = start + item.stmt_len if item.stmt_len else len(raw)
        text = raw[start:end].decode("utf-8", "replace")
        reader.read(index, text, item.stmt)
    return Analysis(tuple(reader.statements), tuple(reader.hazards), tuple(reader.created))
