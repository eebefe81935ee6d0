"""Pure: schema drift (live schema vs. the app's models) as admin-facing kinds and findings."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from agent.model import Finding

# Alembic's autogenerate ops say what to do to the database; admins and the `kind` label
# say what is wrong with it. A closed set keeps the metric's cardinality bounded.
KINDS = {
    "add_table": "missing_table", "remove_table": "extra_table",
    "add_column": "missing_column", "remove_column": "extra_column",
    "modify_type": "column_type", "modify_nullable": "column_nullable",
    "modify_default": "column_default", "modify_comment": "column_comment",
    "add_index": "missing_index", "remove_index": "extra_index",
    "add_unique": "missing_unique", "remove_unique": "extra_unique",
    "add_fk": "missing_foreign_key", "remove_fk": "extra_foreign_key",
}
# What the running code needs and the database lacks: queries fail with 500s.
BREAKING = {"missing_table", "missing_column", "column_type"}
VERSION_TABLES = {"alembic_version"}
MAX_LISTED = 8


def drift_items(diff: Iterable[Mapping[str, str]]) -> list[dict[str, str]]:
    """Probe diff entries -> [{kind, table, name, detail}] with admin-facing kinds."""
    items = []
    for entry in diff:
        table = str(entry.get("table", ""))
        if table in VERSION_TABLES:
            continue
        items.append({"kind": KINDS.get(str(entry.get("kind", "")), "other"), "table": table,
                      "name": str(entry.get("name", "")), "detail": str(entry.get("detail", ""))})
    return items


def describe(item: Mapping[str, str]) -> str:
    """'missing_column users.email' style one-liner."""
    table, name = item["table"], item["name"]
    where = f"{table}.{name}" if table and name and name != table else (table or name)
    return f"{item['kind']} {where}".strip()


def drift_findings(unit: str, items: Sequence[Mapping[str, str]], pending: int) -> list[Finding]:
    """One finding naming every drifting object (first few), severity by what breaks."""
    if not items:
        return []
    listed = ", ".join(describe(i) for i in items[:MAX_LISTED])
    more = f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    breaking = any(i["kind"] in BREAKING for i in items)
    if pending:
        cause = (f"; {pending} pending migration(s) probably account for it: apply them first")
        remedy = f"agentctl upgrade {unit} --restart, then re-check the drift"
    else:
        cause = "; the database is at head, so this is a manual change or a missing migration"
        remedy = ("compare the live schema with the models (psql \\d TABLE) and write a "
                  "corrective migration; never edit applied ones")
    return [Finding(
        "schema_drift", "critical" if breaking else "warning",
        f"the live schema of {unit}'s database differs from its models in {len(items)} "
        f"object(s): {listed}{more}{cause}", remedy)]
