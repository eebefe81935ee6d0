"""The README's findings table, row by row: each finding's name, severity and remedy for the
literal input that must produce it, and its absence for the input that must not."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pytest

from agent.checks.migrations import Revision, activity_findings, evaluate, privilege_findings
from agent.checks.schema import BREAKING, KINDS, describe, drift_findings, drift_items
from agent.checks.unit import UnitFacts, unit_findings
from agent.context import ContextInputs, build_context
from agent.model import ExecCommand, Finding, ProcessInfo, UnitProperties
from agent.privileged.probe_runner import ProbeResult

UNIT = "gunicorn.service"
VENV = "/srv/app/venv"
UPGRADE = f"run `agentctl upgrade {UNIT} --restart`"


def props(**overrides: object) -> UnitProperties:
    """A healthy active unit with one required env file, a venv and a start time."""
    base: dict[str, object] = dict(
        name=UNIT, load_state="loaded", active_state="active", sub_state="running",
        environment=("FLASK_APP=wsgi.py",), environment_files=(("/etc/app.env", False),),
        working_directory="/srv/app",
        exec_start=(ExecCommand(f"{VENV}/bin/gunicorn", (f"{VENV}/bin/gunicorn", "wsgi:app")),),
        user="www-data", group="www-data", main_pid=10, exec_main_start_timestamp=1000.0)
    base.update(overrides)
    return UnitProperties(**base)  # type: ignore[arg-type]


ENV = {"FLASK_APP": "wsgi.py", "DATABASE_URL": "postgresql://a@b/c", "PATH": "/bin"}


def proc(pid: int = 10, role: str = "master", **overrides: object) -> ProcessInfo:
    base: dict[str, object] = dict(
        pid=pid, ppid=1, role=role, argv=(f"{VENV}/bin/gunicorn", "wsgi:app"),
        exe="/usr/bin/python3.11", cwd="/srv/app", create_time=1000.0, username="www-data",
        environ=dict(ENV), venv=VENV, venv_evidence="argv[0]")
    base.update(overrides)
    return ProcessInfo(**base)  # type: ignore[arg-type]


GOOD_FILE = b"DATABASE_URL=postgresql://a@b/c\n"
INPUTS = ContextInputs(env_files={"/etc/app.env": GOOD_FILE}, venvs={VENV: True})
FACTS = UnitFacts(realpaths={"/srv/app": "/srv/app", VENV: VENV},
                  newest_code=("/srv/app/models.py", 900.0), now=2000.0)


def findings_of(p: UnitProperties | None = None, procs: Sequence[ProcessInfo] | None = None,
                inputs: ContextInputs = INPUTS, facts: UnitFacts = FACTS) -> list[Finding]:
    p = p or props()
    return unit_findings(p, build_context(p, inputs), [proc()] if procs is None else procs,
                         facts)


def only(findings: Iterable[Finding], check: str) -> Finding:
    """The one finding named CHECK (fails when there are none or several)."""
    found = [f for f in findings if f.check == check]
    assert len(found) == 1, f"expected one {check}, got {[f.check for f in findings]}"
    return found[0]


def names(findings: Iterable[Finding]) -> list[str]:
    return [f.check for f in findings]


# -- the healthy baseline: nothing at all -------------------------------------------------
def test_healthy_unit_has_no_findings() -> None:
    assert findings_of() == []


# -- unit state --------------------------------------------------------------------------
def test_unit_failed() -> None:
    f = only(findings_of(props(active_state="failed", sub_state="failed", result="exit-code")),
             "unit_failed")
    assert f.severity == "critical"
    assert f.message == f"{UNIT} has failed (result: exit-code)"
    assert f.remedy == f"journalctl -u {UNIT} -n 100; fix the cause, then systemctl restart {UNIT}"


@pytest.mark.parametrize("state", ["inactive", "deactivating"])
def test_unit_not_active(state: str) -> None:
    f = only(findings_of(props(active_state=state, sub_state="dead")), "unit_not_active")
    assert (f.severity, f.remedy) == ("critical", f"systemctl start {UNIT}")
    assert f.message == f"{UNIT} is {state} (dead)"


@pytest.mark.parametrize("state", ["active", "reloading"])
def test_running_states_are_not_findings(state: str) -> None:
    assert names(findings_of(props(active_state=state))) == []


def test_needs_daemon_reload() -> None:
    f = only(findings_of(props(need_daemon_reload=True)), "needs_daemon_reload")
    assert f.severity == "warning"
    assert f.remedy == f"systemctl daemon-reload && systemctl restart {UNIT}"
    assert "needs_daemon_reload" not in names(findings_of(props(need_daemon_reload=False)))


# -- environment files -------------------------------------------------------------------
def test_env_file_missing_only_when_required() -> None:
    missing = ContextInputs(env_files={"/etc/app.env": None}, venvs={VENV: True})
    f = only(findings_of(procs=[], inputs=missing), "env_file_missing")
    assert f.severity == "critical"
    assert f.message == (f"EnvironmentFile /etc/app.env is required but no such file: "
                         f"the next start of {UNIT} will fail")
    assert f.remedy == "restore /etc/app.env or mark it optional with a '-' prefix"
    optional = props(environment_files=(("/etc/app.env", True),))
    assert findings_of(optional, procs=[], inputs=missing) == []


@pytest.mark.parametrize(("optional", "severity"), [(False, "critical"), (True, "warning")])
def test_env_file_invalid(optional: bool, severity: str) -> None:
    bad = ContextInputs(env_files={"/etc/app.env": b"A=1\0\n"}, venvs={VENV: True})
    p = props(environment_files=(("/etc/app.env", optional),))
    f = only(findings_of(p, inputs=bad), "env_file_invalid")
    assert (f.severity, f.remedy) == (severity, "fix /etc/app.env")


@pytest.mark.parametrize("optional", [False, True])
def test_env_file_unreadable_is_critical(optional: bool) -> None:
    unreadable = ContextInputs(env_files={"/etc/app.env": None},
                               env_file_errors={"/etc/app.env": "permission denied"},
                               venvs={VENV: True})
    p = props(environment_files=(("/etc/app.env", optional),))
    found = findings_of(p, inputs=unreadable)
    f = only(found, "env_file_unreadable")
    assert f.severity == "critical"
    assert f.message == "EnvironmentFile /etc/app.env cannot be read: permission denied"
    assert f.remedy == "check the permissions of /etc/app.env"
    assert "env_file_missing" not in names(found)


@pytest.mark.parametrize("line", [b"JUST_A_WORD", b"export A=1", b"1BAD=x",
                                  b"# comment \\\nSWALLOWED=1"])
def test_env_file_malformed(line: bytes) -> None:
    inputs = ContextInputs(env_files={"/etc/app.env": GOOD_FILE + line + b"\n"},
                           venvs={VENV: True})
    found = findings_of(inputs=inputs)
    f = only(found, "env_file_malformed")
    assert f.severity == "warning"
    assert f.message.startswith(("/etc/app.env: line 2", "/etc/app.env: line 3"))
    assert f.message.endswith("(systemd ignores that line)")
    assert f.remedy == "fix the line in /etc/app.env"


def test_clean_env_file_has_no_malformed_finding() -> None:
    inputs = ContextInputs(env_files={"/etc/app.env": GOOD_FILE + b"# c\n\nB='x y'\n"},
                           venvs={VENV: True})
    assert names(findings_of(procs=[], inputs=inputs)) == []


# -- running processes against the unit ----------------------------------------------------
def test_environment_stale_names_only() -> None:
    env = {**ENV, "DATABASE_URL": "postgresql://old:pw@b/c", "GONE": "1"}
    del env["FLASK_APP"]
    f = only(findings_of(procs=[proc(environ=env)]), "environment_stale")
    assert f.severity == "warning"
    assert f.remedy == f"systemctl restart {UNIT}"
    assert f.message == (f"the running processes of {UNIT} have an old environment (changed: "
                         "DATABASE_URL; new in the unit: FLASK_APP; gone from the unit: GONE)")
    assert "pw" not in f.message


def test_environment_stale_needs_a_difference() -> None:
    added_by_systemd = {**ENV, "INVOCATION_ID": "x", "LC_ALL": "C", "JOURNAL_STREAM": "1"}
    assert findings_of(procs=[proc(environ=added_by_systemd)]) == []
    # A worker's environment is not compared, only the master's.
    assert findings_of(procs=[proc(), proc(11, "worker", environ={})]) == []


def test_venv_mismatch() -> None:
    f = only(findings_of(procs=[proc(), proc(11, "worker", venv="/srv/old/venv")]),
             "venv_mismatch")
    assert f.severity == "critical"
    assert f.message == f"{UNIT} declares virtualenv {VENV} but worker 11 uses /srv/old/venv"
    assert f.remedy.startswith(f"systemctl restart {UNIT}")
    # A symlinked venv that resolves to the declared one is the same venv.
    facts = UnitFacts(realpaths={**FACTS.realpaths, "/srv/link": VENV}, now=2000.0)
    assert findings_of(procs=[proc(venv="/srv/link")], facts=facts) == []


def test_cwd_stale() -> None:
    facts = UnitFacts(realpaths={"/srv/app": "/srv/releases/2", VENV: VENV,
                                 "/srv/releases/1": "/srv/releases/1"}, now=2000.0)
    f = only(findings_of(procs=[proc(cwd="/srv/releases/1")], facts=facts), "cwd_stale")
    assert (f.severity, f.remedy) == ("warning", f"systemctl restart {UNIT}")
    assert "/srv/releases/1" in f.message and "/srv/releases/2" in f.message
    assert findings_of(procs=[proc(cwd="/srv/releases/2")], facts=facts) == []


def test_code_newer_than_process_with_a_second_of_slack() -> None:
    newer = UnitFacts(realpaths=FACTS.realpaths, newest_code=("/srv/app/models.py", 1001.5),
                      now=2000.0)
    f = only(findings_of(facts=newer), "code_newer_than_process")
    assert f.severity == "warning"
    assert f.remedy == f"systemctl restart {UNIT} (after flask db upgrade if migrations changed)"
    assert f.message == ("/srv/app/models.py changed 16m ago, after gunicorn.service started "
                         "16m ago: the workers run old code")
    same = UnitFacts(realpaths=FACTS.realpaths, newest_code=("/srv/app/models.py", 1001.0),
                     now=2000.0)
    assert findings_of(facts=same) == []


def test_process_checks_only_for_a_running_unit() -> None:
    stopped = props(active_state="inactive", sub_state="dead")
    found = findings_of(stopped, procs=[proc(venv="/other", cwd="/x", environ={})])
    assert names(found) == ["unit_not_active"]


# -- revision state ----------------------------------------------------------------------
LINEAR = [Revision("a"), Revision("b", ("a",)), Revision("c", ("b",))]
BRANCHED = [Revision("a"), Revision("b1", ("a",)), Revision("b2", ("a",))]


def test_version_table_missing() -> None:
    state = evaluate(UNIT, None, LINEAR)
    f = only(state.findings, "version_table_missing")
    assert f.severity == "critical"
    assert "(3 migration(s) not applied)" in f.message
    assert f.remedy == (f"check the database URL {UNIT} really uses (agentctl context {UNIT}); "
                        f"if it is the right database, {UPGRADE}")
    assert names(state.findings) == ["version_table_missing"]
    # An app without migrations needs no version table.
    assert evaluate(UNIT, None, []).findings == ()


def test_version_table_empty() -> None:
    f = only(evaluate(UNIT, [], LINEAR).findings, "version_table_empty")
    assert f.severity == "critical"
    assert "3 migration(s) not applied" in f.message
    assert "pending_migrations" not in names(evaluate(UNIT, [], LINEAR).findings)
    assert evaluate(UNIT, [], []).findings == ()


def test_pending_migrations() -> None:
    f = only(evaluate(UNIT, ["a"], LINEAR).findings, "pending_migrations")
    assert (f.severity, f.remedy) == ("critical", UPGRADE)
    assert f.message == (f"2 migration(s) not applied to the database of {UNIT}: at a, code "
                         "head c; pending, in order: b, c")
    assert evaluate(UNIT, ["c"], LINEAR).findings == ()


def test_multiple_heads_critical_only_with_pending_work() -> None:
    f = only(evaluate(UNIT, ["a"], BRANCHED).findings, "multiple_heads")
    assert f.severity == "critical"
    assert f.remedy.startswith("create a merge migration: flask db merge heads")
    f = only(evaluate(UNIT, ["b1", "b2"], BRANCHED).findings, "multiple_heads")
    assert f.severity == "warning"
    assert names(evaluate(UNIT, ["b1", "b2"], BRANCHED).findings) == ["multiple_heads"]


@pytest.mark.parametrize("current", [["zz"], ["c", "zz"], ["zz", "c"], ["a", "b", "zz"]])
def test_db_revision_unknown_in_any_row(current: list[str]) -> None:
    state = evaluate(UNIT, current, LINEAR)
    f = only(state.findings, "db_revision_unknown")
    assert f.severity == "critical"
    assert "holds revision zz, which no deployed migration script defines" in f.message
    assert f.remedy.startswith("deploy the missing migrations/versions files")
    assert state.unknown == ("zz",) and state.pending is None
    assert "pending_migrations" not in names(state.findings)


def test_several_known_rows_on_branches() -> None:
    state = evaluate(UNIT, ["b1", "a"], BRANCHED)
    assert state.unknown == () and state.pending == ("b2",)
    assert names(state.findings) == ["multiple_heads", "pending_migrations"]
    # Duplicate rows count once.
    assert evaluate(UNIT, ["c", "c"], LINEAR).current == ("c",)
    assert evaluate(UNIT, ["c", "c"], LINEAR).findings == ()


@pytest.mark.parametrize(("graph", "problem"), [
    ([Revision("a"), Revision("b", ("a",)), Revision("b", ("a",))], "revision id defined twice: b"),
    ([Revision("a"), Revision("b", ("x",))], "names down_revision x"),
    ([Revision("a", ("c",)), Revision("b", ("a",)), Revision("c", ("b",))], "has a cycle"),
])
def test_migration_graph_invalid_without_false_unknown(graph: list[Revision],
                                                       problem: str) -> None:
    state = evaluate(UNIT, ["b"], graph)
    f = only(state.findings, "migration_graph_invalid")
    assert f.severity == "critical" and problem in f.message
    assert f.remedy.startswith("deploy the complete migrations/versions directory")
    assert "db_revision_unknown" not in names(state.findings)


def test_migration_in_progress_is_info() -> None:
    (f,) = activity_findings(UNIT, [(42, 12.4, "holds a lock on alembic_version",
                                     "ALTER TABLE x")])
    assert (f.check, f.severity) == ("migration_in_progress", "info")
    assert f.message == (f"a migration is in progress on the database of {UNIT}: "
                         "pid 42 holds a lock on alembic_version for 12s: ALTER TABLE x; "
                         "drift is held back until it finishes")
    assert f.remedy == f"wait for it to finish, then restart {UNIT}; do not start a second upgrade"
    (locked,) = activity_findings(UNIT, [], locked=True)
    assert "alembic_version is locked" in locked.message
    assert "current revision not readable now" in locked.message
    assert activity_findings(UNIT, []) == []


def test_insufficient_db_privileges() -> None:
    (f,) = privilege_findings(UNIT, "app", "public", False, False, [("users", "postgres")])
    assert (f.check, f.severity) == ("insufficient_db_privileges", "warning")
    assert f.remedy == ("grant the required privileges to the production database user: "
                        "GRANT CREATE ON SCHEMA public TO app; ALTER TABLE ... OWNER TO app "
                        "(or GRANT postgres TO app)")
    assert privilege_findings(UNIT, "app", "public", False, True, []) == []
    assert privilege_findings(UNIT, "app", "public", True, False, [("t", "x")]) == []
    (only_owner,) = privilege_findings(UNIT, "app", "public", False, True, [("t", "x")])
    assert "GRANT CREATE" not in only_owner.remedy
    (only_create,) = privilege_findings(UNIT, "app", "public", False, False, [])
    assert only_create.remedy.endswith("GRANT CREATE ON SCHEMA public TO app")


# -- schema drift ------------------------------------------------------------------------
ALL_KINDS = sorted(set(KINDS.values()) | {"other"})
CRITICAL_KINDS = {"missing_table", "missing_column", "column_type"}


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_every_drift_kind_has_its_severity(kind: str) -> None:
    (f,) = drift_findings(UNIT, [{"kind": kind, "table": "t", "name": "c"}], pending=0)
    assert f.check == "schema_drift"
    assert f.severity == ("critical" if kind in CRITICAL_KINDS else "warning")


def test_breaking_kinds_are_exactly_the_documented_ones() -> None:
    assert BREAKING == CRITICAL_KINDS


def test_one_breaking_item_makes_the_finding_critical() -> None:
    items = [{"kind": "extra_table", "table": "a", "name": "a"},
             {"kind": "column_type", "table": "b", "name": "c"}]
    assert drift_findings(UNIT, items, 0)[0].severity == "critical"
    assert drift_findings(UNIT, items[:1], 0)[0].severity == "warning"
    assert drift_findings(UNIT, [], 3) == []


def test_drift_remedy_depends_on_pending_work() -> None:
    items = [{"kind": "missing_column", "table": "users", "name": "email"}]
    (f,) = drift_findings(UNIT, items, pending=2)
    assert f.remedy == f"agentctl upgrade {UNIT} --restart, then re-check the drift"
    assert "2 pending migration(s) probably account for it" in f.message
    (f,) = drift_findings(UNIT, items, pending=0)
    assert f.remedy.startswith("compare the live schema with the models")
    assert "the database is at head" in f.message
    assert "missing_column users.email" in f.message


def test_drift_lists_eight_and_counts_the_rest() -> None:
    items = [{"kind": "extra_table", "table": f"t{i}", "name": f"t{i}"} for i in range(10)]
    (f,) = drift_findings(UNIT, items, 0)
    assert "in 10 object(s)" in f.message
    assert "extra_table t7 and 2 more" in f.message and "t8" not in f.message


@pytest.mark.parametrize(("op", "kind"), sorted(KINDS.items()))
def test_drift_items_map_alembic_ops_to_kinds(op: str, kind: str) -> None:
    assert drift_items([{"kind": op, "table": "t", "name": "n", "detail": "d"}]) == [
        {"kind": kind, "table": "t", "name": "n", "detail": "d"}]


def test_drift_items_drop_the_version_table_and_name_unknown_ops() -> None:
    diff = [{"kind": "remove_table", "table": "alembic_version", "name": "alembic_version"},
            {"kind": "weird_op", "table": "x"}]
    assert drift_items(diff) == [{"kind": "other", "table": "x", "name": "", "detail": ""}]


@pytest.mark.parametrize(("item", "text"), [
    ({"kind": "missing_column", "table": "users", "name": "email"}, "missing_column users.email"),
    ({"kind": "missing_table", "table": "posts", "name": "posts"}, "missing_table posts"),
    ({"kind": "extra_index", "table": "", "name": "ix_a"}, "extra_index ix_a"),
    ({"kind": "other", "table": "t", "name": ""}, "other t"),
])
def test_describe(item: dict[str, str], text: str) -> None:
    assert describe(item) == text


# -- the probe's failures ------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "check", "remedy_start"), [
    ("app_load", "app_load_failed", "run the app's import by hand"),
    ("timeout", "app_load_timeout", "the app's import hangs"),
    ("migrations", "migration_scripts_broken", "fix the migration script named"),
    ("privileges", "probe_privileges", "run the agent as root"),
])
def test_probe_failures(kind: str, check: str, remedy_start: str) -> None:
    f = ProbeResult(ok=False, error="KeyError: 'DATABASE_URL'", error_kind=kind).finding()
    assert f is not None
    assert (f.check, f.severity, f.message) == (check, "critical", "KeyError: 'DATABASE_URL'")
    assert f.remedy.startswith(remedy_start)
    assert ProbeResult(ok=True).finding() is None


@pytest.mark.parametrize(("age", "text"), [
    (0, "0s"), (119, "119s"), (120, "2m"), (7199, "119m"), (7200, "2h"), (172799, "47h"),
    (172800, "2d"), (10 * 86400 + 5, "10d"), (-5, "0s")])
def test_code_newer_ages(age: int, text: str) -> None:
    from agent.checks.unit import _ago
    assert _ago(age) == text


def test_paths_without_a_known_realpath_compare_as_written() -> None:
    bare = UnitFacts(now=2000.0)   # the edge could not resolve anything
    assert findings_of(facts=bare) == []
    f = only(findings_of(procs=[proc(venv="/other/venv")], facts=bare), "venv_mismatch")
    assert f.message == f"{UNIT} declares virtualenv {VENV} but master 10 uses /other/venv"
    assert f.remedy == (f"systemctl restart {UNIT} (ExecStart changed since the processes "
                        "started), or fix ExecStart to the intended venv")
    two = findings_of(procs=[proc(venv="/a"), proc(11, "worker", venv="/b")], facts=bare)
    assert only(two, "venv_mismatch").message.endswith("master 10 uses /a; worker 11 uses /b")
    f = only(findings_of(procs=[proc(cwd="/old")], facts=bare), "cwd_stale")
    assert f.message == (f"1 process(es) of {UNIT} run in /old but /srv/app now resolves to "
                         "/srv/app (a release symlink switched?)")
    f = only(findings_of(procs=[proc(cwd="/old"), proc(11, "worker", cwd="/older")],
                         facts=bare), "cwd_stale")
    assert "2 process(es) of gunicorn.service run in /old, /older but" in f.message


def test_cwd_resolving_to_the_app_directory_is_not_stale() -> None:
    facts = UnitFacts(realpaths={"/srv/app": "/srv/releases/2", VENV: VENV,
                                 "/srv/current": "/srv/releases/2"}, now=2000.0)
    assert findings_of(procs=[proc(cwd="/srv/current")], facts=facts) == []
    assert findings_of(procs=[proc(cwd="")], facts=facts) == []


# -- exact wording of the revision findings ------------------------------------------------
def test_revision_messages_in_full() -> None:
    f = only(evaluate(UNIT, ["zz"], LINEAR).findings, "db_revision_unknown")
    assert f.message == (
        f"alembic_version of {UNIT} holds revision zz, which no deployed migration script "
        "defines (code heads: c): the database is ahead of the code (migration files not "
        "deployed, or code rolled back) or it is another app's database")
    assert f.remedy == ("deploy the missing migrations/versions files (or the release that "
                        "matches this database) and rerun the upgrade; check the database URL "
                        f"{UNIT} uses")
    f = only(evaluate(UNIT, ["zz"], [], version_table="app_version").findings,
             "db_revision_unknown")
    assert "app_version of gunicorn.service holds revision zz" in f.message
    assert "(code heads: none)" in f.message
    f = only(evaluate(UNIT, [], LINEAR).findings, "version_table_empty")
    assert f.message == (
        f"alembic_version of {UNIT} exists but holds no revision (stamped or downgraded to "
        "base, or a first upgrade failed): 3 migration(s) not applied")
    assert f.remedy == (f"if the schema really is empty, {UPGRADE}; if the tables already "
                        "exist, find the revision the schema matches and `flask db stamp` it "
                        "instead of upgrading")
    f = only(evaluate(UNIT, ["a"], BRANCHED).findings, "multiple_heads")
    assert f.message == (f"the migrations of {UNIT} have 2 heads (b1, b2): the history "
                         "branched and `flask db upgrade` cannot pick a single upgrade path")
    assert f.remedy == ("create a merge migration: flask db merge heads (where you develop, "
                        f"not in production), deploy it, then {UPGRADE}")
    graph = [Revision("a"), Revision("b", ("x",)), Revision("b", ("a",))]
    f = only(evaluate(UNIT, ["a"], graph).findings, "migration_graph_invalid")
    assert f.message == (
        f"the migration scripts of {UNIT} are inconsistent: revision id defined twice: b; "
        "revision b names down_revision x, which no migration script defines")
    assert f.remedy == ("deploy the complete migrations/versions directory; fix the existing "
                        "migration path instead of generating new migrations in production")
    cyc = evaluate(UNIT, ["a"], [Revision("a", ("b",)), Revision("b", ("a",))])
    assert only(cyc.findings, "migration_graph_invalid").message.endswith(
        "inconsistent: the revision graph has a cycle")


def test_unreadable_graph_state() -> None:
    state = evaluate(UNIT, ["b", "b"], [], graph_error="SyntaxError")
    assert (state.unit, state.version_table_exists, state.current, state.heads,
            state.pending, state.unknown, state.findings) == (
        UNIT, True, ("b",), (), None, (), ())
    assert evaluate(UNIT, None, [], graph_error="x").version_table_exists is False


def test_listing_caps_at_eight() -> None:
    many = [Revision(f"r{i}", (f"r{i - 1}",) if i else ()) for i in range(11)]
    f = only(evaluate(UNIT, ["r0"], many).findings, "pending_migrations")
    assert f.message.endswith("pending, in order: r1, r2, r3, r4, r5, r6, r7, r8 and 2 more")
    nine = many[:10]
    assert only(evaluate(UNIT, ["r0"], nine).findings, "pending_migrations").message.endswith(
        "r1, r2, r3, r4, r5, r6, r7, r8 and 1 more")
    eight = many[:9]
    assert only(evaluate(UNIT, ["r0"], eight).findings, "pending_migrations").message.endswith(
        "in order: r1, r2, r3, r4, r5, r6, r7, r8")


def test_activity_and_privilege_messages_in_full() -> None:
    sessions = [(1, 1.0, "a", "q1"), (2, 2.0, "b", "q2"), (3, 3.0, "c", "q3"), (4, 4.0, "d", "q4")]
    (f,) = activity_findings(UNIT, sessions)
    assert f.message.endswith("pid 1 a for 1s: q1; pid 2 b for 2s: q2; pid 3 c for 3s: q3; "
                              "drift is held back until it finishes")
    (f,) = activity_findings(UNIT, [], locked=True)
    assert f.message == (f"a migration is in progress on the database of {UNIT}: "
                         "alembic_version is locked; current revision not readable now, so "
                         "pending migrations and drift are held back until it finishes")
    (f,) = privilege_findings(UNIT, "app", "public", False, False,
                              [("users", "postgres"), ("posts", "admin")])
    assert f.message == (f"database role app of {UNIT} may not CREATE in schema public and "
                         "does not own 2 table(s): users (owner postgres), posts (owner admin): "
                         "the upgrade (`flask db upgrade`, or `alembic upgrade` for a plain "
                         "Alembic app) will fail to create, alter or drop objects")
    assert f.remedy.endswith("(or GRANT admin, postgres TO app)")


def test_revisions_from_dicts_forms() -> None:
    from agent.checks.migrations import revisions_from_dicts
    graph = revisions_from_dicts([
        {"revision": "a", "down_revision": None, "branch_labels": None},
        {"revision": "b", "down_revision": "a", "branch_labels": "feature"},
        {"revision": "c", "down_revisions": ["a", "b"], "branch_labels": ["x", "y"]},
        {"revision": 4, "down_revision": ""}])
    assert graph == [Revision("a"), Revision("b", ("a",), ("feature",)),
                     Revision("c", ("a", "b"), ("x", "y")), Revision("4")]


def test_migration_state_as_dict() -> None:
    state = evaluate(UNIT, ["a"], LINEAR)
    assert state.as_dict() == {
        "unit": UNIT, "version_table_exists": True, "current": ["a"], "heads": ["c"],
        "pending": ["b", "c"], "pending_count": 2, "unknown": [], "graph_errors": [],
        "at_head": False, "findings": [f.as_dict() for f in state.findings]}
    unknown = evaluate(UNIT, ["zz"], LINEAR).as_dict()
    assert unknown["pending"] is None and unknown["pending_count"] is None
    assert evaluate(UNIT, ["c"], LINEAR).as_dict()["at_head"] is True


def test_drift_messages_in_full() -> None:
    items = [{"kind": "missing_column", "table": "users", "name": "email"},
             {"kind": "extra_table", "table": "old", "name": "old"}]
    (f,) = drift_findings(UNIT, items, 0)
    assert f.message == (
        f"the live schema of {UNIT}'s database differs from its models in 2 object(s): "
        "missing_column users.email, extra_table old; the database is at head, so this is a "
        "manual change or a missing migration")
    assert f.remedy == ("compare the live schema with the models (psql \\d TABLE) and write a "
                        "corrective migration; never edit applied ones")
    eight = [{"kind": "extra_table", "table": f"t{i}", "name": f"t{i}"} for i in range(8)]
    assert " more" not in drift_findings(UNIT, eight, 0)[0].message
    assert drift_items([{"kind": "add_table"}]) == [
        {"kind": "missing_table", "table": "", "name": "", "detail": ""}]
    assert drift_items([{"table": "t"}]) == [
        {"kind": "other", "table": "t", "name": "", "detail": ""}]


def test_pending_order_keeps_script_order_for_ties() -> None:
    # Two branches off a, merged by m: ties in upgrade order follow the scripts' order,
    # not the alphabet.
    graph = [Revision("a"), Revision("zz", ("a",)), Revision("bb", ("a",)),
             Revision("m", ("zz", "bb")), Revision("top", ("m",))]
    assert evaluate(UNIT, ["a"], graph).pending == ("zz", "bb", "m", "top")


def test_ancestry_through_a_diamond() -> None:
    from agent.checks.migrations import ancestry
    graph = [Revision("a"), Revision("b", ("a",)), Revision("c", ("a",)),
             Revision("d", ("b", "c")), Revision("e", ("d",))]
    assert ancestry(graph, ["e"]) == {"a", "b", "c", "d", "e"}
    assert ancestry(graph, ["d", "b", "zz"]) == {"a", "b", "c", "d"}
    assert evaluate(UNIT, ["b", "c"], graph).pending == ("d", "e")


def test_declared_venv_compared_by_its_realpath() -> None:
    # ExecStart names a 'current' venv link; the processes run the release it points to.
    facts = UnitFacts(realpaths={VENV: "/srv/releases/3/venv", "/srv/releases/3/venv":
                                 "/srv/releases/3/venv", "/srv/app": "/srv/app"}, now=2000.0)
    assert findings_of(procs=[proc(venv="/srv/releases/3/venv")], facts=facts) == []
    f = only(findings_of(procs=[proc(venv="/srv/releases/2/venv")], facts=facts),
             "venv_mismatch")
    assert f.message.endswith("master 10 uses /srv/releases/2/venv")


# -- plain Alembic apps (FastAPI, Starlette): the remedies name `alembic ...` ---------------
IN_DIR = "(in the app's directory, where alembic.ini is)"


def test_version_table_empty_remedy_for_each_app_kind() -> None:
    flask = only(evaluate(UNIT, [], LINEAR).findings, "version_table_empty")
    plain = only(evaluate(UNIT, [], LINEAR, plain_alembic=True).findings,
                 "version_table_empty")
    assert plain.message == flask.message
    assert plain.remedy == (f"if the schema really is empty, {UPGRADE}; if the tables already "
                            f"exist, find the revision the schema matches and `alembic stamp` "
                            f"it {IN_DIR} instead of upgrading")
    assert "flask" not in plain.remedy and "`flask db stamp` it instead" in flask.remedy


def test_multiple_heads_for_each_app_kind() -> None:
    plain = only(evaluate(UNIT, ["a"], BRANCHED, plain_alembic=True).findings,
                 "multiple_heads")
    assert plain.message == (f"the migrations of {UNIT} have 2 heads (b1, b2): the history "
                             "branched and `alembic upgrade` cannot pick a single upgrade path")
    assert plain.remedy == ("create a merge migration: alembic merge heads (where you "
                            f"develop, not in production), deploy it, then {UPGRADE}")
    flask = only(evaluate(UNIT, ["a"], BRANCHED).findings, "multiple_heads")
    assert "flask db merge heads" in flask.remedy and "`flask db upgrade`" in flask.message


def test_the_app_kind_changes_no_other_revision_finding() -> None:
    for current, graph in (([], LINEAR), (["a"], LINEAR), (None, LINEAR), (["zz"], LINEAR),
                           (["a"], BRANCHED), (["b1", "b2"], BRANCHED)):
        flask = evaluate(UNIT, current, graph).findings
        plain = evaluate(UNIT, current, graph, plain_alembic=True).findings
        assert names(flask) == names(plain)
        for f, p in zip(flask, plain):
            if f.check not in ("version_table_empty", "multiple_heads"):
                assert f == p
            assert "flask" not in p.message + p.remedy


def test_code_newer_remedy_for_each_app_kind() -> None:
    from agent.checks.unit import check_code_newer
    newer = UnitFacts(realpaths=FACTS.realpaths, newest_code=("/srv/app/models.py", 1500.0),
                      now=2000.0)
    p = props()
    ctx = build_context(p, INPUTS)
    (flask,) = check_code_newer(ctx, [proc()], p, newer)
    (plain,) = check_code_newer(ctx, [proc()], p, newer, plain_alembic=True)
    assert flask.remedy == f"systemctl restart {UNIT} (after flask db upgrade if migrations " \
        "changed)"
    assert plain.remedy == f"systemctl restart {UNIT} (after alembic upgrade if migrations " \
        "changed)"
    assert plain.message == flask.message


def test_environment_stale_remedy_names_no_migration_tool() -> None:
    env = dict(ENV, DATABASE_URL="postgresql://a@b/old")
    f = only(findings_of(procs=[proc(environ=env)]), "environment_stale")
    assert f.remedy == f"systemctl restart {UNIT}"
