"""agent.dburl against the real make_url of SQLAlchemy 1.4, 2.0 and 2.1, on generated URLs.

Each SQLAlchemy runs in a test app's venv (tests/harness/apps.py) as a line-by-line oracle:
one URL in, its parts (or the exception's class) out. Root parses the app's URL with
agent.dburl instead of importing SQLAlchemy (about 25 MiB), so both must read every URL alike.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.dburl import ArgumentError, make_url
from tests.harness.apps import (SQLALCHEMY_14_REQUIREMENTS, SQLALCHEMY_20_REQUIREMENTS,
                                SQLALCHEMY_21_REQUIREMENTS)

ORACLE = r"""
import json, sys
from sqlalchemy import __version__
from sqlalchemy.engine import make_url
print(json.dumps(__version__), flush=True)
for line in sys.stdin:
    try:
        u = make_url(json.loads(line))
        q = {k: (v if isinstance(v, str) else list(v)) for k, v in u.query.items()}
        out = {"parts": [u.drivername, u.username, None if u.password is None else str(u.password),
                         u.host, u.port, u.database, q, u.get_backend_name()],
               "render": u.render_as_string(hide_password=False)}
    except Exception as exc:
        out = {"error": type(exc).__name__}
    print(json.dumps(out), flush=True)
"""

VERSIONS = {"1.4": SQLALCHEMY_14_REQUIREMENTS, "2.0": SQLALCHEMY_20_REQUIREMENTS,
            "2.1": SQLALCHEMY_21_REQUIREMENTS}


class Oracle:
    """The real make_url of one SQLAlchemy, in its own interpreter."""

    def __init__(self, python: Path) -> None:
        self.proc = subprocess.Popen([str(python), "-c", ORACLE], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.version = json.loads(self.proc.stdout.readline())   # type: ignore[union-attr]

    def parse(self, url: str) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps(url) + "\n")   # type: ignore[union-attr]
        self.proc.stdin.flush()   # type: ignore[union-attr]
        return json.loads(self.proc.stdout.readline())   # type: ignore[union-attr]

    def close(self) -> None:
        self.proc.stdin.close()   # type: ignore[union-attr]
        self.proc.wait(10)


@pytest.fixture(scope="module", params=sorted(VERSIONS))
def oracle(request: pytest.FixtureRequest,
           make_venv: Callable[[tuple[str, ...]], Path]) -> Iterator[Oracle]:
    one = Oracle(make_venv(VERSIONS[request.param]) / "bin" / "python")
    assert one.version.startswith(request.param)
    yield one
    one.close()


def ours(url: str) -> dict[str, Any]:
    """The same answer from agent.dburl."""
    try:
        u = make_url(url)
    except ArgumentError:
        return {"error": "ArgumentError"}
    except ValueError:
        return {"error": "ValueError"}
    q = {k: (v if isinstance(v, str) else list(v)) for k, v in u.query.items()}
    return {"parts": [u.drivername, u.username, u.password, u.host, u.port, u.database, q,
                      u.get_backend_name()],
            "render": u.render_as_string(hide_password=False)}


# -- generated URLs ---------------------------------------------------------------------------
NASTY = "@:/%+?#&=[] ~!$'();,*\\\"é€"
nasty_text = st.text(alphabet=st.sampled_from(NASTY + "abcXYZ019._-"), max_size=12)


@st.composite
def encoded(draw: st.DrawFn, raw: st.SearchStrategy[str]) -> str:
    """A part as a user writes it: raw, percent-encoded, or partly so."""
    text = draw(raw)
    how = draw(st.sampled_from(["raw", "quote", "quote_plus_safe", "escape"]))
    if how == "quote":
        return quote(text, safe="")
    if how == "quote_plus_safe":
        return quote(text, safe=" +")
    if how == "escape":
        return text + draw(st.sampled_from(["%40", "%3A", "%2F", "%25", "%", "%zz", "%2"]))
    return text


drivers = st.one_of(
    st.sampled_from(["postgresql", "postgresql+psycopg2", "postgres", "postgresql+psycopg",
                     "mysql+pymysql", "mariadb+mariadbconnector", "sqlite", "sqlite+pysqlite",
                     "mssql+pyodbc", "oracle+cx_oracle"]),
    st.text(alphabet="abcz_+1-.", min_size=0, max_size=8))
hosts = st.one_of(
    st.just(""), st.sampled_from(["localhost", "db.example.com", "127.0.0.1", "[::1]",
                                  "[fe80::1%25eth0]", "[2001:db8::5]", "[::1", "db_1"]),
    st.text(alphabet="abc.-_:[]%@", max_size=8))
ports = st.one_of(st.just(""), st.just(":5432"), st.just(":"), st.just(":54x"),
                  st.integers(0, 99999).map(lambda p: f":{p}"))
queries = st.lists(st.tuples(
    st.sampled_from(["host", "port", "options", "sslmode", "password", "a", "a b", "k%3D", ""]),
    encoded(nasty_text)), max_size=4).map(
    lambda kv: "?" + "&".join(f"{k}={v}" for k, v in kv) if kv else "")


@st.composite
def urls(draw: st.DrawFn) -> str:
    """SQLAlchemy-style URLs with hostile parts, or now and then any text at all."""
    if draw(st.integers(0, 19)) == 0:
        return draw(st.text(max_size=30))
    url = draw(drivers) + "://"
    if draw(st.booleans()):
        url += draw(encoded(nasty_text))
        if draw(st.booleans()):
            url += ":" + draw(encoded(nasty_text))
        url += "@"
    url += draw(hosts) + draw(ports)
    if draw(st.booleans()):
        url += "/" + draw(st.one_of(encoded(nasty_text),
                                    st.sampled_from(["/var/lib/app.db", "app.db", ":memory:",
                                                     "rel/path%20x.db", ""])))
    return url + draw(queries)


def compare(version: str, theirs: dict[str, Any], mine: dict[str, Any]) -> None:
    """Equal to SQLAlchemy 2.1 (the agent's own, which root used before); before 2.1 the
    database part was not percent-decoded (nor encoded when rendered): there, ours must be
    exactly theirs decoded, everything else equal."""
    if version.startswith("2.1") or theirs == mine:
        assert theirs == mine
        return
    theirs, mine = dict(theirs), dict(mine)
    theirs.pop("render", None)
    mine.pop("render", None)
    if "parts" in theirs and "parts" in mine and theirs["parts"][5] is not None:
        assert mine["parts"][5] == unquote(theirs["parts"][5])
        theirs["parts"][5] = mine["parts"][5]
    assert theirs == mine


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(url=urls())
def test_parts_equal_the_real_make_url(oracle: Oracle, url: str) -> None:
    compare(oracle.version, oracle.parse(url), ours(url))


@pytest.mark.parametrize("url", [
    "postgresql://u:p%40ss%3Aw/rd@db.example.com:6432/app%2Fdb?sslmode=require&options=-c%20x%3Dy",
    "postgresql://user:pa@ss@host/db",                # the password runs to the last '@'
    "postgresql://u:p@[::1]:5433/db",
    "postgresql:///app?host=/var/run/postgresql&port=5433",
    "postgresql://u@/db?host=h1&host=h2",             # a repeated key becomes a list
    "sqlite:////var/lib/app/app.db",
    "sqlite://",
    "postgresql://h:/db",                             # empty port: ValueError, as SQLAlchemy
    "postgresql://h:54x/db",
    "not a url",
])
def test_the_known_hard_cases(oracle: Oracle, url: str) -> None:
    compare(oracle.version, oracle.parse(url), ours(url))
