"""The small part of SQLAlchemy's API root's database code names, without importing SQLAlchemy.

Root never runs SQL itself: its statements go, as text, to the session child that holds the
connection as the unit's user (agent/privileged/dbclient.py). Importing SQLAlchemy only to
wrap strings in ``text()`` and to name ``DBAPIError`` cost the inspection worker ~25 MiB.
Here: ``text`` (a string holder a real SQLAlchemy connection also executes), the error types
(``DBAPIError`` carries the driver's error as ``orig``, as SQLAlchemy's does), the
``Connection`` shape the query functions use, and ``create_engine``: the one in-process
SQLAlchemy path (``agent.privileged.sources.database.session``, used where no session child
is wanted: tests, the preflight's own session) imports SQLAlchemy only when called and turns
its errors into these types.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Protocol

from agent.dburl import URL


class TextClause:
    """SQL text, as ``sqlalchemy.text()`` holds it (``.text``)."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"text({self.text!r})"

    def _execute_on_connection(self, connection: Any, *args: Any, **kwargs: Any) -> Any:
        # A real SQLAlchemy Connection (its caller imported SQLAlchemy already) executes it
        # as its own text() construct.
        from sqlalchemy import text as sqlalchemy_text
        return sqlalchemy_text(self.text)._execute_on_connection(  # type: ignore[attr-defined]
            connection, *args, **kwargs)


def text(sql: str) -> TextClause:
    """SQL text for Connection.execute(), with :name parameters."""
    return TextClause(sql)


class SQLError(Exception):
    """Any error of a database session (SQLAlchemy's SQLAlchemyError where it is one)."""


class DBAPIError(SQLError):
    """A statement or connection failed in the driver or the server; ``orig`` is its error
    (with ``pgcode`` where the server gave a SQLSTATE)."""

    def __init__(self, statement: str | None, params: Any, orig: BaseException) -> None:
        super().__init__(statement, params, orig)
        self.statement = statement
        self.params = params
        self.orig = orig

    def __str__(self) -> str:
        kind = type(self.orig)
        text_ = f"({kind.__module__}.{kind.__name__}) {self.orig}"   # as SQLAlchemy says it
        if self.statement:
            text_ += f"\n[SQL: {self.statement}]"
        return text_


class Connection(Protocol):
    """A session the query functions run statements on (the child's or SQLAlchemy's)."""

    def execute(self, clause: Any, params: Mapping[str, Any] | None = None) -> Any: ...


class NullPool:
    """Stands for sqlalchemy.pool.NullPool in create_engine(poolclass=...)."""


@contextmanager
def _translated() -> Iterator[None]:
    """SQLAlchemy's errors as this module's types (callers catch these)."""
    from sqlalchemy import exc as sa_exc
    try:
        yield
    except sa_exc.DBAPIError as exc:
        raise DBAPIError(exc.statement, exc.params, exc.orig) from exc
    except sa_exc.SQLAlchemyError as exc:
        raise SQLError(str(exc)) from exc


class _Connection:
    """A SQLAlchemy Connection whose errors are this module's types."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def execute(self, clause: Any, params: Mapping[str, Any] | None = None) -> Any:
        with _translated():
            return self._conn.execute(clause, params) if params is not None else \
                self._conn.execute(clause)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> _Connection:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


class _Engine:
    """A SQLAlchemy Engine whose connections are _Connection."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine

    def connect(self) -> _Connection:
        with _translated():
            return _Connection(self._engine.connect())

    def dispose(self) -> None:
        self._engine.dispose()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


def create_engine(url: URL | str, **kwargs: Any) -> _Engine:
    """sqlalchemy.create_engine (imported now), for an agent.dburl URL too."""
    import sqlalchemy
    from sqlalchemy.engine import URL as SAURL
    from sqlalchemy.pool import NullPool as SANullPool

    if isinstance(url, URL):
        url = SAURL.create(url.drivername, url.username, url.password, url.host, url.port,
                           url.database, dict(url.query))
    if kwargs.get("poolclass") is NullPool:
        kwargs["poolclass"] = SANullPool
    return _Engine(sqlalchemy.create_engine(url, **kwargs))
