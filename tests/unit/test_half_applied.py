"""Pure: a revision that failed halfway is said as such, with its objects and the remedy."""

from __future__ import annotations

from typing import Any

from agent.checks.half_applied import (
    LiveObjects,
    Op,
    half_applied,
    half_applied_findings,
    next_revisions,
    ops_of,
    tables_named,
)

R3_OPS = [["create_table", "posts", ""], ["other", "", "ExecuteSQLOp"],
          ["add_column", "users", "bio"], ["create_index", "posts", "ix_posts_title"]]
REVS: list[dict[str, Any]] = [
    {"revision": "r1", "down_revisions": [], "ops": [["create_table", "users", ""]]},
    {"revision": "r2", "down_revisions": ["r1"], "ops": [["add_column", "users", "name"]]},
    {"revision": "r3", "down_revisions": ["r2"], "ops": R3_OPS, "doc": "create posts"},
    {"revision": "r4", "down_revisions": ["r3"], "ops": [["drop_column", "users", "name"]]},
]
AT_R2 = LiveObjects(frozenset({"users", "alembic_version"}),
                    frozenset({("users", "id"), ("users", "name")}))


def test_next_revision_is_the_one_after_current() -> None:
    assert [r["revision"] for r in next_revisions(["r2"], REVS)] == ["r3"]
    assert [r["revision"] for r in next_revisions([], REVS)] == ["r1"]
    assert next_revisions(["r4"], REVS) == []
    assert tables_named(next_revisions(["r2"], REVS)) == {"posts", "users"}


def test_a_clean_pending_revision_is_not_half_applied() -> None:
    assert half_applied(["r2"], REVS, AT_R2) == []


def test_objects_of_the_next_revision_that_exist_are_named_with_the_remedy() -> None:
    live = LiveObjects(AT_R2.tables | {"posts"}, AT_R2.columns | {("posts", "id")})
    (h,) = half_applied(["r2"], REVS, live)
    assert h.revision == "r3" and h.done == (Op("create_table", "posts"),)
    assert h.left == (Op("add_column", "users", "bio"),
                      Op("create_index", "posts", "ix_posts_title"))
    assert h.unknown == 1
    (f,) = half_applied_findings("shop.service", ["r2"], [h], pending=2)
    assert f.check == "half_applied_revision" and f.severity == "critical"
    assert "alembic_version of shop.service says r2, but revision r3 (create posts) ran in " \
        "part and failed" in f.message
    assert "already done: table posts exists" in f.message
    assert "not done: column users.bio, index ix_posts_title on posts" in f.message
    assert f.remedy.startswith("finish revision r3 by hand (column users.bio, index "
                               "ix_posts_title on posts), then `flask db stamp r3`")
    assert "then `flask db upgrade` for the 1 revision(s) after it" in f.remedy


def test_a_drop_already_done_counts_and_everything_done_is_applied_not_recorded() -> None:
    live = LiveObjects(frozenset({"users"}), frozenset({("users", "id")}))
    (h,) = half_applied(["r3"], REVS, live)
    assert h.done == (Op("drop_column", "users", "name"),) and h.left == ()
    (f,) = half_applied_findings("u", ["r3"], [h], pending=1)
    assert "revision r4 is applied but was not recorded: column users.name is gone" in f.message
    assert "flask db stamp r4" in f.remedy and "after it" not in f.remedy


def test_the_probes_ops_are_validated() -> None:
    assert ops_of(R3_OPS) is not None
    assert ops_of(None) is None and ops_of("x") is None
    assert ops_of([["create_table", "t"]]) is None
    assert ops_of([["create_table", "t" * 500, ""]]) is None
    assert ops_of([[1, 2, 3]]) is None
    assert len(ops_of([["create_table", "t", ""]] * 1000) or ()) == 200


def test_plain_alembic_app_gets_alembic_commands_in_message_and_remedy() -> None:
    live = LiveObjects(AT_R2.tables | {"posts"}, AT_R2.columns | {("posts", "id")})
    (h,) = half_applied(["r2"], REVS, live)
    (f,) = half_applied_findings("shop.service", ["r2"], [h], pending=2, plain_alembic=True)
    assert "`alembic upgrade` would fail on the objects that already exist" in f.message
    assert f.remedy == ("finish revision r3 by hand (column users.bio, index ix_posts_title on "
                        "posts), then `alembic stamp r3` (in the app's directory, where "
                        "alembic.ini is) (agentctl exec shop.service -- alembic stamp r3); "
                        "then `alembic upgrade` for the 1 revision(s) after it")
    assert "flask" not in f.message + f.remedy
    (flask,) = half_applied_findings("shop.service", ["r2"], [h], pending=2)
    assert flask.remedy == ("finish revision r3 by hand (column users.bio, index ix_posts_title "
                            "on posts), then `flask db stamp r3` (agentctl exec shop.service -- "
                            "flask db stamp r3); then `flask db upgrade` for the 1 revision(s) "
                            "after it")
    done = LiveObjects(frozenset({"users"}), frozenset({("users", "id")}))
    (h4,) = half_applied(["r3"], REVS, done)
    (f4,) = half_applied_findings("u", ["r3"], [h4], pending=1, plain_alembic=True)
    assert f4.remedy == ("check the objects of revision r4, then `alembic stamp r4` (in the "
                         "app's directory, where alembic.ini is) (agentctl exec u -- alembic "
                         "stamp r4)")
