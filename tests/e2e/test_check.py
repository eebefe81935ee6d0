"""agentctl check on real Flask-Migrate apps under gunicorn.service with a real PostgreSQL."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.harness.apps import (
    AppDir,
    AppSpec,
    Revision,
    broken_revision,
    custom_env_py,
    env_file_text,
    gunicorn_unit,
    render_models,
    db_upgrade,
    db_write_hook,
    http_get,
    read_identities,
    record_identity_hook,
    standard_revisions,
    two_heads_spec,
    writable_dir,
)
from tests.harness.postgres import PgDatabase, PostgresCluster, free_port
from tests.harness.sandbox import Sandbox
from tests.harness.site import UNIT, Site, SiteFactory, site_factory
from tests.integration.test_flask_db_check import (
    BILLING_REVISION,
    INCLUDE_OBJECT,
    INCLUDE_SCHEMAS,
    INVOICE_MODEL,
)

pytestmark = [pytest.mark.systemd, pytest.mark.postgres]

def checks(unit: dict[str, Any]) -> list[str]:
    return sorted(f["check"] for f in unit["findings"])


@pytest.fixture
def site(make_sandbox: Callable[[], Sandbox], make_app: Callable[..., AppDir],
         flask_venv: Path, pg_database: PgDatabase) -> SiteFactory:
    """site(spec, upgrade_to=..., url=..., start_unit=..., app=...) -> a running Site."""
    return site_factory(make_sandbox, make_app, flask_venv, pg_database)


def test_healthy(site: Callable[..., Site]) -> None:
    s = site()
    code, unit = s.check()
    assert unit["findings"] == [], unit["findings"]
    assert code == 0
    assert unit["migrations"]["current"] == ["r3"] and unit["migrations"]["pending"] == []
    assert unit["schema_drift"] == {"count": 0, "items": []}
    assert unit["database"] == f"127.0.0.1:{s.db.cluster.port}/{s.db.name}"
    assert s.db.password not in json.dumps(unit)
    assert all(c["success"] for c in unit["checks"]), unit["checks"]
    assert s.check_text().returncode == 0
    s.assert_flask_db_check_agrees(unit)


@pytest.mark.parametrize("at,pending", [("r2", ["r3"]), ("r1", ["r2", "r3"])])
def test_upgrade_skipped(site: Callable[..., Site], at: str, pending: list[str]) -> None:
    s = site(upgrade_to=at)
    code, unit = s.check()
    assert code == 1
    assert unit["migrations"]["pending"] == pending
    assert "pending_migrations" in checks(unit)
    # The models are ahead of the database: the drift is named and blamed on the pending work.
    drift = next(f for f in unit["findings"] if f["check"] == "schema_drift")
    assert "pending migration" in drift["message"]
    text = s.check_text().stdout
    assert "pending_migrations" in text and "agentctl upgrade gunicorn.service --restart" in text
    s.assert_flask_db_check_agrees(unit)


def test_unit_points_at_a_database_that_was_never_migrated(
        site: Callable[..., Site], pg: PostgresCluster) -> None:
    other = pg.new_database("never")
    try:
        s = site(url=other.url)  # the migrated database is pg_database; the unit uses `other`
        code, unit = s.check()
        assert code == 1
        assert "version_table_missing" in checks(unit)
        assert unit["database"].endswith(f"/{other.name}")
    finally:
        pg.drop(other)


def test_workers_connected_to_another_database_than_the_unit_says(
        site: Callable[..., Site], pg: PostgresCluster, flask_venv: Path) -> None:
    s = site()
    http_get(f"http://127.0.0.1:{s.port}/db")  # the workers now hold connections
    other = PostgresCluster().start()
    try:
        moved = s.db.url.replace(f":{pg.port}/", f":{other.port}/")
        s.set_database_url(moved)
        for _ in range(4):  # every worker serves at least one request
            http_get(f"http://127.0.0.1:{s.port}/db")
        code, unit = s.check()
        assert "database_mismatch" in checks(unit), unit["database_connections"]
        assert unit["database_mismatch"] is True
        assert "environment_stale" in checks(unit)
    finally:
        other.stop()


def test_workers_on_one_database_while_the_env_file_names_another_on_the_same_server(
        site: Callable[..., Site], pg: PostgresCluster) -> None:
    """The seed's first cause: workers serve 500s from `app` (r3 pending) while the env file
    now names `app_staging` (never migrated) on the same server: both states, by name."""
    s = site(upgrade_to="r2")
    staging = f"{s.db.name}_staging"
    pg.create_database(staging, owner=s.db.owner)
    try:
        for _ in range(4):  # every worker serves /db (a 500: posts is missing) and keeps
            assert http_get(f"http://127.0.0.1:{s.port}/db")[0] == 500  # its connection
        s.set_database_url(s.db.url.rsplit("/", 1)[0] + "/" + staging)
        code, unit = s.check()
        assert code == 1
        assert unit["database_mismatch"] is True
        assert unit["database"].endswith(f"/{staging}")
        found = next(f for f in unit["findings"] if f["check"] == "database_mismatch")
        message = found["message"]
        assert f"connected to database {s.db.name} as role {s.db.owner} on 127.0.0.1:" \
            in message
        assert f"not to {staging} that the unit's environment names" in message
        assert f"Running now: {s.db.name} at r2, 1 pending (r3); the schema errors in the " \
            "journal come from there" in message
        assert f"After a restart: {staging} never migrated (no alembic_version table): a " \
            "restart would make it worse" in message
        assert f"now: bring {s.db.name} to head" in found["remedy"]
        assert f"before any restart: if {staging} is meant, migrate it first" \
            in found["remedy"]
        assert s.db.password not in json.dumps(unit)
        assert f"by name: {s.db.name} as {s.db.owner}" in unit["database_connections"]
    finally:
        pg.drop_database(staging)


def test_malformed_url_beside_a_healthy_unit(
        site: Callable[..., Site], make_app: Callable[..., AppDir],
        make_venv: Callable[..., Path]) -> None:
    """`...:5432x/db` in one unit's env file: that unit says why, the other is untouched,
    no traceback. Flask-SQLAlchemy 2.5 creates engines lazily, so the app loads and the
    malformed URL reaches the agent (3.x already fails at import: app_load_failed)."""
    from tests.integration.test_probe import FLASK_SQLALCHEMY_25_REQUIREMENTS

    s = site(start_unit=False)
    lazy_venv = make_venv(FLASK_SQLALCHEMY_25_REQUIREMENTS)
    bad_app = make_app(name="bad")
    bad_url = s.db.url.rsplit(":", 1)[0] + ":5432x/" + s.db.name
    s.sb.write_file("/etc/bad/env", env_file_text({"DATABASE_URL": bad_url}))
    s.sb.write_file("/etc/systemd/system/bad.service", gunicorn_unit(
        venv=lazy_venv, app_dir=bad_app, port=free_port(), environment={},
        environment_files=["/etc/bad/env"]))
    s.sb.systemctl("daemon-reload")
    s.sb.systemctl("start", UNIT, "bad.service")
    proc = s.agentctl("check", UNIT, "bad.service", "--json", "--probe-timeout", "30")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    healthy, bad = json.loads(proc.stdout)["units"]
    assert healthy["findings"] == [] and all(c["success"] for c in healthy["checks"])
    assert healthy["migrations"]["current"] == ["r3"]
    assert bad["database"] == "invalid-url" and bad["db_up"] is False
    down = next(f for f in bad["findings"] if f["check"] == "database_unreachable")
    assert "not a valid database URL (the port is not a number)" in down["message"]
    assert s.db.password not in proc.stdout + proc.stderr
    text = s.agentctl("check", UNIT, "bad.service")
    assert text.returncode == 2 and "Traceback" not in text.stdout + text.stderr


def test_migration_files_not_deployed(site: Callable[..., Site], make_app: Callable[..., AppDir],
                                      flask_venv: Path, pg_database: PgDatabase) -> None:
    newer = make_app(AppSpec(models_at=4, revisions=AppSpec(models_at=4).revisions + (
        Revision("r4", "r3", upgrade="op.add_column('posts', sa.Column('created_at', "
                                     "sa.DateTime(), nullable=True))"),)), name="newer")
    db_upgrade(newer, flask_venv, pg_database.url, "head")  # the db went ahead with newer code
    s = site(upgrade_to=None)  # the deployed code only knows r1..r3
    code, unit = s.check()
    assert code == 1
    assert "db_revision_unknown" in checks(unit)
    assert unit["migrations"]["unknown"] == ["r4"]


def test_multiple_heads(site: Callable[..., Site]) -> None:
    s = site(two_heads_spec(), upgrade_to="r3")
    code, unit = s.check()
    assert unit["migrations"]["multiple_heads"] is True
    assert "multiple_heads" in checks(unit)
    assert code == 1


def test_manual_schema_change_at_head(site: Callable[..., Site]) -> None:
    s = site()
    s.db.execute("ALTER TABLE users ADD COLUMN nickname text", as_owner=True)
    code, unit = s.check()
    assert code == 1
    assert unit["migrations"]["pending"] == []
    assert {"kind": "extra_column", "table": "users", "name": "nickname"} in \
        unit["schema_drift"]["items"]
    drift = next(f for f in unit["findings"] if f["check"] == "schema_drift")
    assert "users.nickname" in drift["message"] and "at head" in drift["message"]
    s.assert_flask_db_check_agrees(unit)


# -- the app's own env.py: what `flask db check` compares, where the version is ---------------

def test_env_py_include_object_filters_like_flask_db_check(site: Callable[..., Site]) -> None:
    """Before: extra_table drift and exit 1 while `flask db check` was clean."""
    s = site(AppSpec(env_py=custom_env_py("include_object=include_object,", INCLUDE_OBJECT)))
    s.db.execute("CREATE TABLE legacy_reports (id int)", as_owner=True)
    code, unit = s.check()
    assert code == 0, unit["findings"]
    assert unit["schema_drift"] == {"count": 0, "items": []}
    s.assert_flask_db_check_agrees(unit)


def test_env_py_custom_version_table_is_where_the_revision_is_read(
        site: Callable[..., Site]) -> None:
    """Before: "never migrated" (critical), every revision pending, at head in truth."""
    s = site(AppSpec(env_py=custom_env_py("version_table='alembic_version_billing',")),
             upgrade_to="r2")
    code, unit = s.check()
    assert unit["migrations"]["current"] == ["r2"] and unit["migrations"]["pending"] == ["r3"]
    assert checks(unit) == ["pending_migrations", "schema_drift"], unit["findings"]
    s.assert_flask_db_check_agrees(unit)
    db_upgrade(s.app, s.venv, s.db.url)
    code, unit = s.check()
    assert code == 0, unit["findings"]
    assert unit["migrations"]["current"] == ["r3"]
    s.assert_flask_db_check_agrees(unit)


def test_env_py_include_schemas_with_two_schemas(site: Callable[..., Site]) -> None:
    spec = AppSpec(models_source=render_models(3) + INVOICE_MODEL,
                   revisions=(*standard_revisions(3), BILLING_REVISION),
                   env_py=custom_env_py("include_schemas=True,\ninclude_name=include_name,",
                                        INCLUDE_SCHEMAS))
    s = site(spec)
    code, unit = s.check()
    assert code == 0, unit["findings"]
    s.assert_flask_db_check_agrees(unit)
    s.db.execute("ALTER TABLE billing.invoices ADD COLUMN note text")
    code, unit = s.check()
    assert code == 1
    assert {"kind": "extra_column", "table": "billing.invoices", "name": "note"} in \
        unit["schema_drift"]["items"]
    s.assert_flask_db_check_agrees(unit)


def test_insufficient_privileges(site: Callable[..., Site], pg: PostgresCluster) -> None:
    s = site()
    pg.create_role("webonly", "webpw")
    try:
        pg.execute(f"GRANT CONNECT ON DATABASE {s.db.name} TO webonly")
        s.db.execute("GRANT USAGE ON SCHEMA public TO webonly; "
                     "REVOKE CREATE ON SCHEMA public FROM PUBLIC; "
                     "GRANT SELECT ON ALL TABLES IN SCHEMA public TO webonly")
        s.set_database_url(pg.dsn("webonly", "webpw", s.db.name))
        s.sb.systemctl("restart", UNIT)
        code, unit = s.check()
        assert unit["migration_privileges_ok"] is False
        found = next(f for f in unit["findings"] if f["check"] == "insufficient_db_privileges")
        assert "users" in found["message"] and "CREATE" in found["message"]
    finally:
        pg.execute(f"REASSIGN OWNED BY webonly TO {s.db.owner}", db=s.db.name)
        pg.execute("DROP OWNED BY webonly", db=s.db.name)
        pg.drop_role("webonly")


def test_app_cannot_load_missing_variable(site: Callable[..., Site]) -> None:
    s = site(AppSpec(database_env="SITE_DATABASE_URL"), upgrade_to=None, start_unit=False)
    code, unit = s.check()
    assert code == 2
    assert unit["app_loaded"] is False
    probe = next(f for f in unit["findings"] if f["check"] == "app_load_failed")
    assert "KeyError" in probe["message"] and "SITE_DATABASE_URL" in probe["message"]


def test_migration_file_with_a_syntax_error(site: Callable[..., Site],
                                            make_app: Callable[..., AppDir],
                                            flask_venv: Path, pg_database: PgDatabase) -> None:
    app = make_app()
    db_upgrade(app, flask_venv, pg_database.url, "head")
    broken = broken_revision("r4", "r3")  # deployed after the last successful upgrade
    app.write(f"migrations/versions/{broken.file_name}", broken.render())
    s = site(upgrade_to=None, start_unit=False, app=app)
    code, unit = s.check()
    assert code == 2
    probe = next(f for f in unit["findings"] if f["check"] == "migration_scripts_broken")
    assert "r4" in probe["message"] and "SyntaxError" in probe["message"]


def test_database_down(site: Callable[..., Site]) -> None:
    s = site()
    s.set_database_url(s.db.url.replace(f":{s.db.cluster.port}/", f":{free_port()}/"))
    code, unit = s.check()
    assert code == 2
    assert unit["db_up"] is False
    down = next(f for f in unit["findings"] if f["check"] == "database_unreachable")
    assert "refused" in down["message"] and s.db.password not in down["message"]


def test_upgrade_in_progress(site: Callable[..., Site]) -> None:
    s = site(upgrade_to="r2")
    conn = s.db.cluster.connect(s.db.name, s.db.owner, s.db.password, autocommit=False)
    try:
        cur = conn.cursor()
        cur.execute("LOCK TABLE alembic_version IN ACCESS EXCLUSIVE MODE")
        cur.execute("ALTER TABLE users ADD COLUMN migrating int")
        cur.execute("SELECT pg_backend_pid()")
        holder = cur.fetchone()[0]
        code, unit = s.check()
        # No elapsed-time bound: this session holds the lock until `finally`, so a check that
        # waited on it would never return (the harness ends agentctl after 60 s). It returned,
        # and the lock is still held (asked from a third session):
        assert s.db.execute("SELECT count(*) FROM pg_locks l JOIN pg_class c ON "
                            "c.oid = l.relation WHERE l.pid = %s AND l.granted AND "
                            "l.mode = 'AccessExclusiveLock' AND c.relname = 'alembic_version'",
                            (holder,))[0][0] == 1
        assert unit["migrations"]["in_progress"] is True
        # A lock is never a state: not "holds no revision", not "every revision pending".
        assert unit["migrations"]["current_readable"] is False
        assert checks(unit) == ["migration_in_progress"], unit["findings"]
        assert "current revision not readable now" in unit["findings"][0]["message"]
        assert unit["schema_drift"] is None  # held back while the migration runs
    finally:
        conn.rollback()
        conn.close()


SLOW_R3 = Revision(
    "r3", "r2", message="create posts slowly",
    upgrade=standard_revisions(3)[2].upgrade + "\nop.execute('SELECT pg_sleep(8)')",
    downgrade="op.drop_table('posts')")


def test_real_upgrade_in_progress_holds_drift_and_pending_back(
        site: Callable[..., Site]) -> None:
    """flask db upgrade really running (its r3 creates posts, then works for 8 s)."""
    s = site(AppSpec(revisions=(*standard_revisions(2), SLOW_R3)), upgrade_to="r2")
    upgrade = threading.Thread(target=db_upgrade, args=(s.app, s.venv, s.db.url, "head"))
    upgrade.start()
    try:
        deadline = time.monotonic() + 20
        while not s.db.execute("SELECT count(*) FROM pg_stat_activity WHERE query LIKE "
                               "'SELECT pg_sleep(8)%'")[0][0]:
            assert time.monotonic() < deadline, "the upgrade never reached its slow step"
            time.sleep(0.1)
        code, unit = s.check()
        assert unit["migrations"]["in_progress"] is True
        assert checks(unit) == ["migration_in_progress"], unit["findings"]
        assert unit["schema_drift"] is None
    finally:
        upgrade.join(60)
    code, unit = s.check()
    assert code == 0, unit["findings"]
    assert unit["migrations"]["current"] == ["r3"] and unit["migrations"]["in_progress"] is False


def test_applied_migration_edited_afterwards(site: Callable[..., Site]) -> None:
    s = site()
    assert s.check()[0] == 0  # first sight: the hashes of applied revisions are remembered
    r2 = str(s.app.revision_file("r2"))
    s.sb.write_file(r2, s.sb.path(r2).read_text() + "\n# edited after it was applied\n")
    code, unit = s.check()
    assert code == 1
    found = next(f for f in unit["findings"] if f["check"] == "applied_migration_modified")
    assert "r2" in found["message"]


def test_app_code_never_runs_as_root(site: Callable[..., Site], app_workspace: Path,
                                     make_app: Callable[..., AppDir]) -> None:
    marks = writable_dir(app_workspace / "identities")
    s = site(AppSpec(on_import=record_identity_hook(str(marks))), start_unit=False)
    for old in marks.iterdir():
        old.unlink()  # flask db upgrade ran on the host, as root, before the test
    s.check()
    seen = read_identities(s.sb.path(str(marks)))
    assert seen, "the probe did not import the app"
    assert {rec["uid"] for rec in seen} == {33}


def test_never_writes_to_the_inspected_database(site: Callable[..., Site]) -> None:
    spec = AppSpec(on_create=db_write_hook("import_side_effect"))
    s = site(spec, upgrade_to=None, start_unit=False)
    db_upgrade(s.app, s.venv, s.db.url, "head")  # creates the side-effect table as root
    s.db.execute("DELETE FROM import_side_effect", as_owner=True)
    before = _fingerprint(s.db)
    code, unit = s.check()
    assert _fingerprint(s.db) == before
    assert s.db.execute("SELECT count(*) FROM import_side_effect")[0][0] == 0
    probe = next((f for f in unit["findings"] if f["check"] == "app_load_failed"), None)
    assert probe is not None and "read-only" in probe["message"]


def _fingerprint(db: PgDatabase) -> list[tuple[Any, ...]]:
    """Every table's row count, the version rows and the statement counters of writes."""
    rows = db.execute("SELECT relname, n_tup_ins, n_tup_upd, n_tup_del FROM pg_stat_user_tables "
                      "ORDER BY relname")
    return [*rows, *db.execute("SELECT version_num FROM alembic_version")]


#: The key of the advisory lock the gated migration waits on (held by the test).
GATE_KEY = 812_000_012


def gated_revision(base: Revision) -> Revision:
    """BASE's migration, then it locks alembic_version ACCESS EXCLUSIVE and waits on the
    test's advisory lock, inside the upgrade's transaction: the test decides when it ends."""
    return Revision(base.id, base.down_revision, message=base.message, downgrade=base.downgrade,
                    upgrade=(f"{base.upgrade}\n"
                             "op.execute('LOCK TABLE alembic_version IN ACCESS EXCLUSIVE MODE')\n"
                             f"op.execute('SELECT pg_advisory_lock({GATE_KEY})')\n"
                             f"op.execute('SELECT pg_advisory_unlock({GATE_KEY})')"))


def _migration_locks(db: PgDatabase) -> tuple[int, set[str]] | None:
    """From a third session: (pid, the relations it holds ACCESS EXCLUSIVE) of the backend
    waiting on the gate, or None while nobody waits on it."""
    waiting = db.execute("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                         "AND objid = %s AND database = (SELECT oid FROM pg_database WHERE "
                         "datname = current_database())", (GATE_KEY,))
    if not waiting:
        return None
    pid = waiting[0][0]
    held = db.execute("SELECT c.relname FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
                      "WHERE l.pid = %s AND l.granted AND l.mode = 'AccessExclusiveLock'", (pid,))
    return pid, {r[0] for r in held}


def test_upgrade_running_while_checking_is_never_blocked(site: Callable[..., Site]) -> None:
    """agentctl check runs while flask db upgrade holds ACCESS EXCLUSIVE on alembic_version
    (proved from pg_locks before and after the check), says so, and the upgrade then ends."""
    revisions = standard_revisions(5)
    gated = (*revisions[:2], gated_revision(revisions[2]), *revisions[3:])
    s = site(AppSpec(models_at=5, revisions=gated), upgrade_to="r1")
    gate = s.db.cluster.connect(s.db.name)           # superuser, autocommit
    gate.cursor().execute("SELECT pg_advisory_lock(%s)", (GATE_KEY,))
    result: list[Any] = []
    upgrade = threading.Thread(target=lambda: result.append(
        db_upgrade(s.app, s.venv, s.db.url, "head", check=False)))
    upgrade.start()
    try:
        deadline = time.monotonic() + 60   # a wait for the upgrade to get there, not a bound
        while (during := _migration_locks(s.db)) is None:
            assert upgrade.is_alive() and time.monotonic() < deadline, \
                f"the upgrade never reached the gate: {result}"
            time.sleep(0.05)
        pid, held = during
        # The version table, and users (r2 altered it in the same transaction).
        assert {"alembic_version", "users"} <= held, held

        code, unit = s.check()

        # The check has returned, and the migration still holds its locks and waits: the
        # whole check ran inside the upgrade's transaction.
        assert _migration_locks(s.db) == (pid, held)
        assert upgrade.is_alive()
        # What it returned: a migration in progress, no revision read, nothing pending, no
        # drift: a lock is never a state.
        assert checks(unit) == ["migration_in_progress"], unit["findings"]
        assert code == 0                                      # an info finding only
        assert "current revision not readable now" in unit["findings"][0]["message"]
        m = unit["migrations"]
        assert m["in_progress"] is True and m["current_readable"] is False
        assert m["current"] == [] and m["pending"] == []
        assert unit["schema_drift"] is None
        # Nothing of the check is left in the database to hold the migration up.
        assert s.db.execute("SELECT count(*) FROM pg_stat_activity "
                            "WHERE application_name = 'driftwatch'")[0][0] == 0
    finally:
        gate.cursor().execute("SELECT pg_advisory_unlock(%s)", (GATE_KEY,))
        gate.close()
        upgrade.join(120)
    assert not upgrade.is_alive() and result and result[0].returncode == 0, result
    assert s.db.alembic_versions() == ["r5"]
    code, unit = s.check()
    assert code == 0, unit["findings"]
    assert unit["migrations"]["current"] == ["r5"] and unit["migrations"]["in_progress"] is False
