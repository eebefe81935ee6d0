"""Pure revision-state checks with literal graphs."""

from __future__ import annotations

from agent.checks.migrations import (
    Revision,
    activity_findings,
    evaluate,
    heads_of,
    privilege_findings,
    revisions_from_dicts,
)

UNIT = "gunicorn.service"

# a <- b <- c <- d
LINEAR = revisions_from_dicts([
    {"revision": "a", "down_revisions": None},
    {"revision": "b", "down_revisions": "a"},
    {"revision": "c", "down_revisions": ["b"]},
    {"revision": "d", "down_revision": "c"},
])
# a <- b <- c1, b <- c2 (two heads)
BRANCHED = [Revision("a"), Revision("b", ("a",)), Revision("c1", ("b",)),
            Revision("c2", ("b",), ("feature",))]
# ... merged by m <- (c1, c2), then e
MERGED = BRANCHED + [Revision("m", ("c1", "c2")), Revision("e", ("m",))]


def checks(state) -> list[str]:  # type: ignore[no-untyped-def]
    return [f.check for f in state.findings]


def test_at_head_has_no_findings() -> None:
    state = evaluate(UNIT, ["d"], LINEAR)
    assert state.heads == ("d",)
    assert state.pending == ()
    assert state.at_head
    assert state.findings == ()


def test_linear_pending_in_upgrade_order() -> None:
    state = evaluate(UNIT, ["b"], LINEAR)
    assert state.pending == ("c", "d")
    assert state.pending_count == 2
    assert checks(state) == ["pending_migrations"]
    finding = state.findings[0]
    assert finding.severity == "critical"
    assert "2 migration(s) not applied" in finding.message
    assert "c, d" in finding.message
    assert finding.remedy == f"run `agentctl upgrade {UNIT} --restart`"


def test_stamped_at_middle_revision() -> None:
    state = evaluate(UNIT, ["c"], LINEAR)
    assert state.pending == ("d",)


def test_branch_gives_multiple_heads() -> None:
    assert heads_of(BRANCHED) == ("c1", "c2")
    state = evaluate(UNIT, ["b"], BRANCHED)
    assert state.pending == ("c1", "c2")
    assert set(checks(state)) == {"multiple_heads", "pending_migrations"}
    heads = next(f for f in state.findings if f.check == "multiple_heads")
    assert heads.severity == "critical"  # `upgrade head` cannot proceed
    assert "flask db merge heads" in heads.remedy


def test_multiple_heads_all_applied_is_a_warning() -> None:
    state = evaluate(UNIT, ["c1", "c2"], BRANCHED)  # several current rows
    assert state.pending == ()
    assert checks(state) == ["multiple_heads"]
    assert state.findings[0].severity == "warning"


def test_merge_pending_from_one_branch() -> None:
    state = evaluate(UNIT, ["c1"], MERGED)
    assert state.heads == ("e",)
    # c2 must come before the merge point m, m before e.
    assert state.pending == ("c2", "m", "e")
    assert checks(state) == ["pending_migrations"]


def test_merge_pending_from_before_the_branch_is_topological() -> None:
    state = evaluate(UNIT, ["a"], MERGED)
    order = state.pending
    assert order is not None and set(order) == {"b", "c1", "c2", "m", "e"}
    assert order.index("b") < order.index("c1") < order.index("m")
    assert order.index("c2") < order.index("m") < order.index("e")


def test_several_current_rows_on_both_branches() -> None:
    state = evaluate(UNIT, ["c2", "c1"], MERGED)
    assert state.current == ("c2", "c1")
    assert state.pending == ("m", "e")


def test_unknown_db_revision() -> None:
    state = evaluate(UNIT, ["zzz"], LINEAR)
    assert state.unknown == ("zzz",)
    assert state.pending is None and state.pending_count is None
    assert checks(state) == ["db_revision_unknown"]
    assert "zzz" in state.findings[0].message
    assert "not deployed" in state.findings[0].message


def test_version_table_missing() -> None:
    state = evaluate(UNIT, None, LINEAR)
    assert not state.version_table_exists
    assert state.pending == ("a", "b", "c", "d")
    assert checks(state) == ["version_table_missing"]
    assert "wrong database" in state.findings[0].message


def test_version_table_missing_without_migrations_is_fine() -> None:
    assert evaluate(UNIT, None, []).findings == ()


def test_version_table_empty() -> None:
    state = evaluate(UNIT, [], LINEAR)
    assert state.version_table_exists
    assert state.pending == ("a", "b", "c", "d")
    assert checks(state) == ["version_table_empty"]


def test_broken_graph_is_reported() -> None:
    graph = [Revision("b", ("a",)), Revision("c", ("b",))]  # a not deployed
    state = evaluate(UNIT, ["c"], graph)
    assert checks(state) == ["migration_graph_invalid"]
    assert "a" in state.findings[0].message


def test_long_pending_list_is_shortened() -> None:
    graph = [Revision(f"r{i:02d}", (f"r{i - 1:02d}",) if i else ()) for i in range(30)]
    state = evaluate(UNIT, ["r00"], graph)
    assert state.pending_count == 29
    assert "and 21 more" in state.findings[0].message


def test_privilege_findings_name_tables() -> None:
    findings = privilege_findings(UNIT, "app", "public", False, False,
                                  [("users", "postgres"), ("orders", "admin")])
    assert [f.check for f in findings] == ["insufficient_db_privileges"]
    msg = findings[0].message
    assert "may not CREATE in schema public" in msg
    assert "users (owner postgres)" in msg and "orders (owner admin)" in msg
    assert "GRANT CREATE ON SCHEMA public TO app" in findings[0].remedy
    assert privilege_findings(UNIT, "app", "public", False, True, []) == []
    assert privilege_findings(UNIT, "root", "public", True, False, [("t", "x")]) == []


def test_activity_findings() -> None:
    assert activity_findings(UNIT, []) == []
    found = activity_findings(UNIT, [(42, 3.0, "running DDL", "ALTER TABLE users ADD c int")])
    assert found[0].check == "migration_in_progress"
    assert "pid 42" in found[0].message
