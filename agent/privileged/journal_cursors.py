"""Journal cursors kept in the state directory, so an agent restart neither re-counts nor loses.

One small JSON file, {"version": 1, "cursors": {unit: cursor}}, written atomically (temporary
file in the same directory, fsync, rename). A read-only or full disk never breaks an inspection:
the cursors stay in memory and the reason is kept in `error` (and logged once).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Mapping

log = logging.getLogger("driftwatch.journal_cursors")

FILE_NAME = "journal-cursors.json"
MAX_FILE_BYTES = 1024 * 1024
MAX_CURSOR_CHARS = 512
# sd-journal cursors: "s=<hex>;i=<hex>;b=<hex>;m=<hex>;t=<hex>;x=<hex>".
CURSOR_SYNTAX = re.compile(r"[a-z]=[0-9a-f]+(?:;[a-z]=[0-9a-f]+)*")


def valid_cursor(value: object) -> bool:
    """Pure: True for a string shaped like an sd-journal cursor, of bounded length."""
    return (isinstance(value, str) and len(value) <= MAX_CURSOR_CHARS
            and CURSOR_SYNTAX.fullmatch(value) is not None)


def parse(text: str) -> dict[str, str]:
    """Pure: the file's text -> {unit: cursor}; anything malformed is dropped, never raised."""
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    cursors = data.get("cursors") if isinstance(data, dict) else None
    if not isinstance(cursors, dict):
        return {}
    return {unit: cursor for unit, cursor in cursors.items()
            if isinstance(unit, str) and 0 < len(unit) <= 256 and valid_cursor(cursor)}


def render(cursors: Mapping[str, str]) -> str:
    """Pure: {unit: cursor} -> the file's text."""
    return json.dumps({"version": 1, "cursors": dict(sorted(cursors.items()))}, indent=1) + "\n"


class CursorFile:
    """Loads and saves the journal cursors of every unit; never raises."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, FILE_NAME)
        self.error = ""
        self._saved: dict[str, str] = {}

    def load(self) -> dict[str, str]:
        """The persisted cursors ({} when there is no file or it cannot be read)."""
        try:
            with open(self.path, "rb") as handle:
                raw = handle.read(MAX_FILE_BYTES + 1)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            self._fail(f"cannot read {self.path}: {exc.strerror or exc}")
            return {}
        if len(raw) > MAX_FILE_BYTES:
            self._fail(f"{self.path} is larger than {MAX_FILE_BYTES} bytes; ignored")
            return {}
        self._saved = parse(raw.decode("utf-8", "replace"))
        return dict(self._saved)

    def save(self, cursors: Mapping[str, str]) -> bool:
        """Write the cursors atomically when they changed; False (and .error) on failure."""
        wanted = {u: c for u, c in cursors.items() if valid_cursor(c)}
        if wanted == self._saved:
            return True
        directory = os.path.dirname(self.path) or "."
        tmp = ""
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".journal-cursors.", dir=directory)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(render(wanted))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
            tmp = ""
        except OSError as exc:  # read-only or full disk: keep counting from memory
            self._fail(f"cannot save journal cursors to {self.path}: {exc.strerror or exc}")
            return False
        finally:
            if tmp:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
        self._saved = wanted
        if self.error:
            log.info("journal cursors saved again to %s", self.path)
        self.error = ""
        return True

    def _fail(self, message: str) -> None:
        if message != self.error:
            log.warning("%s", message)
        self.error = message
