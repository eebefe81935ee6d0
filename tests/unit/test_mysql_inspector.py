"""The inspector on a MySQL/MariaDB URL: inspected (revision state, privileges from
SHOW GRANTS, the backend on every surface); other backends keep backend_not_inspected."""

from __future__ import annotations

import json
import tempfile
from typing import Any

import pytest

from agent.checks.half_applied import LiveObjects
from agent.privileged.inspector import Inspector, InspectorSettings
from agent.snapshot import UnitSnapshot
from agent.privileged.sources import database, mysql
from tests.unit.test_unit_independence import (
    HEALTHY,
    HEALTHY_REPORT,
    REVISIONS,
    FakeSystemd,
    fake_probe,
    fakes,
    props,
)

MYSQL_URL = "mysql+pymysql://shop:s3cret@127.0.0.1:3306/shop"


def inspect_with(monkeypatch: pytest.MonkeyPatch, url: str, current: tuple[str, ...],
                 missing: tuple[str, ...] = (), live: LiveObjects | None = None,
                 report: dict[str, Any] = HEALTHY_REPORT) -> UnitSnapshot:
    """One unit whose app reports url; MySQL's session answers as given."""
    asked: list[str] = []

    def inspect_mysql(url: str, table: str = "alembic_version", schema: str | None = None,
                      timeouts: Any = None, opener: Any = None,
                      revisions: Any = ()) -> mysql.MysqlInspection:
        asked.append(url)
        label = database.db_label(url)
        return mysql.MysqlInspection(database.DatabaseInspection(
            label, database.VersionTable(label, table, True, current),
            database.MigrationActivity(label), database.Privileges(label),
            database.ServerIdentity(label, database="shop")),
            mysql.MysqlPrivileges("shop@%", "shop", missing), live=live)

    report = {**report, "urls": {"default": url}}
    with fakes(monkeypatch, {}), tempfile.TemporaryDirectory() as tmp, \
            monkeypatch.context() as m:
        m.setattr(mysql, "inspect_mysql", inspect_mysql)
        inspector = Inspector(InspectorSettings(state_path=f"{tmp}/s.db"),
                              systemd=FakeSystemd({HEALTHY: props(HEALTHY)}),  # type: ignore
                              probe=fake_probe({HEALTHY: json.dumps(report).encode()}))
        unit = inspector.inspect([HEALTHY]).units[0]
    assert asked == ([url] if database.backend_of(url) in ("mysql", "mariadb") else [])
    return unit


def test_mysql_is_inspected_with_pending_revisions(monkeypatch: pytest.MonkeyPatch) -> None:
    unit = inspect_with(monkeypatch, MYSQL_URL, ("r2",))
    checks = {f.check for f in unit.findings}
    assert "backend_not_inspected" not in checks
    assert "pending_migrations" in checks, unit.findings
    assert unit.backend == "mysql" and unit.database == "127.0.0.1:3306/shop"
    assert unit.db_up is True
    assert unit.migrations is not None and unit.migrations.current == ("r2",)
    assert unit.migrations.pending == ("r3",)
    assert unit.migration_privileges_ok is True
    assert "s3cret" not in repr(unit)


def test_mysql_privileges_missing_is_a_finding(monkeypatch: pytest.MonkeyPatch) -> None:
    unit = inspect_with(monkeypatch, "mariadb+pymysql://shop:pw@db:3306/shop", ("r3",),
                        missing=("CREATE", "ALTER"))
    found = {f.check: f for f in unit.findings}
    assert "lacks CREATE, ALTER on shop.*" in found["insufficient_db_privileges"].message
    assert unit.migration_privileges_ok is False and unit.backend == "mariadb"


def test_other_backends_still_get_backend_not_inspected(
        monkeypatch: pytest.MonkeyPatch) -> None:
    unit = inspect_with(monkeypatch, "mssql+pyodbc://u:pw@sql.internal:1444/shop", ())
    checks = {f.check for f in unit.findings}
    assert "backend_not_inspected" in checks and "database_unreachable" not in checks
    assert unit.db_up is None and unit.backend == "mssql"


def test_half_applied_revision_replaces_pending_and_drift(
        monkeypatch: pytest.MonkeyPatch) -> None:
    revisions = [dict(r, ops=[["create_table", "t", ""]]) for r in REVISIONS]
    revisions[2]["ops"] = [["create_table", "posts", ""], ["add_column", "users", "bio"]]
    report = {**HEALTHY_REPORT, "revisions": revisions, "schema_diff": [
        {"kind": "add_table", "table": "posts", "name": "", "detail": ""}]}
    clean = inspect_with(monkeypatch, MYSQL_URL, ("r2",), report=report,
                         live=LiveObjects(frozenset({"users"})))
    assert {"pending_migrations", "schema_drift"} <= {f.check for f in clean.findings}
    unit = inspect_with(monkeypatch, MYSQL_URL, ("r2",), report=report,
                        live=LiveObjects(frozenset({"users", "posts"})))
    checks = {f.check for f in unit.findings}
    assert "half_applied_revision" in checks, unit.findings
    assert not {"pending_migrations", "schema_drift"} & checks
    assert unit.migrations is not None and unit.migrations.pending == ("r3",)


def test_half_applied_revision_metric(monkeypatch: pytest.MonkeyPatch) -> None:
    """1 while the next revision ran halfway (the alert's input), 0 otherwise."""
    from agent.daemon.metrics import snapshot_families
    from agent.snapshot import Snapshot

    revisions = [dict(r, ops=[["create_table", "t", ""]]) for r in REVISIONS]
    revisions[2]["ops"] = [["create_table", "posts", ""]]
    report = {**HEALTHY_REPORT, "revisions": revisions}
    values = []
    for live in (LiveObjects(frozenset({"users"})), LiveObjects(frozenset({"users", "posts"}))):
        unit = inspect_with(monkeypatch, MYSQL_URL, ("r2",), report=report, live=live)
        values.append([s.value for f in snapshot_families(Snapshot((unit,)))
                       for s in f.samples if s.name == "driftwatch_half_applied_revision"])
    assert values == [[0.0], [1.0]]
