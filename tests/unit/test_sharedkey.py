"""Which units may share one session child (agent/privileged/sharedkey.py), and a shared
connection accepting only its own answers (agent/privileged/dbclient.py)."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from agent.context import AppContext, ContextInputs, build_context
from agent.dbsql import DBAPIError
from agent.model import ExecCommand, UnitProperties
from agent.privileged.dbclient import RemoteConnection, SessionSettings, _Channel
from agent.privileged.sharedkey import child_key
from agent.privileged.sources.database import Timeouts

URL_A = "postgresql+psycopg2://app_a:secretA1@127.0.0.1:5432/site_a"
URL_B = "postgresql+psycopg2://app_b:secretB2@127.0.0.1:5432/site_b"
GUARD = [3000, 500, 5000, 5]


def ctx(env: dict[str, str], unit: str = "a.service", **settings: object) -> AppContext:
    props = UnitProperties(
        name=unit, load_state="loaded", active_state="active", sub_state="running",
        working_directory="/srv/app", environment=tuple(f"{k}={v}" for k, v in env.items()),
        exec_start=(ExecCommand("/srv/venv/bin/gunicorn", ("gunicorn", "wsgi:app")),),
        user="www-data", group="www-data")
    built = build_context(props, ContextInputs(venvs={"/srv/venv": True}))
    return dataclasses.replace(built, exec_settings=dict(settings))


def key(c: AppContext, url: str, files: dict[str, bytes] | None = None) -> tuple[str, bool]:
    found = child_key(c, url, GUARD, False, "", read=(files or {}).get)
    return found.digest, found.shared


def test_units_differing_only_in_the_url_variable_share() -> None:
    a = ctx({"DATABASE_URL": URL_A, "TZ": "UTC"})
    b = ctx({"DATABASE_URL": URL_B, "TZ": "UTC"}, unit="b.service")
    found = child_key(a, URL_A, GUARD, False, "", read=lambda p: None)
    assert found.shared and found.unset == ("DATABASE_URL",)
    assert key(a, URL_A) == key(b, URL_B)


@pytest.mark.parametrize("other", [
    {"PGPASSFILE": "/etc/b.pgpass"},                       # libpq reads it
    {"TZ": "Europe/Paris"},
    {"ALEMBIC_URL": URL_B},                                # the URL a second time
    {"DATABASE_URL": URL_B + "x"},                          # not the URL of the session
])
def test_any_other_difference_is_another_child(other: dict[str, str]) -> None:
    a = ctx({"DATABASE_URL": URL_A, "TZ": "UTC"})
    b = ctx({"DATABASE_URL": URL_B, "TZ": "UTC", **other}, unit="b.service")
    assert key(a, URL_A)[0] != key(b, URL_B)[0]


def test_doubt_means_a_child_of_its_own() -> None:
    odd = "postgresql://u:pa$word@h/db"     # '$' means something to systemd's parsers
    assert key(ctx({"DATABASE_URL": odd}), odd)[1] is False
    # The URL inside another variable, or in an execution setting: not shared.
    assert key(ctx({"DATABASE_URL": URL_A, "X": "y " + URL_A}), URL_A)[1] is False
    assert key(ctx({"DATABASE_URL": URL_A}, SetCredential=[("db", URL_A)]), URL_A)[1] is False
    # A URL libpq's own variable holds, or the guard's settings: not shared alike.
    assert key(ctx({"PGDATABASE": URL_A}), URL_A)[1] is False
    a = ctx({"DATABASE_URL": URL_A})
    assert child_key(a, URL_A, GUARD, False, "").digest != \
        child_key(a, URL_A, [3000, 900, 5000, 5], False, "").digest
    assert child_key(a, URL_A, GUARD, False, "").digest != \
        child_key(a, URL_A, GUARD, False, "probe").digest


def test_environment_files_compared_by_their_text_with_the_url_replaced() -> None:
    def unit_with(path: str, url: str, unit: str) -> AppContext:
        return ctx({"DATABASE_URL": url}, unit, EnvironmentFiles=[(path, False)],
                   Environment=[f"DATABASE_URL={url}"] if unit == "c.service" else [])

    a = unit_with("/etc/a.env", URL_A, "a.service")
    b = unit_with("/etc/b.env", URL_B, "b.service")
    files = {"/etc/a.env": f"DATABASE_URL={URL_A}\nX=1\n".encode(),
             "/etc/b.env": f"DATABASE_URL={URL_B}\nX=1\n".encode()}
    assert key(a, URL_A, files) == key(b, URL_B, files)
    assert key(b, URL_B, {**files, "/etc/b.env": f"DATABASE_URL={URL_B}\nX=2\n".encode()}) \
        != key(a, URL_A, files)
    assert key(b, URL_B, {"/etc/a.env": files["/etc/a.env"]})[1] is False   # unreadable
    # Environment=DATABASE_URL=... in the unit: that entry's URL is replaced too.
    c1 = ctx({"DATABASE_URL": URL_A}, "c.service", Environment=[f"DATABASE_URL={URL_A}"])
    c2 = ctx({"DATABASE_URL": URL_B}, "c.service", Environment=[f"DATABASE_URL={URL_B}"])
    assert key(c1, URL_A) == key(c2, URL_B) and key(c1, URL_A)[1]


def test_an_answer_for_another_connection_is_refused_and_the_child_no_longer_trusted() -> None:
    read_fd, write_fd = os.pipe()
    sink_r, sink_w = os.pipe()
    try:
        with os.fdopen(sink_w, "wb", buffering=0) as writer:
            chan = _Channel(writer, read_fd)
            settings = SessionSettings(Timeouts())
            conn = RemoteConnection(None, -1, settings, [], channel=chan, conn_id="c1")
            other = RemoteConnection(None, -1, settings, [], channel=chan, conn_id="c2")
            os.write(write_fd, json.dumps({"conn": "c2", "rows": [[1]]}).encode() + b"\n")
            with pytest.raises(DBAPIError, match="another connection"):
                conn.execute("SELECT 1")
            assert conn.broken and other.broken   # the child itself is in doubt
            with pytest.raises(DBAPIError):
                other.execute("SELECT 1")         # nothing more is sent to it
            sent = os.read(sink_r, 65536).splitlines()
            assert [json.loads(line)["conn"] for line in sent] == ["c1"]
    finally:
        for fd in (read_fd, write_fd, sink_r):
            os.close(fd)


def test_an_interpreter_that_cannot_share_gets_a_child_per_session() -> None:
    """No psycopg2/psycopg in the app's venv (the child says "unshared"): that identity gets
    a child of its own per session, as before, and is not asked to share again."""
    from contextlib import contextmanager

    from agent.privileged import dbclient
    from agent.privileged.sessionpool import SessionPool

    started: list[str] = []

    class NoShare:
        broken = False

        def open(self, url: str, secrets: list[str]) -> object:
            raise dbclient.Unshareable(url)

    @contextmanager
    def shared_opener(*_a: object, **_k: object):  # type: ignore[no-untyped-def]
        started.append("shared")
        yield NoShare()

    @contextmanager
    def opener(_ctx: object, url: str, *_a: object, **_k: object):  # type: ignore[no-untyped-def]
        started.append(url)
        yield object()

    pool = SessionPool(opener=opener, shared_opener=shared_opener)
    for c, url in ((ctx({"DATABASE_URL": URL_A}), URL_A),
                   (ctx({"DATABASE_URL": URL_B}, "b.service"), URL_B)):
        with pool.borrow(c, url, Timeouts()):
            pass
    assert started == ["shared", URL_A, URL_B]
    assert len(pool.unshareable) == 1 and pool.children == {}
    assert (pool.started, pool.children_started) == (2, 3)
    pool.close()
    assert pool.held == {}
