"""A risky upgrade behind a blocker gives up at lock_timeout and never stalls readers for longer.

Real parts: sandbox systemd running gunicorn.service, real PostgreSQL, `agentctl upgrade`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness.apps import AppDir
from tests.harness.postgres import PgDatabase
from tests.harness.preflight_apps import UNSAFE, fill_items, preflight_spec
from tests.harness.sandbox import Sandbox
from tests.harness.site import Site, SiteFactory, site_factory

pytestmark = [pytest.mark.systemd, pytest.mark.postgres]

ROWS = 200_000
LOCK_TIMEOUT = 0.5  # seconds, passed as --lock-timeout
# Slack on top of lock_timeout + the reader's own uncontended count(*) time: PostgreSQL's
# lock_timeout fires from a timer checked when the backend wakes, then the waiters behind the
# withdrawn request are woken and must be scheduled; on this 2-core machine shared by several
# test runs that is tens of ms, so 0.25 s is generous yet far below a second attempt's wait.
SLACK = 0.25


@pytest.fixture
def site(make_sandbox: Callable[[], Sandbox], make_app: Callable[..., AppDir],
         flask_venv: Path, pg_database: PgDatabase) -> SiteFactory:
    return site_factory(make_sandbox, make_app, flask_venv, pg_database)


class Reader(threading.Thread):
    """SELECT count(*) FROM items in a loop, in autocommit, timing each read."""

    def __init__(self, s: Site) -> None:
        super().__init__(daemon=True)
        self.conn = s.db.cluster.connect(s.db.name, s.db.owner, s.db.password)
        # A safety net only: if readers were blocked for good, the test fails, not hangs.
        self.conn.cursor().execute("SET statement_timeout = '60s'")
        self.stop = threading.Event()
        self.waits: list[float] = []
        self.error: BaseException | None = None

    def read_once(self) -> float:
        cur = self.conn.cursor()
        started = time.monotonic()
        cur.execute("SELECT count(*) FROM items")
        assert cur.fetchone()[0] == ROWS
        return time.monotonic() - started

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.waits.append(self.read_once())
                time.sleep(0.005)  # leaves a gap so a queued ALTER can be observed between reads
        except BaseException as exc:  # reported by the test, not lost in the thread
            self.error = exc


def column_type(s: Site, table: str, column: str) -> str:
    return s.db.execute("SELECT data_type FROM information_schema.columns WHERE table_name = "
                        "%s AND column_name = %s", (table, column))[0][0]


def test_risky_upgrade_behind_a_blocker_stops_at_lock_timeout_without_blocking_readers(
        site: SiteFactory) -> None:
    # u_type: ALTER COLUMN ... TYPE bigint, an ACCESS EXCLUSIVE lock and a rewrite of items.
    body = next(b for rev, _, b in UNSAFE if rev == "u_type")
    s = site(preflight_spec([("u_type", body)]), upgrade_to="p1")
    fill_items(s.db, ROWS)
    assert column_type(s, "items", "org_id") == "integer"

    reader = Reader(s)
    baseline = max(reader.read_once() for _ in range(10))  # uncontended count(*) time
    # The blocker: a transaction that read items and stays open (ACCESS SHARE, idle in
    # transaction), as a report or a pg_dump would. Readers coexist with it; the ALTER cannot.
    blocker = s.db.cluster.connect(s.db.name, s.db.owner, s.db.password, autocommit=False)
    blocker.cursor().execute("SELECT count(*) FROM items")
    try:
        reader.start()
        started = time.monotonic()
        proc = s.agentctl("upgrade", "gunicorn", "--yes", "--accept-risk", "--probe-timeout",
                          "30", "--lock-timeout", str(LOCK_TIMEOUT), "--lock-retries", "1",
                          "--timeout", "120")
        took = time.monotonic() - started
        reader.stop.set()
        reader.join(timeout=90)
        assert blocker.get_transaction_status() != 0  # still open through the whole upgrade
    finally:
        reader.stop.set()
        blocker.rollback()
        blocker.close()
        reader.conn.close()
    assert reader.error is None, reader.error
    waits = reader.waits
    longest = max(waits)
    print(f"\n{proc.stdout}{proc.stderr}")
    print(f"reader during the upgrade: {len(waits)} reads of {ROWS} rows, longest wait "
          f"{longest * 1000:.0f} ms (lock_timeout {LOCK_TIMEOUT * 1000:.0f} ms, uncontended "
          f"read {baseline * 1000:.0f} ms), {sum(w > 0.1 for w in waits)} reads over 100 ms; "
          f"upgrade exit {proc.returncode} after {took:.1f} s")

    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "lock_timeout (500 ms); attempt 1 of 2 rolled back" in proc.stdout
    assert "canceling statement due to lock timeout" in proc.stderr
    assert "flask db upgrade exited with status 1" in proc.stderr
    assert s.db.alembic_versions() == ["p1"]
    assert column_type(s, "items", "org_id") == "integer"  # the ALTER was rolled back
    # The reader really queued behind the ALTER's request (else this proves nothing) ...
    assert longest > LOCK_TIMEOUT / 2, waits
    # ... and the request was withdrawn at lock_timeout, so the reader went on.
    assert longest <= LOCK_TIMEOUT + baseline + SLACK, waits
