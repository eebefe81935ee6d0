"""agentctl check on a real Flask-Migrate app on PyMySQL under gunicorn.service (real
systemd), against a throwaway MariaDB (Debian's mariadb-server, tests/harness/mariadb.py).

The sandbox shares the host's network namespace: the unit reaches the server on 127.0.0.1.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.harness.agent import agentctl
from tests.harness.apps import (
    APP_USER,
    AppDir,
    AppSpec,
    db_upgrade,
    env_file_text,
    flask_db_check,
    gunicorn_pids,
    gunicorn_unit,
    http_get,
    standard_revisions,
    unit_diagnostics,
)
from tests.harness.mariadb import MariaDatabase, MariaDBServer
from tests.integration.test_mysql import half_applied_spec
from tests.harness.postgres import free_port
from tests.harness.sandbox import Sandbox

pytestmark = [pytest.mark.systemd]

UNIT = "gunicorn.service"
ENV_FILE = "/etc/site/env"


def boot_site(make_sandbox: Callable[[], Sandbox], app: AppDir, venv: Path, url: str,
              ) -> tuple[Sandbox, int]:
    """The app under gunicorn.service with DATABASE_URL=url; the workers have connected."""
    port = free_port()
    sb = make_sandbox()
    sb.add_file(ENV_FILE, env_file_text({"DATABASE_URL": url}))
    sb.add_unit(UNIT, gunicorn_unit(venv=venv, app_dir=app, port=port,
                                    environment={"FLASK_APP": "wsgi.py"},
                                    environment_files=[ENV_FILE]))
    sb.boot()
    sb.systemctl("start", UNIT)
    http_get(f"http://127.0.0.1:{port}/healthz", describe=lambda: unit_diagnostics(sb, UNIT))
    gunicorn_pids(sb, UNIT)
    for _ in range(4):  # each worker opens its pooled connection (a 500 is fine: it connected)
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/db", timeout=10).read()
        except urllib.error.HTTPError:
            pass
    return sb, port


def check(sb: Sandbox) -> tuple[int, dict[str, Any], str]:
    proc = agentctl(sb, "check", UNIT, "--json", "--probe-timeout", "30")
    assert proc.returncode in (0, 1, 2), proc.stderr
    return proc.returncode, json.loads(proc.stdout)["units"][0], proc.stdout + proc.stderr


def test_pending_revision_and_drift_on_mariadb(
        make_sandbox: Callable[[], Sandbox], make_app: Callable[..., AppDir],
        pymysql_venv: Path, maria_database: MariaDatabase) -> None:
    app = make_app()
    url = maria_database.url
    db_upgrade(app, pymysql_venv, url, "r2", user=APP_USER)
    sb, _port = boot_site(make_sandbox, app, pymysql_venv, url)
    code, unit, output = check(sb)
    found = {f["check"]: f for f in unit["findings"]}
    assert unit["backend"] == "mysql", unit
    assert unit["database"] == f"127.0.0.1:{maria_database.server.port}/{maria_database.name}"
    assert "backend_not_inspected" not in found and "database_unreachable" not in found
    assert unit["db_up"] is True
    m = unit["migrations"]
    assert m["current"] == ["r2"] and m["heads"] == ["r3"] and m["pending"] == ["r3"], m
    assert "pending_migrations" in found and found["pending_migrations"]["severity"] == \
        "critical"
    # The table r3 adds (`flask db check` only says "not up to date" while r3 is pending).
    assert "schema_drift" in found, unit["findings"]
    assert flask_db_check(app, pymysql_venv, url).not_up_to_date
    assert [(d["kind"], d["table"]) for d in unit["schema_drift"]["items"]] == \
        [("missing_table", "posts")]
    assert unit["migration_privileges_ok"] is True
    # The workers are connected to that server (their own sockets), by database name.
    assert unit["database_mismatch"] is False, unit["database_connections"]
    assert maria_database.name in unit["database_connections"], unit["database_connections"]
    assert code == 1
    assert maria_database.password not in output
    text = agentctl(sb, "check", UNIT).stdout
    assert "mysql" in text and maria_database.password not in text
    # Read-only: nothing was written by the check.
    assert maria_database.alembic_versions() == ["r2"]


def test_at_head_and_clean_is_healthy(
        make_sandbox: Callable[[], Sandbox], make_app: Callable[..., AppDir],
        pymysql_venv: Path, maria_database: MariaDatabase) -> None:
    app = make_app(AppSpec(models_at=3))
    url = maria_database.url
    db_upgrade(app, pymysql_venv, url, "head", user=APP_USER)
    sb, _port = boot_site(make_sandbox, app, pymysql_venv, url)
    code, unit, _ = check(sb)
    assert unit["migrations"]["current"] == ["r3"] and unit["migrations"]["pending"] == []
    assert unit["schema_drift"]["count"] == 0, unit["schema_drift"]
    assert not [f for f in unit["findings"] if f["severity"] != "info"], unit["findings"]
    assert code == 0


def test_a_revision_that_failed_halfway_is_said_exactly(
        make_sandbox: Callable[[], Sandbox], make_app: Callable[..., AppDir],
        pymysql_venv: Path, maria_database: MariaDatabase) -> None:
    """r3 created posts and then failed: not "1 pending" (a retry fails on posts) and not
    "drift", but the revision, what it did, what it did not, and finish-then-stamp."""
    app = make_app(half_applied_spec())
    url = maria_database.url
    failed = db_upgrade(app, pymysql_venv, url, "head", user=APP_USER, check=False)
    assert failed.returncode != 0
    assert maria_database.alembic_versions() == ["r2"] and "posts" in maria_database.tables()
    sb, _port = boot_site(make_sandbox, app, pymysql_venv, url)
    code, unit, output = check(sb)
    found = {f["check"]: f for f in unit["findings"]}
    assert "half_applied_revision" in found, unit["findings"]
    assert "pending_migrations" not in found and "schema_drift" not in found
    half = found["half_applied_revision"]
    assert half["severity"] == "critical"
    assert "alembic_version of gunicorn.service says r2, but revision r3 (create posts) ran " \
        "in part and failed: already done: table posts exists; not done: column users.bio, index " \
        "ix_posts_title on posts" in half["message"], half["message"]
    assert half["remedy"].startswith("finish revision r3 by hand") and \
        "flask db stamp r3" in half["remedy"]
    assert unit["migrations"]["current"] == ["r2"] and unit["migrations"]["pending"] == ["r3"]
    assert code == 1 and maria_database.password not in output
    text = agentctl(sb, "check", UNIT).stdout
    print(text)  # the README's example (pytest -s)
    assert "half_applied_revision" in text


def test_workers_on_one_database_while_the_env_file_names_another_on_the_same_server(
        make_sandbox: Callable[[], Sandbox], make_app: Callable[..., AppDir],
        pymysql_venv: Path, maria_database: MariaDatabase) -> None:
    """Workers serve from the app's database (r2, r3 pending) while the env file now names
    a staging database on the same server that was never migrated: both states, by name
    (the server's processlist names the workers' database from their own sockets)."""
    app = make_app()
    url = maria_database.url
    db_upgrade(app, pymysql_venv, url, "r2", user=APP_USER)
    staging = f"{maria_database.name}_staging"
    server = maria_database.server
    server.execute(f"CREATE DATABASE `{staging}`")
    server.execute(f"GRANT ALL PRIVILEGES ON `{staging}`.* TO '{maria_database.user}'@'%'")
    try:
        sb, _port = boot_site(make_sandbox, app, pymysql_venv, url)
        sb.write_file(ENV_FILE, env_file_text({"DATABASE_URL": url.rsplit("/", 1)[0]
                                               + "/" + staging}))
        code, unit, output = check(sb)
        assert unit["database_mismatch"] is True, unit["database_connections"]
        assert unit["database"].endswith(f"/{staging}")
        found = next(f for f in unit["findings"] if f["check"] == "database_mismatch")
        message = found["message"]
        assert f"connected to database {maria_database.name} as role {maria_database.user}" \
            in message, message
        assert f"not to {staging} that the unit's environment names" in message
        assert f"Running now: {maria_database.name} at r2, 1 pending (r3)" in message
        assert f"After a restart: {staging} never migrated (no alembic_version table)" \
            in message
        assert code == 1 and maria_database.password not in output
    finally:
        server.execute(f"DROP DATABASE IF EXISTS `{staging}`")


SLOW_R3 = """\
op.execute("CREATE TABLE slow_copy AS SELECT SLEEP(15) AS x")
op.create_table('posts',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('title', sa.String(length=200), nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], ),
    sa.PrimaryKeyConstraint('id')
)"""


def test_an_upgrade_running_ddl_is_in_progress_not_pending(
        make_sandbox: Callable[[], Sandbox], make_app: Callable[..., AppDir],
        pymysql_venv: Path, maria_database: MariaDatabase) -> None:
    """A real `flask db upgrade` whose r3 runs a long DDL statement: migration_in_progress
    (from the processlist), nothing pending paged, drift held back; the upgrade finishes."""
    r1, r2, r3 = standard_revisions(3)
    app = make_app(AppSpec(models_at=3, revisions=(r1, r2, replace(r3, upgrade=SLOW_R3))))
    url = maria_database.url
    db_upgrade(app, pymysql_venv, url, "r2", user=APP_USER)
    sb, _port = boot_site(make_sandbox, app, pymysql_venv, url)
    upgrade: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: upgrade.update(proc=db_upgrade(
        app, pymysql_venv, url, "head", user=APP_USER, check=False)), daemon=True)
    runner.start()
    try:
        for _ in range(100):
            if maria_database.execute("SELECT COUNT(*) FROM information_schema.processlist "
                                      "WHERE info LIKE 'CREATE TABLE slow_copy%%'")[0][0]:
                break
            time.sleep(0.1)
        code, unit, output = check(sb)
        found = {f["check"]: f for f in unit["findings"]}
        assert "migration_in_progress" in found, unit["findings"]
        assert "running DDL" in found["migration_in_progress"]["message"]
        assert "slow_copy" in found["migration_in_progress"]["message"]
        assert "pending_migrations" not in found and "schema_drift" not in found
        assert unit["migrations"]["in_progress"] is True
        assert unit["schema_drift"] is None
    finally:
        runner.join(timeout=60)
    assert upgrade["proc"].returncode == 0, upgrade["proc"].stderr
    assert maria_database.alembic_versions() == ["r3"]


def test_a_user_that_may_not_migrate_gets_the_grant_to_run(
        make_sandbox: Callable[[], Sandbox], make_app: Callable[..., AppDir],
        pymysql_venv: Path, maria_database: MariaDatabase) -> None:
    """The app's user has only SELECT/INSERT/UPDATE/DELETE (SHOW GRANTS): a warning with
    what is missing and the GRANT; the migrations were run by another user."""
    app = make_app()
    db_upgrade(app, pymysql_venv, maria_database.url, "head", user=APP_USER)
    server = maria_database.server
    limited, password = f"{maria_database.name}_ro", "Lim1ted-pw"
    server.execute(f"CREATE USER '{limited}'@'%' IDENTIFIED BY '{password}'")
    server.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON `{maria_database.name}`.* "
                   f"TO '{limited}'@'%'")
    try:
        url = server.url(limited, password, maria_database.name)
        sb, _port = boot_site(make_sandbox, app, pymysql_venv, url)
        code, unit, output = check(sb)
        found = {f["check"]: f for f in unit["findings"]}
        priv = found["insufficient_db_privileges"]
        assert f"database user {limited}@% of gunicorn.service lacks CREATE, DROP, ALTER, " \
            f"INDEX, REFERENCES on {maria_database.name}.*" in priv["message"], priv
        assert f"GRANT CREATE, DROP, ALTER, INDEX, REFERENCES ON `{maria_database.name}`.* " \
            f"TO '{limited}'@'%'" in priv["remedy"]
        assert unit["migration_privileges_ok"] is False
        assert unit["migrations"]["current"] == ["r3"] and code == 1
        assert password not in output
    finally:
        server.execute(f"DROP USER IF EXISTS '{limited}'@'%'")


def test_workers_connected_to_another_server_than_the_unit_says(
        make_sandbox: Callable[[], Sandbox], make_app: Callable[..., AppDir],
        pymysql_venv: Path, maria_database: MariaDatabase) -> None:
    """The env file now names a second MariaDB; the running workers still hold connections
    to the first (their own sockets): database_mismatch, and the restart finding."""
    app = make_app()
    db_upgrade(app, pymysql_venv, maria_database.url, "head", user=APP_USER)
    other = MariaDBServer().start()
    try:
        moved = other.new_database()
        db_upgrade(app, pymysql_venv, moved.url, "head", user=APP_USER)
        sb, _port = boot_site(make_sandbox, app, pymysql_venv, maria_database.url)
        sb.write_file(ENV_FILE, env_file_text({"DATABASE_URL": moved.url}))
        code, unit, output = check(sb)
        found = {f["check"]: f for f in unit["findings"]}
        assert unit["database_mismatch"] is True, unit["database_connections"]
        assert "database_mismatch" in found and "environment_stale" in found
        assert f"127.0.0.1:{maria_database.server.port}" in found["database_mismatch"]["message"]
        assert unit["database"] == f"127.0.0.1:{other.port}/{moved.name}"
        assert maria_database.password not in output and moved.password not in output
    finally:
        other.stop()
