"""SQLAlchemy's database URL grammar, without importing SQLAlchemy (root reads URLs only).

The pattern, the unquoting and the rendering are copied from SQLAlchemy 2.x
``sqlalchemy/engine/url.py`` (``_parse_url``, ``URL.create``, ``URL.set``,
``URL.render_as_string``, ``URL.get_backend_name``):

    Copyright (C) 2005-2026 the SQLAlchemy authors and contributors <see AUTHORS file>
    Released under the MIT License: https://www.opensource.org/licenses/mit-license.php

Importing SQLAlchemy costs the agent's root processes about 25 MiB; they only ever take a URL
apart. ``tests/unit/test_dburl.py`` checks this copy against the real ``make_url`` of
SQLAlchemy 1.4, 2.0 and 2.1 on generated URLs (1.4 differs in one documented point: it keeps
``%xx`` escapes in the database part).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, quote, quote_plus, unquote

QueryValue = str | tuple[str, ...]

_EMPTY: Mapping[str, QueryValue] = MappingProxyType({})

# SQLAlchemy 2.x's _parse_url pattern, verbatim.
_PATTERN = re.compile(
    r"""
        (?P<name>[\w\+]+)://
        (?:
            (?P<username>[^:/]*)
            (?::(?P<password>[^@]*))?
        @)?
        (?:
            (?:
                \[(?P<ipv6host>[^/\?]+)\] |
                (?P<ipv4host>[^/:\?]+)
            )?
            (?::(?P<port>[^/\?]*))?
        )?
        (?:/(?P<database>[^\?]*))?
        (?:\?(?P<query>.*))?
        """,
    re.X,
)


class ArgumentError(ValueError):
    """Not a URL SQLAlchemy could parse (SQLAlchemy raises its own ArgumentError there)."""


class URL(NamedTuple):
    """The parts of a database URL, as SQLAlchemy's (immutable) URL holds them."""

    drivername: str
    username: str | None = None
    password: str | None = None
    host: str | None = None
    port: int | None = None
    database: str | None = None
    query: Mapping[str, QueryValue] = _EMPTY

    @classmethod
    def create(cls, drivername: str, username: str | None = None,
               password: str | None = None, host: str | None = None,
               port: int | str | None = None, database: str | None = None,
               query: Mapping[str, str | Sequence[str]] | None = None) -> URL:
        """A URL from its parts (a port is int()-ed, as SQLAlchemy does: "" is a ValueError)."""
        return cls(drivername, username, password, host,
                   None if port is None else int(port), database, _frozen_query(query))

    def set(self, drivername: str | None = None, username: str | None = None,
            password: str | None = None, host: str | None = None, port: int | None = None,
            database: str | None = None,
            query: Mapping[str, str | Sequence[str]] | None = None) -> URL:
        """A copy with the parts given (not None) replaced; QUERY replaces the whole query."""
        kw: dict[str, Any] = {k: v for k, v in (
            ("drivername", drivername), ("username", username), ("password", password),
            ("host", host), ("port", port), ("database", database)) if v is not None}
        if query is not None:
            kw["query"] = _frozen_query(query)
        return self._replace(**kw)

    def get_backend_name(self) -> str:
        """'postgresql' of 'postgresql+psycopg2'."""
        return self.drivername.split("+")[0]

    def render_as_string(self, hide_password: bool = True) -> str:
        """The URL as SQLAlchemy renders it (password '***' unless HIDE_PASSWORD is False)."""
        s = self.drivername + "://"
        if self.username is not None:
            s += quote(self.username, safe=" +")
            if self.password is not None:
                s += ":" + ("***" if hide_password else quote(str(self.password), safe=" +"))
            s += "@"
        if self.host is not None:
            s += f"[{self.host}]" if ":" in self.host else self.host
        if self.port is not None:
            s += ":" + str(self.port)
        if self.database is not None:
            s += "/" + quote(self.database, safe=" +/")
        if self.query:
            s += "?" + "&".join(
                f"{quote_plus(k)}={quote_plus(element)}"
                for k in sorted(self.query)
                for element in _as_list(self.query[k]))
        return s

    def __str__(self) -> str:
        return self.render_as_string()

    def __repr__(self) -> str:
        return self.render_as_string()


def _as_list(value: QueryValue) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _frozen_query(query: Mapping[str, str | Sequence[str]] | None) -> Mapping[str, QueryValue]:
    if not query:
        return _EMPTY
    return MappingProxyType({k: v if isinstance(v, str) else tuple(v) for k, v in query.items()})


def make_url(name_or_url: str | URL) -> URL:
    """SQLAlchemy's make_url: ArgumentError when the pattern does not match, ValueError for a
    port that is not a number."""
    if isinstance(name_or_url, URL):
        return name_or_url
    if not isinstance(name_or_url, str):
        raise ArgumentError(f"Expected string or URL object, got {type(name_or_url).__name__}")
    m = _PATTERN.match(name_or_url)
    if m is None:
        raise ArgumentError("Could not parse SQLAlchemy URL from given URL string")
    components: dict[str, Any] = m.groupdict()
    raw_query = components.pop("query")
    query: dict[str, str | list[str]] | None = None
    if raw_query is not None:
        query = {}
        for key, value in parse_qsl(raw_query):
            if key in query:
                previous = query[key]
                query[key] = ([previous] if isinstance(previous, str) else previous) + [value]
            else:
                query[key] = value
    for comp in ("username", "password", "database"):
        if components[comp] is not None:
            components[comp] = unquote(components[comp])
    host = components.pop("ipv4host") or components.pop("ipv6host", None)
    components.pop("ipv6host", None)
    return URL.create(components.pop("name"), host=host, query=query, **components)
