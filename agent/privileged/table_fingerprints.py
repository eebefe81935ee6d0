"""Per-table catalog fingerprints from a probe's report: validated as plain data, then handed
back to the next probe of the same code so it compares only the tables whose catalog changed.

The report is written by the app's user (hostile input): the fingerprints are kept only when
every part has the exact shape the probe writes (bounded counts and lengths, hex digests);
anything else is refused as a whole, and the next check compares every table.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

MAX_BINDS = 16
MAX_TABLES = 20000
MAX_NAME = 128
# Bound on what is handed back: the request travels in an environment variable when the
# probe runs without a transient unit (Linux caps one at 128 KiB).
MAX_PREVIOUS_BYTES = 100_000
DIGEST = re.compile(r"[0-9a-f]{32}")
BASIS = re.compile(r"[0-9a-f]{64}")
DIFF_KEYS = ("kind", "table", "name", "detail", "bind")

Fingerprints = dict[str, dict[str, Any]]


def _name(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_NAME


def from_report(value: Any) -> Fingerprints:
    """{bind: {"basis": hex64, "tables": {name: hex32}}} exactly, or {} (refused whole)."""
    if not isinstance(value, dict) or len(value) > MAX_BINDS:
        return {}
    out: Fingerprints = {}
    total = 0
    for bind, entry in value.items():
        if not _name(bind) or not isinstance(entry, dict) or set(entry) != {"basis", "tables"}:
            return {}
        basis, tables = entry["basis"], entry["tables"]
        if not isinstance(basis, str) or not BASIS.fullmatch(basis) or \
                not isinstance(tables, dict):
            return {}
        total += len(tables)
        if total > MAX_TABLES:
            return {}
        for name, digest in tables.items():
            if not _name(name) or not isinstance(digest, str) or not DIGEST.fullmatch(digest):
                return {}
        out[bind] = {"basis": basis, "tables": dict(tables)}
    return out


def previous_check(fingerprints: Mapping[str, Mapping[str, Any]],
                   diff: Sequence[Mapping[str, Any]] | None) -> dict[str, Any] | None:
    """What the next probe of the same code gets: the fingerprints and the diff they go
    with; None (compare everything) when there are none, an entry is not plain text, or it
    would be too large to pass."""
    if not fingerprints or diff is None:
        return None
    entries = []
    for entry in diff:
        if not all(isinstance(entry.get(k), str) for k in DIFF_KEYS):
            return None
        entries.append({k: entry[k] for k in DIFF_KEYS})
    doc = {"tables": {b: {"basis": v["basis"], "tables": dict(v["tables"])}
                      for b, v in fingerprints.items()}, "diff": entries}
    if len(json.dumps(doc)) > MAX_PREVIOUS_BYTES:
        return None
    return doc
