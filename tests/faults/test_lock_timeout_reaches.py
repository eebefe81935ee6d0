"""lock_timeout reaches the migration's session even when the app's URL has options=
(real PostgreSQL, real psycopg2 and SQLAlchemy)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.pool import Pool

from agent.asuser import upgrade_child
from tests.harness.postgres import PgDatabase

pytestmark = pytest.mark.postgres


@pytest.fixture
def pgoptions_lock_timeout() -> Iterator[None]:
    """PGOPTIONS as agentctl upgrade sets it for the migration."""
    saved = os.environ.get("PGOPTIONS")
    os.environ["PGOPTIONS"] = "-c lock_timeout=500"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("PGOPTIONS", None)
        else:
            os.environ["PGOPTIONS"] = saved


def lock_timeout_seen(url: str) -> str:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return conn.exec_driver_sql("SHOW lock_timeout").scalar()
    finally:
        engine.dispose()


def test_options_in_the_url_replace_pgoptions_and_the_set_restores_it(
        pg_database: PgDatabase, pgoptions_lock_timeout: None) -> None:
    plain = pg_database.url
    with_options = f"{plain}?options=-c%20search_path%3Dpublic"
    # The control: PGOPTIONS alone reaches a plain URL, but options= replaces it entirely.
    seen = {"plain": lock_timeout_seen(plain), "options=": lock_timeout_seen(with_options)}
    listener = upgrade_child.bound_lock_waits(500)
    try:
        seen["options= + SET"] = lock_timeout_seen(with_options)
    finally:
        event.remove(Pool, "connect", listener)
    print(f"\nlock_timeout seen by the session: {seen}")
    assert seen == {"plain": "500ms", "options=": "0", "options= + SET": "500ms"}
