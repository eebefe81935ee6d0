"""Pure logic of the MySQL/MariaDB backend: grants, processlist, URLs, guard statements."""

from __future__ import annotations

import pytest

from agent.asuser.dbsession import mysql_connect_args
from agent.asuser.readonly import mysql_guard_statements
from agent.checks.mysql_privileges import mysql_privilege_findings
from agent.privileged.sources.mysql import (
    MIGRATION_PRIVILEGES,
    Process,
    activity_of,
    client_of,
    mask_statement,
    granted_on,
    role_sessions,
)

HASHED = "GRANT USAGE ON *.* TO `shop`@`%` IDENTIFIED BY PASSWORD '*7BA2334EAD4739FE8F97'"


@pytest.mark.parametrize("grants,database,missing", [
    ([HASHED, "GRANT ALL PRIVILEGES ON `shop`.* TO `shop`@`%`"], "shop", ()),
    ([HASHED, "GRANT ALL PRIVILEGES ON *.* TO `root`@`localhost` WITH GRANT OPTION"], "x", ()),
    ([HASHED, "GRANT SELECT, INSERT, UPDATE, DELETE ON `shop`.* TO `shop`@`%`"], "shop",
     ("CREATE", "DROP", "ALTER", "INDEX", "REFERENCES")),
    # Another database's grant, a table-level grant and a column grant cover nothing here.
    ([HASHED, "GRANT ALL PRIVILEGES ON `shop2`.* TO `shop`@`%`",
      "GRANT ALL PRIVILEGES ON `shop`.`users` TO `shop`@`%`",
      "GRANT SELECT (email) ON `shop`.`users` TO `shop`@`%`"], "shop", MIGRATION_PRIVILEGES),
    # LIKE patterns: `shop\_%` covers shop_eu, not shopx.
    ([r"GRANT ALL PRIVILEGES ON `shop\_%`.* TO `shop`@`%`"], "shop_eu", ()),
    ([r"GRANT ALL PRIVILEGES ON `shop\_%`.* TO `shop`@`%`"], "shopxeu", MIGRATION_PRIVILEGES),
])
def test_grants_on_the_database(grants: list[str], database: str,
                                missing: tuple[str, ...]) -> None:
    have = granted_on(grants, database)
    assert tuple(p for p in MIGRATION_PRIVILEGES if p not in have) == missing
    assert not any("7BA2" in p for p in have)


def test_privilege_finding_names_what_is_missing_and_the_grant() -> None:
    assert mysql_privilege_findings("u.service", "shop@%", "shop", ()) == []
    (f,) = mysql_privilege_findings("u.service", "shop@%", "shop", ("CREATE", "ALTER"))
    assert f.check == "insufficient_db_privileges" and f.severity == "warning"
    assert "shop@% of u.service lacks CREATE, ALTER on shop.*" in f.message
    assert "GRANT CREATE, ALTER ON `shop`.* TO 'shop'@'%'" in f.remedy
    assert "`flask db upgrade` will fail" in f.message
    (plain,) = mysql_privilege_findings("u.service", "shop@%", "shop", ("CREATE",), True)
    assert "`alembic upgrade` will fail" in plain.message and "flask" not in plain.message


@pytest.mark.parametrize("host,expected", [
    ("127.0.0.1:54321", ("127.0.0.1", 54321)), ("[::1]:5", ("::1", 5)),
    ("localhost", ("localhost", -1)), ("", ("", -1)),
])
def test_processlist_host(host: str, expected: tuple[str, int]) -> None:
    assert client_of(host) == expected


def test_activity_is_ddl_or_a_metadata_lock_wait_on_our_database() -> None:
    procs = (
        Process(5, "shop", "127.0.0.1:1", "shop", "Query", 12, "copy to tmp table",
                "ALTER TABLE users ADD COLUMN x INT"),
        Process(6, "shop", "127.0.0.1:2", "shop", "Query", 3,
                "Waiting for table metadata lock", "SELECT * FROM users"),
        Process(7, "shop", "127.0.0.1:3", "shop", "Sleep", 100, "", ""),
        Process(8, "shop", "127.0.0.1:4", "other", "Query", 5, "", "DROP TABLE t"),
        Process(9, "shop", "127.0.0.1:5", "shop", "Query", 1, "Sending data", "SELECT 1"),
    )
    found = activity_of(procs, "shop")
    assert [(s.pid, s.reason) for s in found] == [
        (5, "running DDL (copy to tmp table)"),
        (6, "waits for a metadata lock (Waiting for table metadata lock)")]
    sessions = role_sessions(procs)
    assert (sessions[0].client_addr, sessions[0].client_port, sessions[0].database) == \
        ("127.0.0.1", 1, "shop")


def test_guard_statements_per_server() -> None:
    maria = mysql_guard_statements({"statement_timeout_ms": 2500, "lock_timeout_ms": 500}, True)
    assert maria == ["SET SESSION TRANSACTION READ ONLY", "SET SESSION lock_wait_timeout = 1",
                     "SET SESSION innodb_lock_wait_timeout = 1",
                     "SET SESSION max_statement_time = 2.500"]
    mysql8 = mysql_guard_statements({"statement_timeout_ms": 2500, "lock_timeout_ms": 1500},
                                    False)
    assert mysql8[1] == "SET SESSION lock_wait_timeout = 2"
    assert mysql8[-1] == "SET SESSION max_execution_time = 2500"


def test_connect_args_as_sqlalchemy_builds_them() -> None:
    url = ("mysql+pymysql://shop:p%40ss@db.internal:3307/shop%2Deu?charset=utf8mb4"
           "&connect_timeout=4&ssl_ca=/etc/ca.pem&ssl_check_hostname=false")
    assert mysql_connect_args(url, "pymysql") == {
        "user": "shop", "password": "p@ss", "host": "db.internal", "port": 3307,
        "database": "shop-eu", "charset": "utf8mb4", "connect_timeout": 4,
        "ssl": {"ca": "/etc/ca.pem", "check_hostname": False}}
    assert mysql_connect_args("mysql+mysqldb://u:pw@h/d", "mysqldb") == {
        "user": "u", "passwd": "pw", "host": "h", "db": "d"}
    assert mysql_connect_args("mariadb://u@/d?unix_socket=/run/mysqld/mysqld.sock",
                              "pymysql") == {"user": "u", "database": "d",
                                             "unix_socket": "/run/mysqld/mysqld.sock"}
    with pytest.raises(ValueError):
        mysql_connect_args("postgresql://u@h/d", "pymysql")


@pytest.mark.parametrize("sql", [
    "CREATE USER 'a'@'%' IDENTIFIED BY 's3cret'",
    "ALTER USER a IDENTIFIED WITH mysql_native_password BY 's3cret'",
    "SET PASSWORD FOR a = PASSWORD('s3cret')",
    "GRANT ALL ON *.* TO a IDENTIFIED VIA ed25519 USING PASSWORD('s3cret')",
    "CREATE USER a IDENTIFIED BY \"s3cret\"",
    "ALTER USER a IDENTIFIED BY 'it''s s3cret'",
])
def test_passwords_in_statements_are_masked(sql: str) -> None:
    masked = mask_statement(sql)
    assert "s3cret" not in masked and "'****'" in masked
    procs = (Process(5, "root", "localhost", "shop", "Query", 1, "", sql),)
    assert "s3cret" not in repr(activity_of(procs, "shop"))
