"""A lock is never a state: a locked version table is "migration in progress, current
revision not readable now", never empty/missing/unknown; drift is held back meanwhile."""

from __future__ import annotations

import json
import tempfile
from typing import Any

import pytest

from agent.privileged.inspector import Inspector, InspectorSettings
from agent.daemon.metrics import snapshot_families
from agent.snapshot import UnitSnapshot
from agent.privileged.sources import database
from tests.unit.test_unit_independence import (
    HEALTHY,
    HEALTHY_REPORT,
    FakeSystemd,
    fake_probe,
    fakes,
    props,
)

DRIFTING = {**HEALTHY_REPORT, "schema_diff": [
    {"kind": "add_column", "table": "users", "name": "name", "detail": "VARCHAR(80) NULL"}]}


def inspect_with(monkeypatch: pytest.MonkeyPatch, version: database.VersionTable,
                 sessions: tuple[database.ActiveSession, ...] = (),
                 report: dict[str, Any] = DRIFTING) -> UnitSnapshot:
    """One unit, its database as given (a lock, sessions), its probe reporting drift."""
    def inspect(url: str, table: str = "alembic_version", schema: str | None = None,
                timeouts: Any = None, opener: Any = None) -> database.DatabaseInspection:
        label = database.db_label(url)
        return database.DatabaseInspection(
            label, version, database.MigrationActivity(
                label, bool(sessions) or version.locked, sessions),
            database.Privileges(label, user="app", schema="public", can_create=True,
                                can_use=True),
            database.ServerIdentity(label))

    # A context of its own, left before fakes' one: a plain monkeypatch.setattr here would
    # record fakes' stand-in as the original and put it back after the test (it leaked into
    # every later test module of the same pytest process).
    with fakes(monkeypatch, {}), monkeypatch.context() as patch, \
            tempfile.TemporaryDirectory() as tmp:
        patch.setattr(database, "inspect", inspect)
        inspector = Inspector(InspectorSettings(state_path=f"{tmp}/s.db"),
                              systemd=FakeSystemd({HEALTHY: props(HEALTHY)}),  # type: ignore
                              probe=fake_probe({HEALTHY: json.dumps(report).encode()}))
        return inspector.inspect([HEALTHY]).units[0]


def samples(unit: UnitSnapshot) -> dict[str, list[Any]]:
    from agent.snapshot import Snapshot
    out: dict[str, list[Any]] = {}
    for family in snapshot_families(Snapshot((unit,))):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def test_locked_version_table_is_not_empty_missing_or_all_pending(
        monkeypatch: pytest.MonkeyPatch) -> None:
    locked = database.VersionTable("h:5432/app", "alembic_version", exists=True, locked=True)
    unit = inspect_with(monkeypatch, locked)
    checks = {f.check for f in unit.findings}
    assert checks == {"migration_in_progress"}, unit.findings
    message = next(f.message for f in unit.findings)
    assert "current revision not readable now" in message
    m = unit.migrations
    assert m is not None and m.in_progress and not m.current_readable
    assert m.version_table_present and m.heads == ("r3",) and m.pending == ()
    assert unit.schema_drift is None  # held back, not "no drift" and not drift
    assert all(c.success for c in unit.checks), unit.checks
    got = samples(unit)
    assert "driftwatch_schema_drift_objects" not in got
    assert "driftwatch_revision_info" not in got and "driftwatch_pending_revisions" not in got
    assert got["driftwatch_migration_in_progress"] == [({"unit": HEALTHY}, 1.0)]


def test_upgrade_running_holds_drift_back_and_explains_pending(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A real upgrade: the version table still reads (r2), a session holds DDL locks."""
    version = database.VersionTable("h:5432/app", "alembic_version", exists=True,
                                    revisions=("r2",))
    ddl = database.ActiveSession(4242, "app", "idle in transaction", 3.0,
                                 "SELECT pg_sleep(5)",
                                 "holds AccessExclusiveLock on posts (DDL in an open "
                                 "transaction)")
    unit = inspect_with(monkeypatch, version, (ddl,))
    assert {f.check for f in unit.findings} == {"migration_in_progress"}, unit.findings
    assert unit.migrations is not None and unit.migrations.pending == ("r3",)
    assert unit.migrations.current_readable and unit.migrations.in_progress
    assert unit.schema_drift is None
    assert "driftwatch_schema_drift_objects" not in samples(unit)


def test_same_drift_without_a_migration_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    version = database.VersionTable("h:5432/app", "alembic_version", exists=True,
                                    revisions=("r3",))
    unit = inspect_with(monkeypatch, version)
    assert {f.check for f in unit.findings} == {"schema_drift"}
    assert unit.schema_drift is not None and len(unit.schema_drift) == 1
    got = samples(unit)
    assert ({"unit": HEALTHY, "kind": "missing_column"}, 1.0) in \
        got["driftwatch_schema_drift_objects"]


def test_custom_version_table_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    report = {**HEALTHY_REPORT, "alembic_env": {
        "drift_source": "env.py", "version_table": "alembic_version_billing",
        "version_table_schema": "meta"}}
    missing = database.VersionTable("h:5432/app", "alembic_version_billing", exists=False)
    unit = inspect_with(monkeypatch, missing, report=report)
    finding = next(f for f in unit.findings if f.check == "version_table_missing")
    assert "has no meta.alembic_version_billing table" in finding.message
    assert unit.migrations is not None
    assert unit.migrations.version_table == "meta.alembic_version_billing"


def test_a_comparison_made_during_a_migration_is_not_reused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    state = {"locked": True}

    def inspect(url: str, table: str = "alembic_version", schema: str | None = None,
                timeouts: Any = None, opener: Any = None) -> database.DatabaseInspection:
        label = database.db_label(url)
        version = database.VersionTable(label, table, exists=True, locked=state["locked"],
                                        revisions=() if state["locked"] else ("r3",))
        return database.DatabaseInspection(
            label, version, database.MigrationActivity(label, state["locked"]),
            database.Privileges(label, user="app", schema="public", can_create=True,
                                can_use=True), database.ServerIdentity(label))

    # A context of its own, left before fakes' one: a plain monkeypatch.setattr here would
    # record fakes' stand-in as the original and put it back after the test (it leaked into
    # every later test module of the same pytest process).
    with fakes(monkeypatch, {}), monkeypatch.context() as patch, \
            tempfile.TemporaryDirectory() as tmp:
        patch.setattr(database, "inspect", inspect)
        inspector = Inspector(InspectorSettings(state_path=f"{tmp}/s.db"),
                              systemd=FakeSystemd({HEALTHY: props(HEALTHY)}),  # type: ignore
                              probe=fake_probe({HEALTHY: json.dumps(DRIFTING).encode()}))
        assert inspector.inspect([HEALTHY]).units[0].schema_drift is None
        state["locked"] = False
        after = inspector.inspect([HEALTHY]).units[0]
        assert inspector.probe_runs == 2  # compared again once the migration was over
        assert after.schema_drift is not None and len(after.schema_drift) == 1
        inspector.inspect([HEALTHY])
        assert inspector.probe_runs == 2  # and memoised again while nothing changes
