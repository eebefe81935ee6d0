"""Pure: the text and JSON forms agentctl prints (context, check, status) and exit codes."""

from __future__ import annotations

import shlex
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TextIO

from agent.checks.schema import describe as describe_drift
from agent.privileged.inspection import UnitReport
from agent.secrets import mask_argv
from agent.snapshot import UnitSnapshot

EXIT_OK, EXIT_PROBLEMS, EXIT_ERROR = 0, 1, 2
SEVERITY_MARK = {"critical": "✗", "warning": "!", "info": "·"}
# Checks without which a unit cannot be judged at all: their failure is exit code 2.
ESSENTIAL_CHECKS = ("unit", "app_load", "database", "migrations")


_C_ESCAPES = {"\a": "\\a", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\v": "\\v",
              "\f": "\\f", "\r": "\\r"}


def escape_terminal(text: str) -> str:
    """TEXT with every non-printable character C-escaped, as systemctl shows unit text: an
    app-controlled string (a message, a path, a revision id) never drives root's terminal."""
    if text.isprintable():
        return text
    out = []
    for char in text:
        if char.isprintable():
            out.append(char)
        elif char in _C_ESCAPES:
            out.append(_C_ESCAPES[char])
        else:
            code = ord(char)
            out.append(f"\\x{code:02x}" if code < 0x100 else
                       f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)


def _escaped(data: Any) -> Any:
    """Every string inside DATA (dicts, lists, tuples) escaped for the terminal."""
    if isinstance(data, str):
        return escape_terminal(data)
    if isinstance(data, dict):
        return {k: _escaped(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(_escaped(v) for v in data)
    return data


def render_findings(findings: Iterable[Mapping[str, Any]], out: TextIO, indent: str = "    ",
                    prefix: str = "") -> None:
    """Each finding on one line, its remedy on the next."""
    for f in _escaped([dict(f) for f in findings]):
        out.write(f"{prefix}{indent}{SEVERITY_MARK.get(f['severity'], '?')} [{f['severity']}] "
                  f"{f['check']}: {f['message']}\n")
        if f.get("remedy"):
            out.write(f"{indent}    fix: {f['remedy']}\n")


def has_problems(report: UnitReport) -> bool:
    """True when any finding is a warning or worse."""
    return any(f.severity in ("critical", "warning") for f in report.findings)


def render_context(report: UnitReport, out: TextIO) -> None:
    """The human form of agentctl context, in the spirit of systemctl status."""
    p, c = report.props, report.context
    since = (f" since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(p.exec_main_start_timestamp))}"
             if p.exec_main_start_timestamp and p.active_state == "active" else "")
    rows: list[tuple[str, str]] = [
        ("state", f"{p.active_state} ({p.sub_state}){since}"),
        ("unit file", p.fragment_path + "".join(f"\n+ {d}" for d in p.drop_in_paths)),
        ("user", (c.user or "root") + (f", group {c.group}" if c.group else "")
         + (f", groups {' '.join(c.supplementary_groups)}" if c.supplementary_groups else "")),
        ("working dir", c.working_directory + (" (optional)" if c.working_directory_optional
                                               else "")),
        ("exec start", shlex.join(mask_argv(c.exec_start))),
        ("app", c.launch.app_spec or "?"),
        ("venv", f"{c.venv} ({c.venv_source})" if c.venv else "none found"),
        ("python", c.python or "?"),
    ]
    for state in c.environment_files:
        status = "present" if state.exists else (state.error or "missing")
        rows.append(("env file", f"{'-' if state.optional else ''}{state.path}: {status}"
                     + (f", {len(state.variables)} variables" if state.exists else "")))
    rows.append(("environment", ", ".join(c.environment) or "(none)"))
    rows.append(("main pid", str(c.main_pid or "-")))
    for proc in report.processes:
        detail = f"{proc.role} {proc.pid}: venv {proc.venv or '?'}, cwd {proc.cwd or '?'}"
        rows.append(("process", detail + (f" ({proc.error})" if proc.error else "")))
    out.write(f"● {escape_terminal(c.unit)}\n")
    for label, value in rows:
        # Only our own "\n+ drop-in" joins are line breaks; everything else is escaped.
        lines = [escape_terminal(line) for line in value.split("\n")]
        out.write(f"  {label:>12}: {lines[0]}\n")
        for extra in lines[1:]:
            out.write(f"  {'':>12}  {extra}\n")
    if not report.findings:
        out.write("  findings: none\n")
        return
    out.write("  findings:\n")
    render_findings((f.as_dict() for f in report.findings), out)


def exit_code(units: Sequence[UnitSnapshot]) -> int:
    """2 when a unit could not be inspected, 1 when any has problems, else 0."""
    return exit_code_of_dicts([u.as_dict() for u in units])


def not_inspectable(unit: UnitSnapshot) -> bool:
    """The unit, its app or its database could not be looked at."""
    return any(not c.success for c in unit.checks if c.name in ESSENTIAL_CHECKS)


def check_json(u: UnitSnapshot) -> dict[str, object]:
    """The documented JSON shape of one unit in agentctl check --json."""
    m = u.migrations
    return {
        "unit": u.unit, "active_state": u.active_state, "database": u.database,
        "backend": u.backend, "notes": list(u.notes),
        "app_loaded": u.app_loaded, "db_up": u.db_up,
        "migrations": None if m is None else {
            "current": list(m.current), "heads": list(m.heads), "pending": list(m.pending),
            "multiple_heads": m.multiple_heads, "unknown": list(m.unknown),
            "version_table": m.version_table_present, "in_progress": m.in_progress,
            "current_readable": m.current_readable},
        "schema_drift": None if u.schema_drift is None else {
            "count": len(u.schema_drift),
            "items": [{"kind": d.kind, "table": d.table, "name": d.name}
                      for d in u.schema_drift]},
        "needs_restart": u.needs_restart, "database_mismatch": u.database_mismatch,
        "database_connections": u.database_connections,
        "migration_privileges_ok": u.migration_privileges_ok,
        "checks": [{"name": c.name, "success": c.success, "seconds": c.duration_seconds,
                    "error": c.error} for c in u.checks],
        "findings": [f.as_dict() for f in u.findings],
    }


def render_check(units: Sequence[UnitSnapshot], out: TextIO) -> None:
    """A compact table, then each finding with its remedy."""
    header = ("UNIT", "BACKEND", "DATABASE", "CURRENT", "HEAD", "PENDING", "DRIFT", "RESTART",
              "STATE")
    rows = [header]
    for u in units:
        m = u.migrations
        rows.append((
            u.unit, u.backend or "-", u.database or "-",
            "(locked)" if m and not m.current_readable else
            ",".join(m.current) or "(none)" if m else "?",
            ",".join(m.heads) or "-" if m else "?",
            "?" if m is None or not m.current_readable else
            str(len(m.pending)) if not m.unknown else "unknown",
            "?" if u.schema_drift is None else str(len(u.schema_drift)),
            "yes" if u.needs_restart else "no",
            "cannot inspect" if not_inspectable(u) else
            ("problems" if u.has_problems else "ok")))
    rows = [tuple(escape_terminal(cell) for cell in row) for row in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for row in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() + "\n")
    for u in units:
        for check in u.checks:
            if not check.success:
                out.write(escape_terminal(f"{u.unit}: could not run check {check.name}: "
                                          f"{check.error}") + "\n")
        render_findings((f.as_dict() for f in u.findings), out, indent="",
                        prefix=f"{escape_terminal(u.unit)}: ")


def format_age(seconds: float) -> str:
    """A short human age: '4s', '2m 5s', '3h 10m', '2d 4h'."""
    s = max(0, int(seconds))
    for size, unit, sub_size, sub_unit in ((86400, "d", 3600, "h"), (3600, "h", 60, "m"),
                                           (60, "m", 1, "s")):
        if s >= size:
            rest = (s % size) // sub_size
            return f"{s // size}{unit}" + (f" {rest}{sub_unit}" if rest else "")
    return f"{s}s"


def _checks_failed(unit: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in unit.get("checks") or [] if not c.get("success")]


def exit_code_of_dicts(units: Sequence[dict[str, Any]]) -> int:
    """exit_code() for snapshot dicts (as /status serves them)."""
    if any(c.get("name") in ESSENTIAL_CHECKS for u in units for c in _checks_failed(u)):
        return EXIT_ERROR
    if any(f.get("severity") in ("critical", "warning") for u in units
           for f in u.get("findings") or []):
        return EXIT_PROBLEMS
    return EXIT_OK


def unit_state_word(unit: dict[str, Any]) -> str:
    """'ok', 'problems' or 'cannot inspect', as in the check table."""
    code = exit_code_of_dicts([unit])
    return {EXIT_OK: "ok", EXIT_PROBLEMS: "problems", EXIT_ERROR: "cannot inspect"}[code]


def status_rows(unit: dict[str, Any], now: float) -> list[tuple[str, str]]:
    """Label/value rows of one unit: revisions, drift, venv, environment, database, age."""
    rows: list[tuple[str, str]] = []
    state = unit.get("active_state") or ("?" if not unit.get("unit_up") else "active")
    if unit.get("main_pid"):
        state += f" (MainPID {unit['main_pid']}"
        if unit.get("started_at"):
            state += f", up {format_age(now - unit['started_at'])}"
        state += ")"
    rows.append(("state", state))
    m = unit.get("migrations")
    if m is None:
        rows.append(("revision", "unknown"))
    else:
        current = ", ".join(m["current"]) or "(none)" if m.get("current_readable", True) \
            else "not readable now (a migration holds the version table)"
        heads = ", ".join(m["heads"]) or "(none)"
        if m.get("in_progress"):
            pend = "a migration is running now"
        elif m.get("unknown"):
            pend = f"unknown to the code: {', '.join(m['unknown'])}"
        elif m["pending"]:
            pend = f"{len(m['pending'])} pending ({', '.join(m['pending'])})"
        else:
            pend = "up to date"
        extra = " [multiple heads]" if m.get("multiple_heads") else ""
        table = "" if m.get("version_table_present", True) else \
            f" [no {m.get('version_table') or 'alembic_version'} table]"
        rows.append(("revision", f"{current}, head {heads}: {pend}{extra}{table}"))
    pre = unit.get("preflight")  # agent/preflight/watch.py summary
    if pre and pre.get("error"):
        rows.append(("preflight", pre["error"]))
    elif pre and pre.get("revisions"):
        worst = next((r for r in pre["revisions"] if r.get("risk") == pre.get("risk")),
                     pre["revisions"][0])
        rows.append(("preflight", f"{pre.get('risk', '?')}: {worst.get('revision', '?')}: "
                                  f"{worst.get('reason', '')}"))
    drift = unit.get("schema_drift")
    if drift is None and m is not None and m.get("in_progress"):
        rows.append(("drift", "held back while a migration runs"))
    elif drift is None:
        rows.append(("drift", "not compared"))
    elif not drift:
        rows.append(("drift", "none (schema matches the models)"))
    else:
        names = ", ".join(describe_drift(d) for d in drift[:3])
        rows.append(("drift", f"{len(drift)} difference(s): {names}"
                              + (", ..." if len(drift) > 3 else "")))
    venv = unit.get("venv") or "none found"
    rows.append(("venv", venv + (" (the running processes use another)"
                                 if unit.get("venv_mismatch") else "")))
    stale = unit.get("stale_environment_variables") or 0
    env = (f"{stale} variable(s) changed since the processes started" if stale
           else "as the running processes have it")
    if unit.get("needs_daemon_reload"):
        env += "; unit file changed on disk (daemon-reload needed)"
    if unit.get("needs_restart"):
        env += "; restart needed"
    rows.append(("environment", env))
    db = unit.get("database") or "unknown"
    db += f" ({unit['backend']})" if unit.get("backend") else ""
    up = unit.get("db_up")
    db += "" if up is None else (", reachable" if up else ", UNREACHABLE")
    if unit.get("database_mismatch"):
        db += f"; workers connected elsewhere: {unit.get('database_connections', '')}"
    rows.append(("database", db))
    if unit.get("timestamp"):
        rows.append(("last check", f"{format_age(now - unit['timestamp'])} ago"))
    return rows


def render_status(data: dict[str, Any], source: dict[str, Any], out: TextIO,
                  now: float) -> None:
    """systemctl-status-like blocks, one per unit, each finding with its remedy."""
    data, source = _escaped(data), _escaped(source)
    if source["kind"] == "agent":
        agent = data.get("agent") or {}
        version = f" {agent['version']}" if agent.get("version") else ""
        taken = (f", snapshot taken {format_age(now - data['taken_at'])} ago"
                 if data.get("taken_at") else "")
        out.write(f"from the driftwatch agent{version} on {source['address']}{taken}\n")
    else:
        out.write(f"{source['reason']}; checked locally\n")
    for error in data.get("errors") or []:
        out.write(f"error: {error}\n")
    for unit in data.get("units") or []:
        mark = {"ok": "●", "problems": "✗", "cannot inspect": "?"}[unit_state_word(unit)]
        out.write(f"{mark} {unit['unit']} - {unit_state_word(unit)}\n")
        for label, value in status_rows(unit, now):
            out.write(f"  {label:>11}: {value}\n")
        for check in _checks_failed(unit):
            out.write(f"  {'':>11}  could not run check {check['name']}: {check['error']}\n")
        findings = unit.get("findings") or []
        out.write(f"  {'findings':>11}: {'none' if not findings else len(findings)}\n")
        render_findings(findings, out)
