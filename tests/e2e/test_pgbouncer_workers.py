"""The workers' database by name when they connect through a real PgBouncer.

gunicorn.service (a real Flask app) in a sandbox systemd reaches a real PostgreSQL 15 through
Debian's pgbouncer in transaction-pooling mode. The server sees only PgBouncer's
connections, so pg_stat_activity names none of the workers'; PgBouncer's own console (SHOW
CLIENTS / SHOW DATABASES), read as the unit's user with the app's credentials, does.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.apps import AppDir, http_get
from tests.harness.pgbouncer import PgBouncer, pgbouncer_unavailable_reason
from tests.harness.postgres import PgDatabase, PostgresCluster
from tests.harness.sandbox import Sandbox
from tests.harness.site import SiteFactory, site_factory
from tests.skiprule import skip_or_fail

pytestmark = [pytest.mark.systemd, pytest.mark.postgres]


@pytest.fixture
def site(make_sandbox: Callable[[], Sandbox], make_app: Callable[..., AppDir],
         flask_venv: Path, pg_database: PgDatabase) -> SiteFactory:
    return site_factory(make_sandbox, make_app, flask_venv, pg_database)


@pytest.fixture(params=[True, False], ids=["console", "no-console"])
def bouncer(request: pytest.FixtureRequest, pg_database: PgDatabase) -> Iterator[PgBouncer]:
    """PgBouncer in front of the test cluster; the app's role in stats_users or not."""
    reason = pgbouncer_unavailable_reason()
    if reason:
        skip_or_fail(reason)
    stats = (pg_database.owner,) if request.param else ()
    with PgBouncer(pg_database.cluster, users={pg_database.owner: pg_database.password},
                   stats_users=stats) as b:
        yield b


def finding(unit: dict[str, Any], check: str) -> dict[str, Any] | None:
    return next((f for f in unit["findings"] if f["check"] == check), None)


def test_workers_through_pgbouncer_on_one_database_while_the_env_names_another(
        site: SiteFactory, bouncer: PgBouncer, pg: PostgresCluster,
        pg_database: PgDatabase) -> None:
    """The seed's first cause behind a pooler: workers on `app` (r3 pending) through
    PgBouncer, the env file now names `app_staging` (never migrated) through the same
    PgBouncer. With the console: both databases by name, both states. Without: an honest
    "through PgBouncer, database X per its URL", never a guess."""
    db = pg_database
    s = site(upgrade_to="r2", url=bouncer.url(db.owner, db.password, db.name))
    staging = f"{db.name}_staging"
    pg.create_database(staging, owner=db.owner)
    try:
        for _ in range(4):  # every worker serves /db through PgBouncer (a 500: r3 pending)
            assert http_get(f"http://127.0.0.1:{s.port}/db")[0] == 500
        s.set_database_url(bouncer.url(db.owner, db.password, staging))
        code, unit = s.check()
        print(json.dumps({k: unit.get(k) for k in ("database_connections", "notes")},
                         indent=1))  # -s shows the real output quoted in the README
        assert db.password not in json.dumps(unit)
        where = f"PgBouncer at 127.0.0.1:{bouncer.port}"
        if bouncer.stats_users:
            assert unit["database_mismatch"] is True, unit["database_connections"]
            found = finding(unit, "database_mismatch")
            assert found is not None, unit["findings"]
            message = found["message"]
            assert f"connected to database {db.name} as role {db.owner} on {where}" \
                in message, message
            assert f"not to {staging} that the unit's environment names" in message
            assert f"Running now: {db.name} at r2, 1 pending (r3)" in message
            assert f"After a restart: {staging} never migrated (no alembic_version table): " \
                "a restart would make it worse" in message
            assert f"by name: {db.name} as {db.owner}" in unit["database_connections"]
            assert f"through {where} ({db.name} -> 127.0.0.1:{pg.port}/{db.name})" \
                in unit["database_connections"]
        else:
            assert finding(unit, "database_mismatch") is None, unit["findings"]
            text = unit["database_connections"]
            assert f"through PgBouncer at 127.0.0.1:{bouncer.port}: database {db.name} per " \
                "the URL the running workers were started with (the unit's environment now " \
                f"names {staging}) (the workers' own database not confirmed" in text, text
            assert "not allowed" in text
            assert any("stats_users" in n for n in unit.get("notes") or []), unit.get("notes")
        assert unit["database"].endswith(f"/{staging}")
    finally:
        pg.drop_database(staging)
