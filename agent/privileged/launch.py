"""Build the source of an unprivileged child: the read-only guard, then its main module."""

from __future__ import annotations

from pathlib import Path

ASUSER = Path(__file__).resolve().parent.parent / "asuser"
PROBE_CHILD = ASUSER / "probe_child.py"
GUARD = ASUSER / "readonly.py"
DBSESSION = ASUSER / "dbsession.py"


def bundle(main: Path, text: str | None = None) -> str:
    """readonly.py's source followed by main's: one ``python -c`` program, guard first.

    Read by root from the agent's own files and passed on the command line, so the child
    never needs to read the agent's installation (it may sit in a directory only root enters).
    """
    body = main.read_text() if text is None else text  # text: main's source, extended
    return GUARD.read_text() + "\n\n# ---- " + main.name + " ----\n" + body
