"""The migration preflight against real apps, their own Alembic, and a real PostgreSQL.

Every pending revision is rendered by the app's own Alembic in offline mode, as www-data, in
the app's venv; its SQL is read by pglast; sizes and lock holders come from the live
database, where the tests put a million rows (generate_series) and hold blocking sessions.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg2
import pytest

from agent.preflight.plan import Plan, assemble, render
from agent.preflight.probe import OfflineResult, run_offline
from agent.preflight.risk import RevisionRisk
from tests.harness.apps import AppDir, db_upgrade
from tests.harness.postgres import PgDatabase
from tests.harness.preflight_apps import (
    DATA_MIGRATION,
    SAFE,
    UNSAFE,
    fill_items,
    preflight_spec,
    unit_context,
)

pytestmark = pytest.mark.postgres
TIMEOUT = 60.0
MILLION = 1_000_000


def offline_for(make_app: Callable[..., AppDir], venv: Path, db: PgDatabase,
                steps: list[tuple[str, str]], per_migration: bool = False) -> OfflineResult:
    """Write the app, upgrade the database to p1, render every pending revision offline."""
    app = make_app(preflight_spec(steps, per_migration))
    db_upgrade(app, venv, db.url, "p1")
    ctx = unit_context(app, venv, {"DATABASE_URL": db.url})
    result = run_offline(ctx, ["p1"], [steps[-1][0]], TIMEOUT)
    assert result.ok, result.error
    assert [r.revision for r in result.revisions] == [s[0] for s in steps]
    return result


def plan_of(offline: OfflineResult, heads: str) -> Plan:
    return assemble("gunicorn.service", ("p1",), (heads,), offline)


@contextmanager
def blocker(db: PgDatabase, sql: str = "SELECT count(*) FROM items WHERE id < 10",
            application_name: str = "report", superuser: bool = False) -> Iterator[int]:
    """A session of the app's role (or the superuser) left idle in transaction after sql;
    yields its pid."""
    dsn = db.cluster.superuser_dsn(db.name, driver="postgresql") if superuser else \
        db.dsn("postgresql")
    conn = psycopg2.connect(dsn, application_name=application_name)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            pid = cur.fetchone()[0]
            cur.execute(sql)  # psycopg2 opened a transaction: the lock is held until rollback
        yield pid
    finally:
        conn.rollback()
        conn.close()


def by_revision(plan: Plan) -> dict[str, RevisionRisk]:
    return {r.revision: r for r in plan.revisions}


def test_each_rule_fires_on_the_migration_that_breaks_it(
        make_app: Callable[..., AppDir], flask_venv: Path, pg_database: PgDatabase) -> None:
    offline = offline_for(make_app, flask_venv, pg_database,
                          [(rev, body) for rev, _, body in UNSAFE])
    fill_items(pg_database, MILLION)
    plan = plan_of(offline, UNSAFE[-1][0])
    risks = by_revision(plan)
    for rev, rule, _ in UNSAFE:
        assert risks[rev].rules == (rule,), (rev, risks[rev].rules)
    # On a million rows, every lock held for a scan, rewrite or index build is critical.
    for rev in ("u_index", "u_fk", "u_check", "u_type", "u_notnull", "u_default", "u_unique"):
        assert risks[rev].level == "critical", (rev, risks[rev].reason)
        assert "1,000,000 rows" in risks[rev].reason
        assert risks[rev].safer
    widen = risks["u_type_widen"]
    assert widen.level == "low" and "varchar(100) -> text is binary-compatible" in widen.reason
    assert risks["u_required"].reason.startswith("will fail")
    assert risks["u_cic_tx"].level == "critical"
    # The lock level and the table, from PostgreSQL's parser.
    locks = [(lk.table, lk.mode, lk.effect) for s in risks["u_index"].statements
             for lk in s.locks]
    assert locks == [("items", "ShareLock", "index build")]
    fk = [(lk.table, lk.mode) for s in risks["u_fk"].statements for lk in s.locks]
    assert fk == [("items", "ShareRowExclusiveLock"), ("orgs", "ShareRowExclusiveLock")]


def test_safe_forms_stay_quiet_on_a_million_rows(
        make_app: Callable[..., AppDir], flask_venv: Path, pg_database: PgDatabase) -> None:
    offline = offline_for(make_app, flask_venv, pg_database,
                          [(rev, body) for rev, _, body in SAFE], per_migration=True)
    assert offline.transaction_per_migration
    fill_items(pg_database, MILLION)
    plan = plan_of(offline, SAFE[-1][0])
    for risk in plan.revisions:
        assert risk.rules == (), (risk.revision, risk.rules)
        assert risk.level == "low", (risk.revision, risk.reason)
    assert plan.level == "low"
    # The CONCURRENTLY build really runs outside Alembic's transaction.
    cic = by_revision(plan)["s_index"]
    assert [(s.kind, s.in_transaction) for s in cic.statements] == [
        ("CREATE INDEX CONCURRENTLY", False)]


def test_not_valid_then_validate_in_one_upgrade_transaction_is_named(
        make_app: Callable[..., AppDir], flask_venv: Path, pg_database: PgDatabase) -> None:
    pair = [(rev, body) for rev, _, body in SAFE if rev in ("s_fk", "s_fk_validate")]
    offline = offline_for(make_app, flask_venv, pg_database, pair)
    assert not offline.transaction_per_migration  # Flask-Migrate's default
    fill_items(pg_database, MILLION)
    risks = by_revision(plan_of(offline, "s_fk_validate"))
    validate = risks["s_fk_validate"]
    assert validate.rules == () and validate.level == "critical"
    assert "SHARE ROW EXCLUSIVE on items, taken by ALTER TABLE in revision s_fk, is held " \
           "until COMMIT, through the scan of items (1,000,000 rows" in validate.reason
    assert "transaction_per_migration=True" in validate.safer


def test_risk_rises_with_the_table_size(
        make_app: Callable[..., AppDir], flask_venv: Path, pg_database: PgDatabase) -> None:
    offline = offline_for(make_app, flask_venv, pg_database, [UNSAFE[0][::2]])
    levels = []
    for rows in (0, 50_000, MILLION):
        if rows:
            pg_database.execute("TRUNCATE items")
            fill_items(pg_database, rows)
        levels.append(plan_of(offline, "u_index").revisions[0].level)
    assert levels == ["low", "high", "critical"]


def test_risk_rises_with_a_blocker_present(
        make_app: Callable[..., AppDir], flask_venv: Path, pg_database: PgDatabase) -> None:
    # A nullable ADD COLUMN takes ACCESS EXCLUSIVE only for a moment; a CONCURRENTLY
    # index build only SHARE UPDATE EXCLUSIVE. Both low on a small table with nobody around.
    add_column = ("s_add_col", "op.add_column('items', sa.Column('remark', sa.Text()))")
    drop_index = next((rev, body) for rev, _, body in UNSAFE if rev == "u_drop_index")
    cic = next((rev, body) for rev, _, body in SAFE if rev == "s_index")
    offline = offline_for(make_app, flask_venv, pg_database, [add_column, drop_index, cic])
    fill_items(pg_database, 1000)
    pg_database.execute("CREATE INDEX ix_items_email ON items (email)")
    quiet = by_revision(plan_of(offline, "s_index"))
    assert quiet["s_add_col"].level == "low" and quiet["s_index"].level == "low"
    with blocker(pg_database) as pid:
        plan = plan_of(offline, "s_index")
        busy = by_revision(plan)
        add = busy["s_add_col"]
        assert add.level == "critical", add.reason
        assert f"queue behind pid {pid} (idle in transaction" in add.reason
        assert "reads and writes of items queue behind it" in add.reason
        # The reader's query locked the index too (the planner opens every index).
        drop = busy["u_drop_index"]
        assert drop.level == "critical" and f"pid {pid}" in drop.reason
        # SHARE UPDATE EXCLUSIVE does not conflict with the reader's ACCESS SHARE.
        assert busy["s_index"].level == "low", busy["s_index"].reason
        assert any(s.pid == pid and s.table == "items" and s.mode == "AccessShareLock"
                   for s in plan.sessions)
    with blocker(pg_database, application_name="pg_dump") as pid:
        reason = by_revision(plan_of(offline, "s_index"))["s_add_col"].reason
        assert f"pid {pid} (pg_dump" in reason
    # Another role's session: the app's role cannot see its state, but sees its lock.
    with blocker(pg_database, superuser=True) as pid:
        add = by_revision(plan_of(offline, "s_index"))["s_add_col"]
        assert add.level == "critical"
        assert f"pid {pid} (session of another role, holds AccessShareLock)" in \
            add.reason


def test_a_data_migration_without_offline_sql_is_reported(
        make_app: Callable[..., AppDir], flask_venv: Path, pg_database: PgDatabase) -> None:
    offline = offline_for(make_app, flask_venv, pg_database, [("d_data", DATA_MIGRATION)])
    rev = offline.revisions[0]
    assert rev.error and "d_data" in rev.error, rev.error  # names the file and line
    assert rev.ops == ("add_column", "get_bind")
    risk = plan_of(offline, "d_data").revisions[0]
    assert not risk.sql_available and risk.level == "high"
    assert "no offline SQL" in risk.items[0].reason or any(
        "no offline SQL" in i.reason for i in risk.items)
    # What is still known: the ADD COLUMN rendered before get_bind() failed.
    assert [s.kind for s in risk.statements] == ["ALTER TABLE"]
    assert "not available offline" in render(plan_of(offline, "d_data"))


def test_a_drop_of_a_column_the_running_code_uses_is_named(
        make_app: Callable[..., AppDir], flask_venv: Path, pg_database: PgDatabase) -> None:
    steps = [(rev, body) for rev, _, body in UNSAFE if rev in ("u_drop_col", "u_drop_table")]
    offline = offline_for(make_app, flask_venv, pg_database, steps)
    assert offline.model_tables["items"] == ("email", "id", "name", "note", "org_id")
    risks = by_revision(plan_of(offline, "u_drop_table"))
    drop = risks["u_drop_col"]
    assert drop.level == "critical"
    assert "the code's models still map items.email" in drop.reason
    # legacy is not mapped by the models: a warning to check, not a named breakage.
    assert risks["u_drop_table"].level == "high"
    assert "models still map" not in risks["u_drop_table"].reason


def test_the_plan_never_shows_the_password(
        make_app: Callable[..., AppDir], flask_venv: Path, pg_database: PgDatabase) -> None:
    offline = offline_for(make_app, flask_venv, pg_database, [UNSAFE[0][::2]])
    plan = plan_of(offline, "u_index")
    assert pg_database.password not in json.dumps(plan.as_dict()) + render(plan)
    assert plan.database.endswith("/" + pg_database.name)


# 50,000 terms, 100 kB of SQL: pglast 8.8 segfaults on it (tests/e2e/test_preflight_parser.py).
HOSTILE = 'op.execute("SELECT " + "1+" * 50000 + "1")\n'


def test_a_revision_whose_sql_crashes_the_parser_is_a_finding_not_an_agent_crash(
        make_app: Callable[..., AppDir], flask_venv: Path, pg_database: PgDatabase) -> None:
    steps = [(rev, body) for rev, _, body in UNSAFE if rev == "u_index"]
    steps += [("h_hostile", HOSTILE)]
    steps += [(rev, body) for rev, _, body in UNSAFE if rev == "u_drop_col"]
    offline = offline_for(make_app, flask_venv, pg_database, steps)
    assert offline.user == "www-data"  # the parser child runs as the unit's user
    plan = plan_of(offline, "u_drop_col")
    risks = by_revision(plan)
    hostile = risks["h_hostile"]
    assert hostile.level == "high" and hostile.sql_available
    assert hostile.reason == ("PostgreSQL's parser (pglast) crashed on this revision's SQL "
                              "(killed by SIGSEGV): this revision's SQL was not analysed; "
                              "review it by hand")
    # The revisions before and after it are analysed as usual.
    assert risks["u_index"].rules == ("require-concurrent-index-creation",)
    assert risks["u_drop_col"].rules == ("ban-drop-column",)
    print(render(plan))
