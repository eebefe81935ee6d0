"""Every statement the agent sends through the session held as the unit's user passes that
session's one-statement rule (no ';' inside): a comment with a ';' once failed every
database check of the running agent."""

from __future__ import annotations

import ast
import inspect

import pytest
from agent.dbsql import TextClause

from agent.preflight import live
from agent.privileged.sources import database


def _sql_constants() -> list[tuple[str, str]]:
    """(name, text) of every module-level SQL constant and every literal text() argument."""
    found: list[tuple[str, str]] = []
    for module in (database, live):
        for name, value in vars(module).items():
            if isinstance(value, TextClause):
                found.append((f"{module.__name__}.{name}", value.text))
            elif isinstance(value, str) and name.isupper() and "SELECT" in value.upper():
                found.append((f"{module.__name__}.{name}", value))
        tree = ast.parse(inspect.getsource(module))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", "") == "text"
                    and node.args and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)):
                found.append((f"{module.__name__}:{node.lineno}", node.args[0].value))
    return found


def test_there_are_statements_to_check() -> None:
    assert len(_sql_constants()) >= 8


@pytest.mark.parametrize("name,sql", _sql_constants())
def test_no_statement_holds_a_semicolon(name: str, sql: str) -> None:
    assert ";" not in sql.strip().rstrip(";"), f"{name} would be refused by the user session"
