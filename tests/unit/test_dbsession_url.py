"""The session child reads the app's URL as the app's SQLAlchemy does: a '+' in the query is a
space (`options=-c+search_path=app`); libpq would pass it on literally and the server refuses
"+search_path" (found by the upgrade e2e test with options= in the URL)."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest

from agent.asuser import dbsession


def test_query_parameters_go_to_the_driver_as_sqlalchemy_decodes_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    fake = types.ModuleType("psycopg2")
    fake.connect = lambda dsn, **kw: seen.update(dsn=dsn, kw=kw) or "conn"  # type: ignore
    monkeypatch.setitem(sys.modules, "psycopg2", fake)
    url = ("postgresql+psycopg2://app:p%40ss@db:5432/shop"
           "?options=-c+search_path%3Dapp&sslmode=require")
    assert dbsession.driver_connect(url) == "conn"
    assert seen["dsn"] == "postgresql://app:p%40ss@db:5432/shop"
    assert seen["kw"] == {"options": "-c search_path=app", "sslmode": "require"}
