"""Units are independent: whatever one unit's app controls fails that unit only.

A property-based test feeds hostile values of everything the app's user controls (the
database URL, environment values, ExecStart, WorkingDirectory, migration files as the probe
reports them, revision ids in the version table, the probe's output and report, env.py's
version table) through a whole `agentctl check` of two units: the hostile one beside a
healthy one. The I/O edges are literal fakes (systemd, the probe child, the database
session, DNS, the journal); everything between them is the real code.
"""

from __future__ import annotations

import contextlib
import atexit
import shutil
import io
import json
import os
import string
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.cli import main as cli
from agent.privileged.inspector import Inspector, InspectorSettings
from agent.daemon.metrics import snapshot_families
from agent.model import ExecCommand, UnitProperties
from agent.privileged.probe_runner import ProbeResult, parse_report
from agent.cli.render import render_check
from agent.snapshot import Snapshot
from agent.privileged.sources import connections, database, mysql
from agent.privileged.sources.journal import JournalScan
from agent.privileged.state import StateStore

HEALTHY, HOSTILE = "healthy.service", "hostile.service"
HEALTHY_URL = "postgresql+psycopg2://app:s3cret-pw@127.0.0.1:5432/app"


def _fake_venv() -> str:
    """A directory whose bin/gunicorn and bin/python exist: a missing ExecStart program is a
    finding of its own (exec_start_missing), which these tests are not about."""
    root = Path(tempfile.mkdtemp(prefix="driftwatch-fake-venv-"))
    atexit.register(shutil.rmtree, root, True)
    (root / "bin").mkdir()
    for name in ("gunicorn", "python"):
        (root / "bin" / name).write_text("#!/bin/sh\nexit 0\n")
        (root / "bin" / name).chmod(0o755)
    return str(root)


VENV = _fake_venv()
REVISIONS = [{"revision": r, "down_revisions": [d] if d else [], "branch_labels": [],
              "path": f"/srv/app/migrations/versions/{r}.py", "sha256": ""}
             for r, d in (("r1", None), ("r2", "r1"), ("r3", "r2"))]
HEALTHY_REPORT = {"protocol": 1, "ok": True, "urls": {"default": HEALTHY_URL},
                  "revisions": REVISIONS, "heads": ["r3"], "schema_diff": [],
                  "migrations_dir": "/srv/app/migrations", "chdir": "/srv/app",
                  "alembic_env": {"drift_source": "env.py", "version_table": "alembic_version"}}


def props(name: str, environment: tuple[str, ...] = (), argv: tuple[str, ...] = (),
          working_directory: str = "/srv/app") -> UnitProperties:
    """A running gunicorn unit as systemd would describe it (no processes to look at)."""
    argv = argv or (f"{VENV}/bin/gunicorn", "--bind", "127.0.0.1:8000", "wsgi:app")
    return UnitProperties(
        name=name, load_state="loaded", active_state="active", sub_state="running",
        environment=environment, working_directory=working_directory,
        exec_start=(ExecCommand(argv[0], argv),), user="www-data", group="www-data")


class FakeSystemd:
    """systemd over D-Bus, as literal data."""

    def __init__(self, units: dict[str, UnitProperties]) -> None:
        self.units = units

    def read_unit(self, name: str) -> UnitProperties:
        return self.units[name]

    def discover(self, *args: Any, **kw: Any) -> list[str]:
        return list(self.units)

    def close(self) -> None:
        pass


class FakeJournal:
    """The unit's journal: nothing new."""

    def __init__(self, unit: str, **kw: Any) -> None:
        self.unit = unit

    def read(self) -> JournalScan:
        return JournalScan(self.unit, {})


def fake_mysql(url: str, table: str = "alembic_version", *args: Any,
               **kwargs: Any) -> mysql.MysqlInspection:
    """mysql.inspect_mysql for a server that does not answer."""
    label = database.db_label(url)
    error = f"database {label} unreachable: connection refused"
    return mysql.MysqlInspection(database.DatabaseInspection(
        label, database.VersionTable(label, table, error=error),
        database.MigrationActivity(label, error=error), database.Privileges(label, error=error),
        database.ServerIdentity(label, error=error), error=error),
        mysql.MysqlPrivileges(error=error))


def fake_database(rows: dict[str, Any]) -> Any:
    """database.inspect with the real URL handling and literal version-table rows."""
    def inspect(url: str, table: str = "alembic_version", schema: str | None = None,
                timeouts: database.Timeouts = database.DEFAULT_TIMEOUTS, opener: Any = None,
                ) -> database.DatabaseInspection:
        label = database.db_label(url)
        try:
            database._connect_args(database.agent_url(url), timeouts)
        except ValueError as exc:
            error = f"database {label}: {exc}"
            return database.DatabaseInspection(
                label, database.VersionTable(label, table, error=error),
                database.MigrationActivity(label, error=error),
                database.Privileges(label, error=error),
                database.ServerIdentity(label, error=error), error=error)
        found = rows.get(url, ("r3",))
        return database.DatabaseInspection(
            label, database.VersionTable(label, table, found is not None,
                                         tuple(found or ())),
            database.MigrationActivity(label),
            database.Privileges(label, user="app", schema="public", can_create=True,
                                can_use=True),
            database.ServerIdentity(label))
    return inspect


def fake_probe(reports: dict[str, bytes]) -> Any:
    """run_probe: the child's raw report for each unit, through the real parser."""
    def probe(ctx: Any, request: Any, timeout: float) -> ProbeResult:
        raw = reports[ctx.unit]
        return parse_report(raw, 0, "noise\x1b[2J\n", timed_out=False, timeout=timeout,
                            duration=0.1)
    return probe


@contextlib.contextmanager
def fakes(monkeypatch: pytest.MonkeyPatch, rows: dict[str, Any]) -> Iterator[None]:
    with monkeypatch.context() as m:
        m.setattr(database, "inspect", fake_database(rows))
        # MySQL is read through a session child: never started from a unit test.
        m.setattr(mysql, "inspect_mysql", fake_mysql)
        # No DNS for hostile host names: only literals resolve.
        m.setattr(connections, "resolve_host", lambda host, port=5432:
                  connections.literal_addresses(host))
        m.setattr("agent.privileged.inspector.JournalReader", FakeJournal)
        yield


def run_check(units: dict[str, UnitProperties], reports: dict[str, bytes],
              monkeypatch: pytest.MonkeyPatch, rows: dict[str, Any] | None = None,
              ) -> tuple[int, str, str, Snapshot]:
    """agentctl check --json, then the text form, of every unit; (code, out, err, snapshot)."""
    snapshots: list[Snapshot] = []
    with tempfile.TemporaryDirectory() as state_dir, fakes(monkeypatch, rows or {}):
        def make_inspector(args: Any, systemd: Any) -> Inspector:
            inspector = Inspector(InspectorSettings(state_path=f"{state_dir}/state.db"),
                                  systemd=systemd, state=StateStore(f"{state_dir}/state.db"),
                                  probe=fake_probe(reports))
            original = inspector.inspect

            def inspect(names: Any = None) -> Snapshot:
                snapshots.append(original(names))
                return snapshots[-1]
            inspector.inspect = inspect  # type: ignore[method-assign]
            return inspector
        monkeypatch.setattr(cli, "make_inspector", make_inspector)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err):
            code = cli.main(["check", *units, "--json"], out=out,
                            systemd=FakeSystemd(units))  # type: ignore[arg-type]
            text = io.StringIO()
            assert cli.main(["check", *units], out=text,
                            systemd=FakeSystemd(units)) == code  # type: ignore[arg-type]
    return code, out.getvalue() + text.getvalue(), err.getvalue(), snapshots[0]


def essentials(snapshot: Snapshot, name: str) -> Any:
    """What must not change for the healthy unit, whatever its neighbour does."""
    unit = next(u for u in snapshot.units if u.unit == name)
    return (unit.database, unit.app_loaded, unit.db_up, unit.migrations, unit.schema_drift,
            sorted((f.check, f.severity, f.message) for f in unit.findings),
            sorted((c.name, c.success, c.error) for c in unit.checks))


# -- hostile values --------------------------------------------------------------------------

text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)),
               max_size=80)
ids = st.one_of(st.sampled_from(["r1", "r2", "r3", "", " ", "r3\x00", "../../etc/passwd",
                                 "'; DROP TABLE users; --", "\x1b[31mred", "r" * 300]), text)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), text),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(text, inner, max_size=4)), max_leaves=12)
urls = st.one_of(
    st.sampled_from([
        "postgresql://app:pw@db.example:5432x/app",      # the issue's malformed port
        "postgresql://app:pw@[::1/app", "postgresql://", "postgresql:///", "mysql://a@b/c",
        "postgresql://app:pw@127.0.0.1:99999/app", "postgresql://a:b@h/d?options=-c%20x",
        "postgresql://app:pw@/app?host=/run/postgresql&port=abc", "sqlite:///:memory:",
        "postgresql://app:p%ZZw@127.0.0.1/app", "\x00", "", "x" * 5000]),
    text.map(lambda t: "postgresql://u:p@" + t),
    text)
revision_dicts = st.lists(st.one_of(
    st.fixed_dictionaries({"revision": ids, "down_revisions": st.one_of(
        st.lists(ids, max_size=3), ids, st.none(), json_values)}),
    json_values), max_size=6)
diff_entries = st.lists(st.one_of(
    st.fixed_dictionaries({"kind": st.one_of(st.sampled_from(
        ["add_table", "remove_column", "modify_type", "weird"]), text),
        "table": text, "name": text, "detail": text}),
    json_values), max_size=5)
env_values = st.lists(st.one_of(
    st.sampled_from(["DATABASE_URL=postgresql://app:pw@h:5432x/db", "=x", "A", "\x00=1",
                     "PATH=", "FLASK_APP=../../../../etc/passwd"]),
    st.builds(lambda k, v: f"{k}={v}", st.text(string.ascii_uppercase + "_", min_size=1,
                                               max_size=8), text)), max_size=5)
argvs = st.one_of(
    st.sampled_from([("/bin/sh", "-c", "exec gunicorn 'wsgi:app"), ("gunicorn",),
                     ("/x/gunicorn", "--bind"), ("/x/gunicorn", "-c", "\x00"),
                     ("/x/python", "-m", "gunicorn", "a:b(", "--chdir")]),
    st.lists(text, min_size=1, max_size=5).map(tuple))
reports = st.one_of(
    st.fixed_dictionaries({
        "protocol": st.just(1), "ok": st.booleans(),
        "error": st.one_of(st.just(""), text), "error_kind": st.one_of(
            st.sampled_from(["", "app_load", "database", "migrations", "timeout"]), text),
        "urls": st.one_of(st.fixed_dictionaries({"default": urls}),
                          st.dictionaries(text, urls, max_size=2), json_values),
        "revisions": st.one_of(revision_dicts, json_values),
        "heads": st.one_of(st.lists(ids, max_size=3), json_values),
        "schema_diff": st.one_of(st.none(), diff_entries, json_values),
        "chdir": st.one_of(text, st.just("/srv/app\x00"), json_values),
        "alembic_env": st.one_of(st.fixed_dictionaries({
            "drift_source": st.sampled_from(["env.py", "models", "x"]),
            "version_table": st.one_of(ids, json_values),
            "version_table_schema": st.one_of(ids, json_values),
            "options": json_values}), json_values),
        "versions": json_values, "raw_env": json_values,
    }).map(lambda d: json.dumps(d).encode()),
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()))
version_rows = st.one_of(st.none(), st.lists(ids, max_size=3).map(tuple))


# 60 examples take ~25 s; DRIFTWATCH_HYPOTHESIS_EXAMPLES=500 for a long run (~3.5 min).
@settings(max_examples=int(os.environ.get("DRIFTWATCH_HYPOTHESIS_EXAMPLES", "60")),
          deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(environment=env_values, argv=argvs, workdir=st.one_of(st.just("/srv/app"), text),
       report=reports, rows=version_rows)
def test_a_hostile_unit_fails_only_its_own_checks(
        monkeypatch: pytest.MonkeyPatch, environment: list[str], argv: tuple[str, ...],
        workdir: str, report: bytes, rows: tuple[str, ...] | None) -> None:
    healthy = json.dumps(HEALTHY_REPORT).encode()
    alone = run_check({HEALTHY: props(HEALTHY)}, {HEALTHY: healthy}, monkeypatch)[3]

    units = {HEALTHY: props(HEALTHY),
             HOSTILE: props(HOSTILE, tuple(environment), argv, workdir)}
    try:
        doc = json.loads(report)
        hostile_url = doc.get("urls", {}).get("default") if isinstance(doc, dict) and \
            isinstance(doc.get("urls"), dict) else None
    except ValueError:
        hostile_url = None
    code, out, err, snapshot = run_check(
        units, {HEALTHY: healthy, HOSTILE: report}, monkeypatch,
        rows={str(hostile_url): rows} if isinstance(hostile_url, str) else {})

    assert "Traceback" not in out + err
    assert code in (0, 1, 2)
    assert [u.unit for u in snapshot.units] == [HEALTHY, HOSTILE]
    # The neighbour is exactly as it is alone.
    assert essentials(snapshot, HEALTHY) == essentials(alone, HEALTHY)
    hostile = snapshot.units[1]
    assert all(isinstance(f.message, str) and f.message for f in hostile.findings)
    assert all(c.success or c.error for c in hostile.checks)
    assert "inspection_failed" not in {f.check for f in hostile.findings}, hostile.findings
    assert "s3cret-pw" not in out + err
    # Metrics and the text form are produced for both units, whatever the values.
    families = snapshot_families(snapshot)
    assert {s.labels.get("unit") for f in families for s in f.samples} >= {HEALTHY, HOSTILE}
    render_check(snapshot.units, io.StringIO())


def test_the_issue_malformed_url_beside_a_healthy_unit(monkeypatch: pytest.MonkeyPatch) -> None:
    """`...:5432x/db` used to raise out of the inspector and blank every unit."""
    healthy = json.dumps(HEALTHY_REPORT).encode()
    bad = json.dumps({**HEALTHY_REPORT, "urls": {
        "default": "postgresql://app:pw@db.example:5432x/app"}}).encode()
    code, out, err, snapshot = run_check({HEALTHY: props(HEALTHY), HOSTILE: props(HOSTILE)},
                                         {HEALTHY: healthy, HOSTILE: bad}, monkeypatch)
    assert "Traceback" not in out + err and code == 2
    ok, broken = snapshot.units
    assert ok.findings == () and all(c.success for c in ok.checks)
    assert ok.migrations is not None and ok.migrations.current == ("r3",)
    assert broken.database == "invalid-url" and broken.db_up is False
    finding = next(f for f in broken.findings if f.check == "database_unreachable")
    assert "not a valid database URL (the port is not a number)" in finding.message
    assert "pw" not in finding.message


def test_agentctl_prints_one_line_never_a_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    class Broken(FakeSystemd):
        def discover(self, *args: Any, **kw: Any) -> list[str]:
            raise KeyError("surprise")

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main(["check"], out=io.StringIO(), systemd=Broken({}))  # type: ignore[arg-type]
    assert code == 2
    assert err.getvalue() == "agentctl: internal error: KeyError: 'surprise'\n"


def test_a_unit_whose_inspection_raises_is_confined(monkeypatch: pytest.MonkeyPatch) -> None:
    """Even a bug confined to one unit leaves the others' snapshots fresh."""
    label = database.db_label

    def buggy_label(url: str) -> str:
        if "boom" in url:
            raise ZeroDivisionError("bug")
        return label(url)

    boom = json.dumps({**HEALTHY_REPORT, "urls": {"default": "postgresql://boom@h/x"}})
    with fakes(monkeypatch, {}), tempfile.TemporaryDirectory() as tmp:
        monkeypatch.setattr(database, "db_label", buggy_label)
        inspector = Inspector(InspectorSettings(state_path=f"{tmp}/s.db"),
                              systemd=FakeSystemd({HEALTHY: props(HEALTHY),  # type: ignore
                                                   HOSTILE: props(HOSTILE)}),
                              probe=fake_probe({HEALTHY: json.dumps(HEALTHY_REPORT).encode(),
                                                HOSTILE: boom.encode()}))
        snapshot = inspector.inspect([HEALTHY, HOSTILE])
    ok, broken = snapshot.units
    assert ok.findings == () and ok.migrations is not None
    assert [f.check for f in broken.findings] == ["inspection_failed"]
    assert not broken.checks[0].success and "ZeroDivisionError: bug" in broken.checks[0].error
