"""Pure: what the app's own migration environment (env.py) told the probe, validated.

The probe runs env.py as the unit's user, so every value here is written by the app's user:
names are checked before they reach SQL (they are also always quoted there).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_VERSION_TABLE = "alembic_version"
# PostgreSQL truncates identifiers to 63 bytes; anything longer is not a real table name.
MAX_IDENTIFIER = 63
MAX_OPTIONS = 20


@dataclass(frozen=True)
class AlembicEnv:
    """Where env.py keeps the version and which options shape its comparison."""

    drift_source: str = ""                       # "env.py", "models" or "" (not compared)
    env_py: str = ""
    version_table: str = DEFAULT_VERSION_TABLE
    version_table_schema: str = ""               # "" = the search_path's first schema
    include_schemas: bool = False
    options: dict[str, str] = field(default_factory=dict)   # option -> short description

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"drift_source": self.drift_source, "env_py": self.env_py,
                "version_table": self.version_table,
                "version_table_schema": self.version_table_schema,
                "include_schemas": self.include_schemas, "options": dict(self.options)}

    @property
    def qualified_version_table(self) -> str:
        """'schema.table' or 'table', for messages."""
        return (f"{self.version_table_schema}.{self.version_table}"
                if self.version_table_schema else self.version_table)


def valid_identifier(value: Any) -> bool:
    """A name PostgreSQL could hold: non-empty str, at most 63 bytes, no NUL/control chars."""
    return (isinstance(value, str) and 0 < len(value.encode("utf-8", "replace"))
            <= MAX_IDENTIFIER and value.isprintable())


def from_report(doc: Any) -> tuple[AlembicEnv, str]:
    """The probe's 'alembic_env' object -> (AlembicEnv, problem text or '')."""
    if not isinstance(doc, Mapping) or not doc:
        return AlembicEnv(), ""
    table = doc.get("version_table") or DEFAULT_VERSION_TABLE
    schema = doc.get("version_table_schema") or ""
    problem = ""
    if not valid_identifier(table):
        problem = f"env.py names an invalid version table {str(table)[:80]!r}"
        table = DEFAULT_VERSION_TABLE
    if schema and not valid_identifier(schema):
        problem = f"env.py names an invalid version table schema {str(schema)[:80]!r}"
        schema = ""
    raw_options = doc.get("options") if isinstance(doc.get("options"), Mapping) else {}
    options = {str(k)[:40]: str(v)[:120] for k, v in list(raw_options.items())[:MAX_OPTIONS]}
    source = str(doc.get("drift_source") or "")
    return AlembicEnv(source if source in ("env.py", "models") else "",
                      str(doc.get("env_py") or "")[:4096], table, schema,
                      bool(doc.get("include_schemas")), options), problem
