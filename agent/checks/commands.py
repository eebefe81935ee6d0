"""Pure: the command an admin types to run Alembic for the app: `flask db ...` or `alembic ...`."""

from __future__ import annotations

FLASK_DB = "flask db"
ALEMBIC = "alembic"
# Plain Alembic finds its alembic.ini in the current directory; flask finds the app anywhere.
IN_APP_DIRECTORY = " (in the app's directory, where alembic.ini is)"


def alembic_cli(plain_alembic: bool) -> str:
    """`alembic` for a plain Alembic app (FastAPI, Starlette: alembic.ini), else `flask db`."""
    return ALEMBIC if plain_alembic else FLASK_DB


def where_to_run(plain_alembic: bool) -> str:
    """Where the bare command must be run: said for plain Alembic only."""
    return IN_APP_DIRECTORY if plain_alembic else ""
