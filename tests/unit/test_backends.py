"""Pure logic of backends: labels, the backend name, SQLite fd links and file verdicts."""

from __future__ import annotations

import pytest

from agent.asuser.readonly import ReadOnlyGuardError, open_sqlite_read_only, sqlite_uri
from agent.asuser.dbsession import sqlite_path
from agent.privileged.inspector import not_inspected_finding
from agent.asuser.probe_child import absolute_sqlite
from agent.privileged.sources.database import backend_of, db_label, url_host_port
from agent.privileged.sources.sqlite import OpenFile, database_path_of, file_verdict, is_missing


@pytest.mark.parametrize("url,backend,label", [
    ("sqlite:////srv/app/instance/app.db", "sqlite", "sqlite:/srv/app/instance/app.db"),
    ("sqlite+pysqlite:////srv/a.db?timeout=5", "sqlite", "sqlite:/srv/a.db"),
    ("sqlite://", "sqlite", "sqlite::memory:"),
    ("postgresql://u:pw@db.internal/shop", "postgresql", "db.internal:5432/shop"),
    ("postgres://u:pw@db.internal:6432/shop", "postgresql", "db.internal:6432/shop"),
    ("mysql+pymysql://u:pw@db.internal/shop", "mysql", "db.internal:3306/shop"),
    ("mariadb+mariadbconnector://u:pw@db/shop", "mariadb", "db:3306/shop"),
    ("mssql+pyodbc://u:pw@sql.internal:1444/shop", "mssql", "sql.internal:1444/shop"),
    ("snowflake://u:pw@account/shop", "snowflake", "account/shop"),
])
def test_backend_and_label(url: str, backend: str, label: str) -> None:
    assert backend_of(url) == backend
    assert db_label(url) == label
    assert "pw" not in db_label(url)


def test_the_issue_sqlite_label_is_no_longer_localhost_5432() -> None:
    assert db_label("sqlite:////srv/app/instance/app.db") != \
        "localhost:5432//srv/app/instance/app.db"
    assert url_host_port("mysql://u@h/x") == ("h", 3306)


def test_unreadable_url_has_no_backend() -> None:
    assert backend_of("not a url") == ""
    assert db_label("postgresql://app:pw@db.example:5432x/app") == "invalid-url"


@pytest.mark.parametrize("url,cwd,expected", [
    ("sqlite:///app.db", "/srv/app", "sqlite:////srv/app/app.db"),
    ("sqlite:///data/app.db?timeout=3", "/srv/app", "sqlite:////srv/app/data/app.db?timeout=3"),
    ("sqlite:////abs/app.db", "/srv/app", "sqlite:////abs/app.db"),
    ("sqlite://", "/srv/app", "sqlite://"),
    ("sqlite:///:memory:", "/srv/app", "sqlite:///:memory:"),
    ("postgresql:///app", "/srv/app", "postgresql:///app"),
])
def test_relative_sqlite_paths_are_taken_in_the_working_directory(
        url: str, cwd: str, expected: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir("/")
    monkeypatch.setattr("os.getcwd", lambda: cwd)
    assert absolute_sqlite(url) == expected


def test_session_path_must_be_absolute() -> None:
    assert sqlite_path("sqlite:////srv/a.db?x=1") == "/srv/a.db"
    with pytest.raises(ValueError):
        sqlite_path("sqlite:///rel.db")
    with pytest.raises(ValueError):
        sqlite_path("postgresql://h/db")


def test_read_only_uri_quotes_the_path() -> None:
    assert sqlite_uri("/srv/my app/a?b#c.db") == "file:/srv/my%20app/a%3Fb%23c.db?mode=ro"


def test_memory_and_uri_databases_are_refused_by_the_guard() -> None:
    for path in (":memory:", "", "file:/x.db?mode=rwc"):
        with pytest.raises(ReadOnlyGuardError):
            open_sqlite_read_only(lambda *a, **k: None, path, 0.5)


def test_the_guard_never_creates_a_missing_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import sqlite3
    with pytest.raises(sqlite3.OperationalError):
        open_sqlite_read_only(sqlite3.connect, str(tmp_path / "gone.db"), 0.1)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("link,path", [
    ("/srv/app/instance/app.db", "/srv/app/instance/app.db"),
    ("/srv/app/instance/app.db-journal", "/srv/app/instance/app.db"),
    ("/srv/app/instance/app.sqlite3-wal", "/srv/app/instance/app.sqlite3"),
    ("/srv/app/instance/app.db (deleted)", "/srv/app/instance/app.db"),
    ("/srv/app/app.log", ""),
    ("socket:[12345]", ""),
    ("pipe:[9]", ""),
])
def test_fd_links(link: str, path: str) -> None:
    assert database_path_of(link) == path


def test_file_verdicts() -> None:
    held = [OpenFile(10, "/srv/a.db", 1, 100), OpenFile(11, "/srv/a.db", 1, 100)]
    assert file_verdict("/srv/b.db", None, []).status == "none"
    assert file_verdict("/srv/a.db", (1, 100), held).status == "connected"
    # Same path, another inode (the file was replaced): not the one the workers hold.
    other = file_verdict("/srv/a.db", (1, 200), held)
    assert other.status == "elsewhere" and other.others == ("/srv/a.db",)
    assert "2 process(es)" in other.message
    # The configured file cannot be stat()ed: compared by path.
    assert file_verdict("/srv/b.db", None, held).status == "elsewhere"


def test_findings() -> None:
    f = not_inspected_finding("shop.service", "mysql", "db:3306/shop")
    assert f.check == "backend_not_inspected" and f.severity == "warning"
    assert "backend mysql is not inspected (db:3306/shop)" in f.message
    assert is_missing("database sqlite:/x.db error: the SQLite database file /x.db does not "
                      "exist")
    assert not is_missing("database sqlite:/x.db error: database is locked")
