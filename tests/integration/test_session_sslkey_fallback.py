"""The agent's session as the unit's user, continued: `sslkey=` alone, and the child's
SQLAlchemy fallback path.

Real PostgreSQL clusters (one with client-certificate authentication), the real test-app
venvs as the app's interpreter, the session child really running as www-data.
"""

from __future__ import annotations

import functools
import json
import os
import pwd
import shutil
import subprocess
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.asuser import dbsession
from agent.privileged.dbclient import user_session
from agent.privileged.launch import bundle
from agent.privileged.sources import database
from tests.harness.apps import (APP_USER, BASE_PYTHON, SQLALCHEMY_14_REQUIREMENTS,
                                VENV_CACHE_ROOT, as_user_argv, new_workspace)
from tests.harness.postgres import PgDatabase, PostgresCluster, sqlalchemy_url
from tests.integration.test_user_session import TIMEOUTS, unit_ctx

pytestmark = pytest.mark.postgres


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture
def cert_cluster() -> Iterator[tuple[PostgresCluster, Path]]:
    """A cluster whose role `certuser` logs in only with a client certificate (pg_hba
    `cert`), and a workspace with the CA, the client's certificate (public) and its key."""
    if shutil.which("openssl") is None:
        from tests.skiprule import skip_or_fail
        skip_or_fail("openssl is not installed")
    ws = new_workspace()
    ca_key, ca_crt = ws / "ca.key", ws / "ca.crt"
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
            "/CN=driftwatch-test-ca", "-keyout", str(ca_key), "-out", str(ca_crt))
    client_key, csr, client_crt = ws / "client.key", ws / "client.csr", ws / "client.crt"
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=certuser",
            "-keyout", str(client_key), "-out", str(csr))
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key),
            "-CAcreateserial", "-days", "1", "-out", str(client_crt))
    client_crt.chmod(0o644)  # a certificate is public
    with PostgresCluster() as cluster:
        owner = cluster.datadir.stat()
        for src, name in ((ca_crt, "server.crt"), (ca_key, "server.key"), (ca_crt, "ca.crt")):
            dest = cluster.datadir / name
            dest.write_bytes(src.read_bytes())
            dest.chmod(0o600)
            os.chown(dest, owner.st_uid, owner.st_gid)
        hba = cluster.datadir / "pg_hba.conf"
        hba.write_text("hostssl all certuser 127.0.0.1/32 cert\n" + hba.read_text())
        cluster.execute("ALTER SYSTEM SET ssl = on")
        cluster.execute("ALTER SYSTEM SET ssl_ca_file = 'ca.crt'")
        cluster.execute("SELECT pg_reload_conf()")
        cluster.create_role("certuser", None)
        yield cluster, ws
    shutil.rmtree(ws, ignore_errors=True)


def test_sslkey_alone_naming_a_root_only_key_gains_nothing(
        flask_venv: Path, cert_cluster: tuple[PostgresCluster, Path]) -> None:
    """The URL names only a private key file (the certificate is public): root could read
    the key and log in as the certificate's user, the unit's user cannot."""
    cluster, ws = cert_cluster
    private = ws / "rootonly"
    private.mkdir(mode=0o700)
    key = private / "client.key"
    shutil.move(str(ws / "client.key"), key)
    key.chmod(0o600)
    url = sqlalchemy_url("certuser", None, "postgres", cluster.host, cluster.port) + \
        f"?sslmode=require&sslcert={ws / 'client.crt'}&sslkey={key}"
    # Reproduction: root's own session reads the root-only key and logs in.
    as_root = database.inspect(url, timeouts=TIMEOUTS)
    assert as_root.reachable, as_root.error
    assert as_root.privileges.user == "certuser"
    # The agent's session runs as the unit's user: libpq cannot open the key, no login.
    opener = functools.partial(user_session, unit_ctx(flask_venv))
    as_user = database.inspect(url, timeouts=TIMEOUTS, opener=opener)
    assert not as_user.reachable
    assert "private key" in as_user.error or "Permission denied" in as_user.error, \
        as_user.error
    # And the same key readable by the unit's user (its own copy) does log in: the refusal
    # above is the file's permissions, not the setup.
    own = ws / "own.key"
    shutil.copy(key, own)
    entry = pwd.getpwnam(APP_USER)
    os.chown(own, entry.pw_uid, entry.pw_gid)
    own.chmod(0o600)
    mine = database.inspect(url.replace(str(key), str(own)), timeouts=TIMEOUTS, opener=opener)
    assert mine.reachable, mine.error


# -- the session child's SQLAlchemy fallback (the app's interpreter has neither psycopg2
#    nor psycopg importable for the child's direct path) ---------------------------------

FALLBACK_DRIVER = textwrap.dedent("""\
    import json, os, sys
    request = json.loads(os.environ.pop("REQ"))
    lines = [json.dumps(s).encode() for s in json.loads(os.environ.pop("STATEMENTS"))]
    serve_sqlalchemy(request, 1, iter(lines))
    """)


def run_fallback(venv: Path, url: str, statements: list[dict[str, object]],
                 ) -> list[dict[str, object]]:
    """The session child's serve_sqlalchemy, bundled with the read-only guard as root sends
    it, in venv's interpreter as the unit's user; its JSON answers."""
    main = Path(dbsession.__file__)
    text = main.read_text().replace('if __name__ == "__main__":\n    main(sys.argv[1:])', "")
    source = bundle(main, text) + "\n" + FALLBACK_DRIVER
    guard = {"statement_timeout_ms": 3000, "lock_timeout_ms": 1000,
             "idle_in_transaction_timeout_ms": 5000, "application_name": "driftwatch-test"}
    env = {"PATH": "/usr/bin:/bin", "REQ": json.dumps({"url": url, "guard": guard}),
           "STATEMENTS": json.dumps(statements)}
    proc = subprocess.run(as_user_argv(APP_USER, [str(venv / "bin" / "python"), "-B", "-c",
                                                  source]),
                          env=env, cwd="/", capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


@pytest.fixture(params=["sqlalchemy2", "sqlalchemy1.4"])
def fallback_venv(request: pytest.FixtureRequest, flask_venv: Path,
                  make_venv: Callable[[tuple[str, ...]], Path]) -> Path:
    return flask_venv if request.param == "sqlalchemy2" else \
        make_venv(SQLALCHEMY_14_REQUIREMENTS)


def test_sqlalchemy_fallback_is_read_only_verified_and_holds_nothing_open(
        fallback_venv: Path, pg_database: PgDatabase) -> None:
    pg_database.execute("CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY)",
                        as_owner=True)
    pg_database.execute("INSERT INTO alembic_version VALUES ('r2')", as_owner=True)
    # options= in the URL tries to lift read-only for the whole session: it cannot.
    url = pg_database.url + "?options=-c%20default_transaction_read_only%3Doff"
    answers = run_fallback(fallback_venv, url, [
        {"sql": "SELECT version_num FROM alembic_version"},
        {"sql": "SELECT CAST(:x AS int) + 1", "params": {"x": 41}},
        {"sql": "INSERT INTO alembic_version VALUES ('evil')"},
        {"sql": "COMMIT; BEGIN READ WRITE; INSERT INTO alembic_version VALUES ('evil2')"},
        {"sql": "SHOW transaction_read_only"},
        {"sql": "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in%' "
                "AND application_name = 'driftwatch-test'"},
    ])
    hello, version, plus, insert, multi, ro, idle = answers
    assert hello == {"ok": True}
    assert version == {"rows": [["r2"]]} and plus == {"rows": [[42]]}
    assert insert.get("sqlstate") == "25006", insert  # read_only_sql_transaction
    assert "one statement" in str(multi.get("error")), multi
    assert ro == {"rows": [["on"]]}
    assert idle == {"rows": [[0]]}  # rolled back after every statement, nothing held open
    assert [r[0] for r in pg_database.execute(
        "SELECT version_num FROM alembic_version", as_owner=True)] == ["r2"]


def test_sqlalchemy_fallback_with_an_unreachable_database_says_so(
        fallback_venv: Path) -> None:
    answers = run_fallback(fallback_venv, "postgresql://nobody@127.0.0.1:1/x", [])
    assert len(answers) == 1 and answers[0]["ok"] is False
    assert "Connection refused" in str(answers[0]["error"]) or \
        "connect" in str(answers[0]["error"]), answers


#: An app on pg8000: SQLAlchemy, but neither psycopg2 nor psycopg for the direct path.
PG8000_REQUIREMENTS = ("sqlalchemy==2.0.58", "pg8000==1.31.6")


@pytest.fixture(scope="session")
def pg8000_venv() -> Path:
    """A venv with SQLAlchemy and pg8000 only, built once (cached like the app venvs)."""
    final = VENV_CACHE_ROOT / "pg8000-sqlalchemy2"
    if (final / "ok").exists():
        return final
    shutil.rmtree(final, ignore_errors=True)  # an unfinished build (no "ok" marker)
    try:
        subprocess.run([BASE_PYTHON, "-m", "venv", str(final)], check=True, capture_output=True)
        subprocess.run([str(final / "bin" / "python"), "-m", "pip", "install", "-q",
                        *PG8000_REQUIREMENTS], check=True, capture_output=True, timeout=600)
    except (subprocess.SubprocessError, OSError) as exc:
        shutil.rmtree(final, ignore_errors=True)
        from tests.skiprule import skip_or_fail
        skip_or_fail(f"could not build a pg8000 venv: {exc}")
    subprocess.run(["chmod", "-R", "a+rX", str(final)], check=True)
    (final / "ok").write_text("")
    return final


def test_session_on_a_driver_the_guard_cannot_ask_is_refused_clearly(
        pg8000_venv: Path, pg_database: PgDatabase) -> None:
    """The app's interpreter has no psycopg2/psycopg: the child falls back to SQLAlchemy;
    pg8000 cannot say whether a transaction is open, so the guard refuses every statement,
    with a reason naming the driver, and nothing runs."""
    python = pg8000_venv / "bin" / "python3"
    ctx = unit_ctx(pg8000_venv)
    assert ctx.python == str(python) or ctx.venv == str(pg8000_venv), ctx
    opener = functools.partial(user_session, ctx)
    url = pg_database.url.replace("postgresql+psycopg2://", "postgresql+pg8000://", 1)
    assert url.startswith("postgresql+pg8000://"), url
    found = database.inspect(url, timeouts=TIMEOUTS, opener=opener)
    assert not found.reachable
    assert "pg8000" in found.error and "only psycopg2 and psycopg" in found.error, found.error
    assert pg_database.password not in found.error
    # Nor does a psycopg2 URL reach anything through an interpreter without psycopg2.
    plain = database.inspect(pg_database.url, timeouts=TIMEOUTS, opener=opener)
    assert not plain.reachable and "psycopg2" in plain.error, plain.error
