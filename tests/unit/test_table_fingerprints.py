"""Per-table catalog fingerprints on root's side: what a probe reports is kept only as the
exact plain data the probe writes, and handed back only to a probe of the same code after
the live schema changed (agent/privileged/table_fingerprints.py, the probe memo)."""

from __future__ import annotations

import copy
import json
import tempfile
from typing import Any

import pytest

from agent.asuser import probe_child as child
from agent.privileged import inspector as inspector_module
from agent.privileged import table_fingerprints as tablefp
from agent.privileged.inspector import Inspector, InspectorSettings
from agent.privileged.probe_runner import ProbeResult, parse_report
from agent.privileged.sources import database
from tests.unit.test_unit_independence import (
    HEALTHY,
    HEALTHY_REPORT,
    FakeSystemd,
    fakes,
    props,
)

BASIS = "ab" * 32
GOOD = {"default": {"basis": BASIS, "tables": {"users": "0" * 32, "Tag Names": "f" * 32}}}
DIFF = [{"kind": "add_column", "table": "users", "name": "email", "detail": "TEXT NULL",
         "bind": "default"}]


def test_a_well_formed_list_is_kept() -> None:
    assert tablefp.from_report(copy.deepcopy(GOOD)) == GOOD


def _with(path: tuple[str, ...], value: Any) -> Any:
    doc = copy.deepcopy(GOOD)
    target: Any = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return doc


@pytest.mark.parametrize("hostile", [
    None, [], "default", {"default": None}, {"": GOOD["default"]},
    {"x" * 129: GOOD["default"]},
    _with(("default", "basis"), "AB" * 32),                    # not as the probe writes it
    _with(("default", "basis"), BASIS + "0"),
    _with(("default", "tables", "users"), "0" * 31),
    _with(("default", "tables", "users"), "g" * 32),
    _with(("default", "tables", "users"), 7),
    _with(("default", "tables", "users"), ["0" * 32]),
    _with(("default", "tables", ""), "0" * 32),
    _with(("default", "tables", "t" * 200), "0" * 32),
    _with(("default", "tables"), ["users"]),
    _with(("default", "extra"), 1),
    {f"b{i}": GOOD["default"] for i in range(tablefp.MAX_BINDS + 1)},
    {"default": {"basis": BASIS,
                 "tables": {f"t{i}": "0" * 32 for i in range(tablefp.MAX_TABLES + 1)}}},
], ids=lambda v: json.dumps(v)[:40])
def test_anything_else_is_refused_whole(hostile: Any) -> None:
    assert tablefp.from_report(hostile) == {}


def test_the_report_parser_refuses_a_garbled_list() -> None:
    def parsed(fingerprints: Any, diff: Any = ()) -> ProbeResult:
        doc = {**HEALTHY_REPORT, "schema_diff": list(diff), "table_fingerprints": fingerprints}
        return parse_report(json.dumps(doc).encode(), 0, "", timed_out=False, timeout=5,
                            duration=0.1)
    assert parsed(GOOD, DIFF).table_fingerprints == GOOD
    assert parsed(_with(("default", "tables", "users"), "../../etc")).table_fingerprints == {}
    assert parsed({"default": "x" * 10_000}).table_fingerprints == {}
    # no comparison, no fingerprints
    doc = {**HEALTHY_REPORT, "schema_diff": None, "table_fingerprints": GOOD}
    assert parse_report(json.dumps(doc).encode(), 0, "", timed_out=False, timeout=5,
                        duration=0.1).table_fingerprints == {}


def test_what_is_handed_back() -> None:
    handed = tablefp.previous_check(GOOD, DIFF)
    assert handed == {"tables": GOOD, "diff": DIFF}
    assert tablefp.previous_check({}, DIFF) is None
    assert tablefp.previous_check(GOOD, None) is None
    assert tablefp.previous_check(GOOD, [{**DIFF[0], "detail": None}]) is None
    big = {"default": {"basis": BASIS,
                       "tables": {f"t{i:05d}": "0" * 32 for i in range(5000)}}}
    assert tablefp.previous_check(big, DIFF) is None  # too large to pass: compare all


@pytest.mark.parametrize("garbled", [
    None, [], {"tables": GOOD}, {"tables": GOOD, "diff": {}},
    {"tables": GOOD, "diff": [{"kind": "add_column"}]},
    {"tables": GOOD, "diff": [{**DIFF[0], "table": ""}]},   # names no table
    {"tables": {"default": {"basis": 1, "tables": {}}}, "diff": []},
    {"tables": {"default": []}, "diff": []},
])
def test_the_probe_compares_everything_on_a_garbled_previous_check(garbled: Any) -> None:
    assert child.previous_check(garbled) is None
    assert child.previous_check({"tables": GOOD, "diff": DIFF}) is not None


def test_entries_are_put_in_alembics_order() -> None:
    def e(kind: str, table: str) -> dict[str, str]:
        return {"kind": kind, "table": table, "name": "", "detail": "", "bind": "default"}
    fresh = [e("add_table", "new"), e("add_index", "new"), e("remove_table", "old"),
             e("add_column", "b"), e("modify_type", "d")]
    reused = [e("add_column", "c"), e("modify_nullable", "a"), e("remove_index", "a")]
    assert child._in_alembic_order(fresh + reused) == [
        fresh[0], fresh[1], fresh[2], reused[1], reused[2], fresh[3], reused[0], fresh[4]]


# -- the probe memo: who gets the previous check -------------------------------------------

def test_only_a_schema_change_under_the_same_code_hands_the_fingerprints_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    state = {"schema": "s1", "code": "c1"}
    requests: list[Any] = []
    report = {**HEALTHY_REPORT, "schema_diff": DIFF, "table_fingerprints": GOOD}

    def probe(ctx: Any, request: Any, timeout: float) -> ProbeResult:
        requests.append(request)
        return parse_report(json.dumps(report).encode(), 0, "", timed_out=False,
                            timeout=timeout, duration=0.1)

    def inspect(url: str, table: str = "alembic_version", schema: str | None = None,
                timeouts: Any = None, opener: Any = None) -> database.DatabaseInspection:
        label = database.db_label(url)
        return database.DatabaseInspection(
            label, database.VersionTable(label, table, True, ("r3",)),
            database.MigrationActivity(label),
            database.Privileges(label, user="app", schema="public", can_create=True,
                                can_use=True),
            database.ServerIdentity(label), schema_fingerprint=state["schema"])

    # (a context of its own, undone before fakes' own: nothing leaks into later tests)
    with fakes(monkeypatch, {}), monkeypatch.context() as patch, \
            tempfile.TemporaryDirectory() as tmp:
        patch.setattr(database, "inspect", inspect)
        patch.setattr(inspector_module, "fingerprint",
                      lambda ctx, migrations_dir="": state["code"])
        inspector = Inspector(InspectorSettings(state_path=f"{tmp}/s.db"),
                              systemd=FakeSystemd({HEALTHY: props(HEALTHY)}),  # type: ignore
                              probe=probe)
        inspector.inspect([HEALTHY])              # first check: everything compared
        inspector.inspect([HEALTHY])              # memo path: no probe
        state["schema"] = "s2"                    # one ALTER: the probe again, incremental
        inspector.inspect([HEALTHY])
        state["code"] = "c2"                      # a code change: everything compared
        inspector.inspect([HEALTHY])
        state["code"], state["schema"] = "c3", "s3"   # code and schema: everything
        inspector.inspect([HEALTHY])
    handed = {"tables": GOOD, "diff": DIFF}
    # (the last: the probe after the code change already saw schema s3, but the memo held
    # s2, so it runs once more, with the fingerprints of that same code)
    assert [r.previous_check for r in requests] == [None, handed, None, None, handed]


# -- the probe's side: what a fingerprint covers -------------------------------------------

def _cache(**over: Any) -> dict[str, Any]:
    from sqlalchemy.dialects.postgresql import ENUM, INTEGER
    columns = [{"name": "id", "type": INTEGER(), "nullable": False, "comment": None,
                "default": "nextval('t_id_seq'::regclass)", "autoincrement": True},
               {"name": "status", "type": ENUM("a", "b", name="st"), "nullable": True,
                "default": None, "autoincrement": False, "comment": None}]
    rows = {"alembic_columns": columns, "alembic_pk_constraint": {"constrained_columns": ["id"]},
            "alembic_foreign_keys": [], "alembic_indexes": [],
            "alembic_unique_constraints": [], "alembic_table_comment": {"text": None},
            "alembic_check_constraints": [], "alembic_table_options": {}}
    rows.update(over)
    return {k: {(None, "t"): v} for k, v in rows.items()}


def test_a_fingerprint_moves_with_every_part_of_the_catalog() -> None:
    from sqlalchemy.dialects.postgresql import ENUM
    from agent.asuser import bulk_reflection as bulk
    base = bulk.table_fingerprint(_cache(), "t", {}, False, None)
    assert base is not None and len(base) == 32
    assert bulk.table_fingerprint(_cache(), "t", {}, False, None) == base
    columns = _cache()["alembic_columns"][(None, "t")]
    columns[1]["type"] = ENUM("a", "b", "c", name="st")          # ALTER TYPE ... ADD VALUE
    changed = [_cache(alembic_columns=columns),
               _cache(alembic_check_constraints=[{"name": "c", "sqltext": "x > 0"}]),
               _cache(alembic_table_options={"postgresql_with_oids": False}),
               _cache(alembic_table_comment={"text": "x"})]
    for cache in changed:
        assert bulk.table_fingerprint(cache, "t", {}, False, None) not in (None, base)
    # with compare_server_default, who owns the SERIAL's sequence is part of it
    owned = bulk.table_fingerprint(_cache(), "t", {"t_id_seq": ("t_id_seq", "id")}, True, None)
    assert owned != bulk.table_fingerprint(_cache(), "t", {}, True, None)
    # a kind the dialect cannot reflect in bulk counts as empty for every table
    cache = _cache()
    cache["alembic_table_options"] = NotImplementedError
    assert bulk.table_fingerprint(cache, "t", {}, False, None) is not None


def test_anything_not_plain_data_gets_no_fingerprint() -> None:
    from agent.asuser import bulk_reflection as bulk

    class Thing:
        pass
    for odd in (Thing(), {1, 2}, object()):
        cache = _cache(alembic_check_constraints=[{"name": "c", "sqltext": odd}])
        assert bulk.table_fingerprint(cache, "t", {}, False, None) is None


def test_only_flask_migrates_own_hook_with_autogenerate_off_is_inert() -> None:
    from types import SimpleNamespace
    template = child.FLASK_MIGRATE_HOOK.replace("\n", "\n    ")   # nested, as in env.py
    env_py = "def run_migrations_online():\n" + template + "\n    return " \
        "process_revision_directives\n"
    for autogenerate, inert in ((False, True), (True, False)):
        namespace: dict[str, Any] = {
            "config": SimpleNamespace(cmd_opts=SimpleNamespace(autogenerate=autogenerate))}
        exec(compile(env_py, "env.py", "exec"), namespace)
        hook = namespace["run_migrations_online"]()
        assert child.inert_flask_migrate_hook(hook) is inert
    namespace = {"config": SimpleNamespace(cmd_opts=None)}
    exec(compile(child.FLASK_MIGRATE_HOOK.replace("directives[:] = []", "directives[:] = [1]"),
                 "env.py", "exec"), namespace)
    assert not child.inert_flask_migrate_hook(namespace["process_revision_directives"])
    assert not child.inert_flask_migrate_hook(lambda context, revision, directives: None)
    assert not child.inert_flask_migrate_hook(print)
