"""Pure: may the app's MySQL/MariaDB user run its migrations (from SHOW GRANTS)."""

from __future__ import annotations

from collections.abc import Sequence

from agent.checks.commands import alembic_cli
from agent.model import Finding


def mysql_privilege_findings(unit: str, user: str, database: str,
                             missing: Sequence[str], plain_alembic: bool = False
                             ) -> list[Finding]:
    """The runbook's "insufficient DB permissions" for MySQL: the privileges on the
    database that `flask db upgrade` needs and the user's grants do not give."""
    if not missing:
        return []
    listed = ", ".join(missing)
    name, _, host = user.rpartition("@") if "@" in user else (user, "", "%")
    host_user = f"'{name}'@'{host}'"  # CURRENT_USER() is user@host; GRANT wants quotes
    return [Finding(
        "insufficient_db_privileges", "warning",
        f"database user {user} of {unit} lacks {listed} on {database}.* (SHOW GRANTS): "
        f"`{alembic_cli(plain_alembic)} upgrade` will fail to create, alter or drop objects",
        f"grant them to the production database user: GRANT {listed} ON `{database}`.* TO "
        f"{host_user}")]
