"""Plant each known rule bug by hand, one at a time, run the unit tests, and say which are
caught: the spot-check behind "every rule has a test that fails when it is changed".

    .venv/bin/python tests/mutation/planted_bugs.py [ROOT]   # ROOT: a checkout (default: here)

A bug whose code is not in ROOT (an older checkout) is reported as "n/a". Not part of CI.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# (name, file, text in the code, text planted instead); several pairs may be given.
BUGS: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("column_type drift downgraded to a warning", "agent/checks/schema.py",
     [('BREAKING = {"missing_table", "missing_column", "column_type"}',
       'BREAKING = {"missing_table", "missing_column"}')]),
    ("env_file_malformed never reported", "agent/checks/unit.py",
     [("        for warning in state.warnings:", "        for warning in ():")]),
    ("env_file_unreadable reported as info", "agent/checks/unit.py",
     [('"env_file_unreadable", "critical"', '"env_file_unreadable", "info"')]),
    ("warning-only findings exit 0", "agent/cli/render.py",
     [('if any(f.get("severity") in ("critical", "warning")',
       'if any(f.get("severity") in ("critical",)'),
      ('return any(f.severity in ("critical", "warning") for f in report.findings)',
       'return any(f.severity in ("critical",) for f in report.findings)')]),
    ("unknown revision only seen in the first row", "agent/checks/migrations.py",
     [("unknown = tuple(r for r in current_t if r not in known)",
       "unknown = tuple(r for r in current_t[:1] if r not in known)")]),
    ("probe child's own refusal to run as uid 0 removed", "agent/asuser/probe_child.py",
     [("        if os.getuid() == 0 or os.geteuid() == 0:", "        if False:")]),
    ("python3.11 -m gunicorn not recognised", "agent/execstart.py",
     [('r"python(\\d+(\\.\\d+)?)?"', 'r"python3?"')]),
    ("negative timeouts accepted", "agent/config.py",
     [("    if value < 0 or (value == 0 and not zero_ok):",
       "    if value == 0 and not zero_ok:"),
      ("        if getattr(config, name) < 0 or (name != \"min_interval_seconds\"",
       "        if False and (name != \"min_interval_seconds\"")]),
    ("a failed partial re-inspection never retried", "agent/daemon/collector_cache.py",
     [("self._dirty.update(flight.units)   # retried", "pass  # retried")]),
    ("secret left visible for an empty user (redis://:pw@h)", "agent/secrets.py",
     [(r'''[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*:)''',
       r'''[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]+:)''')]),
    ("upper-case ?PASSWORD= left visible", "agent/secrets.py",
     [('if is_secret_name(m.group("name")) and m.group("pw")',
       'if m.group("name").endswith("password") and m.group("pw")'),
      ('(?P<head>[?&][A-Za-z_]*password=)(?P<pw>[^&\\s]*)", re.IGNORECASE)',
       '(?P<head>[?&][A-Za-z_]*password=)(?P<pw>[^&\\s]*)")')]),
    ("secret-named variable holding a URL shown", "agent/secrets.py",
     [("    if is_secret_name(name):\n        return MASK if value else value",
       "    if is_secret_name(name) and \"://\" not in value:\n        return MASK if value "
       "else value"),
      ("    if is_secret_name(name) and not _is_plain_url_without_password(value):",
       "    if is_secret_name(name) and \"://\" not in value:")]),
    ("password containing '@' partly shown", "agent/secrets.py",
     [("(?P<pw>\\S*)(?=@)", "(?P<pw>[^@\\s]*)(?=@)")]),
    ("multiple_heads always critical", "agent/checks/migrations.py",
     [('"multiple_heads", "critical" if s.pending else "warning"',
       '"multiple_heads", "critical"')]),
    ("migrations no longer an essential check (exit 2)", "agent/cli/render.py",
     [('ESSENTIAL_CHECKS = ("unit", "app_load", "database", "migrations")',
       'ESSENTIAL_CHECKS = ("unit", "app_load", "database")')]),
    ("migration_in_progress paged as a warning", "agent/checks/migrations.py",
     [('"migration_in_progress", "info"', '"migration_in_progress", "warning"')]),
    ("venv_mismatch only a warning", "agent/checks/unit.py",
     [('"venv_mismatch", "critical"', '"venv_mismatch", "warning"')]),
    ("migration graph problems ignored", "agent/checks/migrations.py",
     [("    if s.graph_errors:\n        out.append(", "    if False:\n        out.append(")]),
    ("drift remedy ignores pending migrations", "agent/checks/schema.py",
     [("    if pending:\n        cause", "    if False:\n        cause")]),
    ("insufficient_db_privileges silent for a superuser-less owner problem",
     "agent/checks/migrations.py",
     [("if superuser or (can_create and not not_owned):", "if superuser or can_create:")]),
    ("terminal escapes passed through", "agent/cli/render.py",
     [("    if text.isprintable():\n        return text\n    out = []",
       "    if True:\n        return text\n    out = []")]),
    ("nan timeouts accepted", "agent/config.py",
     [("    if not math.isfinite(value):", "    if math.isinf(value):")]),
    ("crash loop not named", "agent/checks/unit.py",
     [('    if props.sub_state == "auto-restart":', '    if False:')]),
    ("missing ExecStart program not named", "agent/checks/unit.py",
     [("        if facts.exists.get(command.path) is False:", "        if False:")]),
    ("libpq key=value password shown", "agent/secrets.py",
     [("        if is_secret_name(m.group(\"name\")) else m.group(0), masked)\n    return",
       "        if False else m.group(0), masked)\n    return"),
      ("    for secret in _parsed_passwords(original):", "    for secret in []:")]),
]


def plant(root: Path, file: str, pairs: list[tuple[str, str]]) -> str | None:
    """Apply the first pair whose text is in the file; the original text, or None."""
    path = root / file
    text = path.read_text()
    applied = text
    for old, new in pairs:
        if old in applied:
            applied = applied.replace(old, new, 1)
    if applied == text:
        return None
    path.write_text(applied)
    return text


def main(argv: list[str]) -> int:
    """Run every planted bug; print caught / missed / n/a and the totals."""
    here = Path(__file__).resolve().parents[2]
    root = Path(argv[0]).resolve() if argv else here
    python = str(here / ".venv" / "bin" / "python")
    env = {**os.environ, "PYTHONPATH": str(root), "DRIFTWATCH_HYPOTHESIS_PROFILE": "mutation"}
    caught = missed = 0
    for name, file, pairs in BUGS:
        original = plant(root, file, pairs)
        if original is None:
            print(f"n/a     {name}")
            continue
        try:
            proc = subprocess.run([python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                   "tests/unit"], cwd=root, env=env, capture_output=True,
                                  text=True, timeout=600)
        finally:
            (root / file).write_text(original)
        if proc.returncode == 0:
            missed += 1
            print(f"MISSED  {name}")
        else:
            caught += 1
            print(f"caught  {name}")
    print(f"planted bugs caught by the unit tests: {caught} of {caught + missed}")
    return 0 if missed == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
