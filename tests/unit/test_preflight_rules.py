"""Pure parts of the migration preflight: rules on literal SQL, lock conflicts, risk, plan text."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.preflight.live import LiveState, Session, TableSize, session_kind
from agent.preflight.locks import (
    ACCESS_EXCLUSIVE,
    ACCESS_SHARE,
    ROW_EXCLUSIVE,
    SHARE,
    SHARE_UPDATE_EXCLUSIVE,
    blocks,
    conflicts,
    sql_name,
)
from agent.preflight.plan import Plan, assemble, render
from agent.preflight.probe import OfflineResult, OfflineRevision, parse_offline
from agent.preflight.risk import binary_compatible, describe_type, size_level
from agent.preflight.rules import analyze
from agent.preflight.command import plan_exit_code, refusal

# Alembic's offline SQL for one revision has this shape: BEGIN; statements; version; COMMIT.
WRAP = "BEGIN;\n\n{}\n\nUPDATE alembic_version SET version_num='b' WHERE " \
       "alembic_version.version_num = 'a';\n\nCOMMIT;\n"

# (rule, unsafe SQL, its safe form)
CASES = [
    ("require-concurrent-index-creation",
     "CREATE INDEX ix ON items (email);",
     "COMMIT; CREATE INDEX CONCURRENTLY ix ON items (email); BEGIN;"),
    ("ban-concurrent-index-creation-in-transaction",
     "CREATE INDEX CONCURRENTLY ix ON items (email);",
     "COMMIT; CREATE INDEX CONCURRENTLY ix ON items (email); BEGIN;"),
    ("require-concurrent-index-deletion",
     "DROP INDEX ix;", "COMMIT; DROP INDEX CONCURRENTLY ix; BEGIN;"),
    ("adding-foreign-key-constraint",
     "ALTER TABLE items ADD CONSTRAINT fk FOREIGN KEY (org_id) REFERENCES orgs (id);",
     "ALTER TABLE items ADD CONSTRAINT fk FOREIGN KEY (org_id) REFERENCES orgs (id) NOT VALID;"),
    ("constraint-missing-not-valid",
     "ALTER TABLE items ADD CONSTRAINT ck CHECK (length(name) > 0);",
     "ALTER TABLE items ADD CONSTRAINT ck CHECK (length(name) > 0) NOT VALID;"),
    ("adding-not-nullable-field",
     "ALTER TABLE items ALTER COLUMN note SET NOT NULL;",
     "ALTER TABLE items VALIDATE CONSTRAINT ck_note;"),
    ("adding-required-field",
     "ALTER TABLE items ADD COLUMN code INTEGER NOT NULL;",
     "ALTER TABLE items ADD COLUMN code INTEGER DEFAULT '0' NOT NULL;"),
    ("adding-field-with-default",
     "ALTER TABLE items ADD COLUMN t VARCHAR(36) DEFAULT gen_random_uuid()::text;",
     "ALTER TABLE items ADD COLUMN t VARCHAR(36) DEFAULT 'none';"),
    ("changing-column-type",
     "ALTER TABLE items ALTER COLUMN name TYPE TEXT;",
     "ALTER TABLE items ADD COLUMN name_text TEXT;"),
    ("disallowed-unique-constraint",
     "ALTER TABLE items ADD CONSTRAINT uq UNIQUE (email);",
     "ALTER TABLE items ADD CONSTRAINT uq UNIQUE USING INDEX ux;"),
    ("adding-serial-primary-key-field",
     "ALTER TABLE items ADD PRIMARY KEY (id);",
     "ALTER TABLE items ADD CONSTRAINT pk PRIMARY KEY USING INDEX ux;"),
    ("renaming-column", "ALTER TABLE items RENAME note TO remark;",
     "ALTER TABLE items ADD COLUMN remark TEXT;"),
    ("renaming-table", "ALTER TABLE orgs RENAME TO organisations;",
     "CREATE TABLE organisations (id INTEGER);"),
    ("ban-drop-column", "ALTER TABLE items DROP COLUMN email;",
     "ALTER TABLE items ALTER COLUMN email DROP NOT NULL;"),
    ("ban-drop-table", "DROP TABLE legacy;", "CREATE TABLE legacy2 (id INTEGER);"),
]


@pytest.mark.parametrize("rule, unsafe, safe", CASES, ids=[c[0] for c in CASES])
def test_each_rule_fires_on_its_unsafe_form_only(rule: str, unsafe: str, safe: str) -> None:
    assert [h.rule for h in analyze(WRAP.format(unsafe)).hazards] == [rule]
    assert [h.rule for h in analyze(WRAP.format(safe)).hazards] == []


def test_locks_and_effects_come_from_the_parse_tree() -> None:
    a = analyze(WRAP.format(
        "CREATE INDEX ix ON public.items (email);\n"
        "ALTER TABLE items ADD CONSTRAINT fk FOREIGN KEY (org_id) REFERENCES orgs (id);\n"
        "ALTER TABLE items VALIDATE CONSTRAINT fk;\n"
        "ALTER TABLE items ALTER COLUMN name TYPE TEXT, ADD COLUMN x INT;\n"
        "UPDATE items SET note = 'x';"))
    got = [[(lk.table, lk.mode, lk.effect) for lk in s.locks] for s in a.statements]
    assert got == [
        [("public.items", "ShareLock", "index build")],
        [("items", "ShareRowExclusiveLock", "scan"), ("orgs", "ShareRowExclusiveLock", "scan")],
        [("items", "ShareUpdateExclusiveLock", "scan")],
        [("items", "AccessExclusiveLock", "rewrite")],
        [("items", "RowExclusiveLock", "data")],
    ]
    assert all(s.in_transaction for s in a.statements)  # the version UPDATE is left out


def test_tables_created_in_the_same_revision_are_not_reported() -> None:
    a = analyze(WRAP.format("CREATE TABLE t (id SERIAL PRIMARY KEY, o INT REFERENCES orgs(id));"
                            "CREATE INDEX ix ON t (o); ALTER TABLE t ADD COLUMN n INT NOT NULL;"))
    assert a.hazards == () and a.created_tables == ("t",)
    # Creating a table that references orgs locks orgs (SHARE ROW EXCLUSIVE), briefly.
    assert [(lk.table, lk.effect) for s in a.statements for lk in s.locks] == [("orgs", "brief")]


def test_unparseable_sql_is_reported_not_guessed() -> None:
    assert "syntax error" in analyze("ALTER TABEL items ADD x int;").error


def test_lock_conflicts_follow_the_documented_table() -> None:
    assert conflicts(ACCESS_EXCLUSIVE, ACCESS_SHARE)
    assert not conflicts(SHARE, ACCESS_SHARE) and conflicts(SHARE, ROW_EXCLUSIVE)
    assert not conflicts(SHARE_UPDATE_EXCLUSIVE, ROW_EXCLUSIVE)
    assert conflicts(SHARE_UPDATE_EXCLUSIVE, SHARE_UPDATE_EXCLUSIVE)
    assert blocks(ACCESS_EXCLUSIVE) == "reads and writes" and blocks(SHARE) == "writes"
    assert sql_name("ShareRowExclusiveLock") == "SHARE ROW EXCLUSIVE"


def test_binary_compatible_type_changes() -> None:
    assert binary_compatible(("character varying", 104), ("text", ()))
    assert binary_compatible(("character varying", 104), ("varchar", (200,)))
    assert not binary_compatible(("character varying", 104), ("varchar", (50,)))
    assert binary_compatible(("numeric", ((10 << 16) | 2) + 4), ("numeric", (12, 2)))
    assert not binary_compatible(("numeric", ((10 << 16) | 2) + 4), ("numeric", (12, 3)))
    assert not binary_compatible(("integer", -1), ("int8", ()))
    assert describe_type(("character varying", 104)) == "varchar(100)"


def test_size_classes() -> None:
    assert size_level(TableSize("t", True, 0, 8192)) == "low"
    assert size_level(TableSize("t", True, 50_000, 4_000_000)) == "high"
    assert size_level(TableSize("t", True, None, 2 * 1024 ** 3)) == "critical"
    assert size_level(TableSize("t", True, 1_000_000, 1)) == "critical"


def test_session_kinds() -> None:
    assert session_kind("idle in transaction", "client backend", "x", "", 3) == \
        "idle in transaction"
    assert session_kind("active", "autovacuum worker", "", "autovacuum: VACUUM public.items "
                        "(to prevent wraparound)", 9) == "anti-wraparound autovacuum"
    assert session_kind("active", "client backend", "pg_dump", "COPY", 1) == "pg_dump"
    assert session_kind(None, None, None, None, None) == "session of another role"


def offline(sql: str, url: str = "postgresql://app:pw@db:5432/app", error: str = "",
            models: dict[str, tuple[str, ...]] | None = None) -> OfflineResult:
    return OfflineResult(True, revisions=(OfflineRevision("r2", "r1", "doc", sql, error),),
                         model_tables=models or {}, urls={"default": url})


def reader_for(live: LiveState):  # type: ignore[no-untyped-def]
    return lambda url, tables, columns=(): live


ITEMS_BIG = LiveState(tables=(TableSize("items", True, 2_000_000, 300 * 1024 ** 2),))


def test_blocker_holding_a_conflicting_lock_makes_a_brief_lock_critical() -> None:
    sql = WRAP.format("ALTER TABLE items ADD COLUMN x INT;")
    small = LiveState(tables=(TableSize("items", True, 10, 16384),))
    assert assemble("u", ("r1",), ("r2",), offline(sql), reader_for(small)).level == "low"
    held = Session(42, "idle in transaction", "items", "AccessShareLock", True,
                   "idle in transaction", 41.0)
    busy = LiveState(tables=small.tables, lockers=(held,))
    plan = assemble("u", ("r1",), ("r2",), offline(sql), reader_for(busy))
    assert plan.level == "critical"
    assert "queue behind pid 42 (idle in transaction for 41 s, holds AccessShareLock)" in \
        plan.revisions[0].reason


def test_a_brief_lock_is_held_through_a_later_long_statement_of_its_transaction() -> None:
    sql = WRAP.format("ALTER TABLE users ADD COLUMN x INT;\nCREATE INDEX ix ON items (email);")
    live = LiveState(tables=(*ITEMS_BIG.tables, TableSize("users", True, 10, 8192)))
    reasons = [i.reason for i in assemble("u", ("r1",), ("r2",), offline(sql),
                                          reader_for(live)).revisions[0].items]
    assert "ACCESS EXCLUSIVE on users, taken by ALTER TABLE earlier in the same transaction, " \
           "is held until COMMIT, through the index build of items (2,000,000 rows, " \
           "300.0 MiB): reads and writes of users wait as long" in reasons
    # In separate transactions (transaction_per_migration, autocommit_block) it is not.
    apart = "BEGIN; ALTER TABLE users ADD COLUMN x INT; COMMIT; " \
            "BEGIN; CREATE INDEX ix ON items (email); COMMIT;"
    items = assemble("u", ("r1",), ("r2",), offline(apart), reader_for(live)).revisions[0].items
    assert not any("held until COMMIT" in i.reason for i in items)


def test_without_transaction_per_migration_a_lock_lasts_into_later_revisions() -> None:
    first = OfflineRevision("r2", "r1", sql=WRAP.format(
        "ALTER TABLE items ADD CONSTRAINT ck CHECK (length(name) > 0) NOT VALID;"))
    second = OfflineRevision("r3", "r2", sql=WRAP.format(
        "ALTER TABLE items VALIDATE CONSTRAINT ck;"))
    both = OfflineResult(True, revisions=(first, second), urls={"default": "postgresql://h/d"})
    plan = assemble("u", ("r1",), ("r3",), both, reader_for(ITEMS_BIG))
    assert [r.level for r in plan.revisions] == ["low", "critical"]
    assert plan.revisions[1].reason.startswith(
        "ACCESS EXCLUSIVE on items, taken by ALTER TABLE in revision r2, is held until COMMIT, "
        "through the scan of items")
    apart = OfflineResult(True, revisions=(first, second), urls={"default": "postgresql://h/d"},
                          transaction_per_migration=True)
    assert assemble("u", ("r1",), ("r3",), apart, reader_for(ITEMS_BIG)).level == "low"


def test_drop_of_a_mapped_column_is_named_and_the_json_has_no_password() -> None:
    sql = WRAP.format("ALTER TABLE items DROP COLUMN email;")
    plan = assemble("u", ("r1",), ("r2",), offline(sql, models={"items": ("email", "id")}),
                    reader_for(ITEMS_BIG))
    assert plan.level == "critical"
    assert "the code's models still map items.email" in plan.revisions[0].reason
    assert "pw" not in json.dumps(plan.as_dict()) and plan.database == "db:5432/app"


def test_a_drop_the_new_models_do_not_map_but_stale_workers_may_use() -> None:
    sql = WRAP.format("ALTER TABLE items DROP COLUMN email;")
    fresh = assemble("u", ("r1",), ("r2",), offline(sql, models={"items": ("id",)}),
                     reader_for(ITEMS_BIG))
    assert fresh.level == "high" and "make sure no running worker" in fresh.revisions[0].reason
    stale = assemble("u", ("r1",), ("r2",), offline(sql, models={"items": ("id",)}),
                     reader_for(ITEMS_BIG), stale_workers=True)
    assert "started before the code changed and may still use it: restart first" in \
        stale.revisions[0].reason


def test_mysql_gets_one_clear_line() -> None:
    plan = assemble("u", ("r1",), ("r2",), offline("", url="mysql+pymysql://a:b@h/d"),
                    reader_for(LiveState()))
    assert plan.error.startswith("the migration preflight is PostgreSQL-only: a mysql "
                                 "database gets no lock analysis")
    assert plan_exit_code(plan) == 2


def test_no_offline_sql_is_reported_with_what_is_known() -> None:
    plan = assemble("u", ("r1",), ("r2",),
                    offline("BEGIN;\nALTER TABLE items ADD COLUMN s INT;\n",
                            error="AttributeError: 'NoneType' object has no attribute "
                                  "'fetchall'"),
                    reader_for(LiveState(tables=(TableSize("items", True, 5, 8192),))))
    r = plan.revisions[0]
    assert not r.sql_available and r.level == "high" and r.reason.startswith("no offline SQL")
    assert [s.kind for s in r.statements] == ["ALTER TABLE"]


def test_refusal_and_exit_codes() -> None:
    sql = WRAP.format("CREATE INDEX ix ON items (email);")
    plan = assemble("gunicorn.service", ("r1",), ("r2",), offline(sql), reader_for(ITEMS_BIG))
    assert plan.level == "critical" and plan_exit_code(plan) == 1
    reason = refusal(plan, accept_risk=False)
    assert reason == ("refusing to upgrade gunicorn.service: 1 pending revision(s) rated "
                      "critical by the preflight (r2), see above; fix them (or what they "
                      "would queue behind), or pass --accept-risk")
    assert "--accept-risk" in reason and refusal(plan, accept_risk=True) == ""
    text = render(plan)
    assert "1. r2  [critical]  doc" in text and "risk: critical (1 critical, 0 high, 0 low)" in text
    assert plan_exit_code(Plan("u")) == 0


def test_escape_sequences_in_names_never_reach_the_terminal() -> None:
    sql = WRAP.format('ALTER TABLE "evil\x1b]0;pwned\x07" DROP COLUMN "x\x1b[2J";')
    plan = assemble("u", ("r1",), ("r2",), offline(sql), reader_for(ITEMS_BIG))
    text = render(plan)
    assert "\x1b" not in text and "\x07" not in text and "evil?]0;pwned?" in text


def test_offline_report_is_scrubbed_and_bounded() -> None:
    raw = json.dumps({"protocol": 1, "error": "", "urls": {
        "default": "postgresql://app:s3cret@db/app"}, "model_tables": {"items": ["id"]},
        "offline": [{"revision": "r2", "sql": "-- s3cret\nSELECT 1;", "error": "", "ops": []},
                    {"no": "revision"}]}).encode()
    result = parse_offline(raw, [])
    assert result is not None and [r.revision for r in result.revisions] == ["r2"]
    assert "s3cret" not in result.revisions[0].sql
    assert result.transaction_per_migration is False
    per = json.dumps({"protocol": 1, "offline": [], "transaction_per_migration": True})
    assert parse_offline(per.encode(), []).transaction_per_migration is True  # type: ignore
    assert parse_offline(b"not json", []) is None
    # Hostile sizes are cut, not parsed whole as root.
    flood = json.dumps({"protocol": 1, "offline": [
        {"revision": f"r{n}", "sql": "SELECT 1;" * 50_000, "ops": "not a list"}
        for n in range(300)], "model_tables": {"t": "not a list"}}).encode()
    big = parse_offline(flood, [])
    assert big is not None and len(big.revisions) == 200 and big.model_tables == {}
    assert sum(len(r.sql) for r in big.revisions) <= 2_000_000
    assert big.revisions[0].ops == ()


SQUAWK = shutil.which("squawk") or str(Path(sys.executable).with_name("squawk"))


def test_rule_names_agree_with_squawk() -> None:
    """squawk (the linter the rule names come from) fires the same rule on each unsafe form."""
    if not Path(SQUAWK).exists():
        from tests.conftest import skip_or_fail
        skip_or_fail("squawk-cli is not installed (pip install squawk-cli)")
    def squawk(sql: str) -> set[str]:
        proc = subprocess.run([SQUAWK, "--reporter", "json"], input=WRAP.format(sql),
                              capture_output=True, text=True, timeout=30)
        return {v["rule_name"] for v in json.loads(proc.stdout or "[]")}

    for rule, unsafe, safe in CASES:
        assert rule in squawk(unsafe), rule
        assert rule not in squawk(safe), rule
