"""The FastAPI app (plain Alembic, gunicorn with uvicorn workers) on a real sandbox systemd and
a real PostgreSQL, in the states issue #10 names beyond pending and drift: an `alembic upgrade`
in progress, the workers on another database than the env file names, a role that may not
migrate."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_fastapi_alembic import (  # noqa: F401
    ENV_FILE,
    UNIT,
    alembic,
    check,
    fastapi_venv,
    run_site,
)
from tests.harness.app_fixtures import new_workspace
from tests.harness.apps import env_file_text, http_get
from tests.harness.fastapi_app import write_fastapi_app
from tests.harness.postgres import PgDatabase, PostgresCluster, free_port
from tests.harness.sandbox import Sandbox

pytestmark = [pytest.mark.systemd, pytest.mark.postgres]

#: The advisory lock the gated revision waits on (held by the test; not test_check's key).
GATE_KEY = 812_000_010

#: a2 adds items.price, then locks alembic_version and waits on the test's advisory lock,
#: all inside `alembic upgrade`'s one transaction: the test decides when it ends.
GATED_A2 = f'''"""items.price, then wait at the gate"""
from alembic import op
import sqlalchemy as sa

revision = "a2"
down_revision = "a1"
branch_labels = None
depends_on = None


def upgrade():
    op.add_column("items", sa.Column("price", sa.Integer, nullable=True))
    op.execute("LOCK TABLE alembic_version IN ACCESS EXCLUSIVE MODE")
    op.execute("SELECT pg_advisory_lock({GATE_KEY})")
    op.execute("SELECT pg_advisory_unlock({GATE_KEY})")


def downgrade():
    op.drop_column("items", "price")
'''


def names(unit: dict[str, Any]) -> list[str]:
    return sorted(f["check"] for f in unit["findings"])


def finding(unit: dict[str, Any], name: str) -> dict[str, str]:
    found = [f for f in unit["findings"] if f["check"] == name]
    assert len(found) == 1, unit["findings"]
    return found[0]


def gate_waiter(db: PgDatabase) -> tuple[int, set[str]] | None:
    """From a third session: (pid, relations it holds ACCESS EXCLUSIVE) of the backend waiting
    on the gate, or None while nobody waits there."""
    waiting = db.execute("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                         "AND objid = %s AND database = (SELECT oid FROM pg_database WHERE "
                         "datname = current_database())", (GATE_KEY,))
    if not waiting:
        return None
    pid = waiting[0][0]
    held = db.execute("SELECT c.relname FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
                      "WHERE l.pid = %s AND l.granted AND l.mode = 'AccessExclusiveLock'", (pid,))
    return pid, {r[0] for r in held}


def test_alembic_upgrade_in_progress_is_neither_pending_nor_drift(
        make_sandbox: Callable[[], Sandbox], fastapi_venv: Path,  # noqa: F811
        pg_database: PgDatabase) -> None:
    """agentctl check runs while `alembic upgrade head` holds ACCESS EXCLUSIVE on
    alembic_version and items (proved from pg_locks before and after the check)."""
    root = write_fastapi_app(new_workspace() / "shop")
    (root / "migrations/versions/a2_price.py").write_text(GATED_A2)
    assert alembic(fastapi_venv, root, pg_database.url, "upgrade", "a1").returncode == 0
    sb = run_site(make_sandbox, fastapi_venv, root, pg_database.url)
    gate = pg_database.cluster.connect(pg_database.name)      # superuser, autocommit
    gate.cursor().execute("SELECT pg_advisory_lock(%s)", (GATE_KEY,))
    result: list[Any] = []
    upgrade = threading.Thread(target=lambda: result.append(
        alembic(fastapi_venv, root, pg_database.url, "upgrade", "head")))
    upgrade.start()
    try:
        deadline = time.monotonic() + 60   # a wait for the upgrade to get there, not a bound
        while (during := gate_waiter(pg_database)) is None:
            assert upgrade.is_alive() and time.monotonic() < deadline, \
                f"the upgrade never reached the gate: {result}"
            time.sleep(0.05)
        pid, held = during
        assert {"alembic_version", "items"} <= held, held

        code, unit = check(sb)

        # The check returned while the migration still holds its locks and waits: it ran
        # entirely inside the upgrade's transaction, and was never blocked by it.
        assert gate_waiter(pg_database) == (pid, held)
        assert upgrade.is_alive()
        assert names(unit) == ["migration_in_progress"], unit["findings"]
        found = unit["findings"][0]
        assert found["severity"] == "info" and code == 0
        assert "current revision not readable now" in found["message"]
        assert "do not start a second upgrade" in found["remedy"]
        m = unit["migrations"]
        assert m["in_progress"] is True and m["current_readable"] is False
        assert m["current"] == [] and m["pending"] == []   # a lock is never a state
        assert unit["schema_drift"] is None                 # items.price: not drift, held back
        assert pg_database.execute("SELECT count(*) FROM pg_stat_activity "
                                   "WHERE application_name = 'driftwatch'")[0][0] == 0
        assert pg_database.password not in json.dumps(unit)
    finally:
        gate.cursor().execute("SELECT pg_advisory_unlock(%s)", (GATE_KEY,))
        gate.close()
        upgrade.join(120)
    assert not upgrade.is_alive() and result and result[0].returncode == 0, result
    code, unit = check(sb)
    assert code == 0, unit["findings"]
    assert unit["migrations"]["current"] == ["a2"] and unit["migrations"]["in_progress"] is False
    assert unit["schema_drift"] == {"count": 0, "items": []}


def test_workers_on_one_database_while_the_env_file_names_another(
        make_sandbox: Callable[[], Sandbox], fastapi_venv: Path,  # noqa: F811
        pg_database: PgDatabase, pg: PostgresCluster) -> None:
    """The uvicorn workers serve from `db` (a2 pending, 500s) while the env file now names
    `db_staging` (never migrated) on the same server: both states, by name."""
    db = pg_database
    root = write_fastapi_app(new_workspace() / "shop")
    assert alembic(fastapi_venv, root, db.url, "upgrade", "a1").returncode == 0
    port = free_port()
    sb = run_site(make_sandbox, fastapi_venv, root, db.url, port=port)
    staging = f"{db.name}_staging"
    pg.create_database(staging, owner=db.owner)
    try:
        for _ in range(4):  # the workers select items.price (a 500) and keep their connection
            assert http_get(f"http://127.0.0.1:{port}/db")[0] == 500
        sb.write_file(ENV_FILE, env_file_text({"DATABASE_URL": db.url.rsplit("/", 1)[0]
                                                + "/" + staging}))
        code, unit = check(sb)
        assert code == 1
        assert unit["database_mismatch"] is True
        assert unit["database"].endswith(f"/{staging}")
        found = finding(unit, "database_mismatch")
        assert found["severity"] == "critical", found
        message = found["message"]
        assert f"connected to database {db.name} as role {db.owner} on 127.0.0.1:" in message
        assert f"not to {staging} that the unit's environment names" in message
        assert f"Running now: {db.name} at a1, 1 pending (a2)" in message
        assert f"After a restart: {staging} never migrated (no alembic_version table): a " \
            "restart would make it worse" in message
        assert f"now: bring {db.name} to head" in found["remedy"]
        assert "alembic upgrade" in found["remedy"]   # the command this app migrates with
        assert f"before any restart: if {staging} is meant, migrate it first" in found["remedy"]
        assert f"by name: {db.name} as {db.owner}" in unit["database_connections"]
        assert db.password not in json.dumps(unit)
    finally:
        pg.drop_database(staging)


def test_role_that_may_not_migrate(
        make_sandbox: Callable[[], Sandbox], fastapi_venv: Path,  # noqa: F811
        pg_database: PgDatabase, pg: PostgresCluster) -> None:
    """The app's role may read and write rows but not CREATE in public nor alter items."""
    db = pg_database
    root = write_fastapi_app(new_workspace() / "shop")
    assert alembic(fastapi_venv, root, db.url, "upgrade", "head").returncode == 0
    role, password = f"{db.name}_web", "webpw-secret"
    pg.create_role(role, password)
    try:
        pg.execute(f"GRANT CONNECT ON DATABASE {db.name} TO {role}")
        db.execute(f"GRANT USAGE ON SCHEMA public TO {role}; "
                   "REVOKE CREATE ON SCHEMA public FROM PUBLIC; "
                   f"GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO {role}")
        sb = run_site(make_sandbox, fastapi_venv, root, pg.dsn(role, password, db.name))
        code, unit = check(sb)
        assert code == 1
        assert unit["migration_privileges_ok"] is False
        assert unit["migrations"]["current"] == ["a2"] and unit["migrations"]["pending"] == []
        assert names(unit) == ["insufficient_db_privileges"], unit["findings"]
        found = unit["findings"][0]
        assert found["severity"] == "warning"
        assert f"database role {role} of {UNIT} may not CREATE in schema public" \
            in found["message"]
        assert f"items (owner {db.owner})" in found["message"]
        assert "`alembic upgrade` for a plain Alembic app) will fail" in found["message"]
        assert f"GRANT CREATE ON SCHEMA public TO {role}" in found["remedy"]
        assert f"GRANT {db.owner} TO {role}" in found["remedy"]
        assert password not in json.dumps(unit)
    finally:
        pg.execute(f"REASSIGN OWNED BY {role} TO {db.owner}", db=db.name)
        pg.execute(f"DROP OWNED BY {role}", db=db.name)
        pg.drop_role(role)
