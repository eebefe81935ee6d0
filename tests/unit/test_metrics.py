"""agent.daemon.metrics: literal Snapshots in, samples out (fresh registry, get_sample_value)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent import __version__
from agent.daemon.metrics import (ALL_SPECS, CollectorStats, DriftwatchCollector, safe_database_label)
from agent.model import Finding
from agent.snapshot import CheckRun, DriftItem, MigrationState, Snapshot, UnitSnapshot

SECRET = "hunter2-s3cret"


def broken_unit() -> UnitSnapshot:
    """A unit with every problem at once."""
    return UnitSnapshot(
        unit="app.service", timestamp=1700000000.0, unit_up=True,
        database="db.internal:5432/app", backend="postgresql", app_loaded=True, db_up=True,
        migrations=MigrationState(version_table_present=True, current=("aaa",),
                                  heads=("bbb", "ccc"), pending=("bbb", "ccc", "ddd"),
                                  multiple_heads=True, unknown=(), in_progress=False),
        schema_drift=(DriftItem("missing_column", "users", "email"),
                      DriftItem("missing_column", "users", "name"),
                      DriftItem("extra_foreign_key", "orders", "fk_user")),
        venv_mismatch=True, stale_environment_variables=2, needs_daemon_reload=True,
        needs_restart=True, database_mismatch=False, migration_privileges_ok=True,
        applied_migrations_modified=1,
        journal_schema_errors={"undefined_column": 4, "undefined_table": 1},
        journal_schema_errors_recent={"undefined_column": 6, "undefined_table": 1},
        last_success={"migrations": 1700000000.0, "schema": 1699999880.0},
        checks=(CheckRun("migrations", True, 0.25), CheckRun("schema", False, 1.5, "timeout")),
        findings=(Finding("migrations", "critical",
                          f"DATABASE_URL=postgresql://app:{SECRET}@db/app has pending revisions",
                          f"export PGPASSWORD={SECRET}"),),
    )


def unknown_unit() -> UnitSnapshot:
    """A unit where the app could not be loaded: almost everything unknown."""
    return UnitSnapshot(unit="down.service", timestamp=1700000001.0, unit_up=False)


def registry_for(snapshot: Snapshot | None, stats: CollectorStats = CollectorStats()
                 ) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(DriftwatchCollector(lambda: snapshot, lambda: stats))
    return registry


def test_every_spec_is_prefixed_and_documented() -> None:
    names = [s.full_name for s in ALL_SPECS]
    assert len(names) == len(set(names))
    for spec in ALL_SPECS:
        assert spec.full_name.startswith("driftwatch_") and spec.help.endswith(".")
        assert "password" not in spec.labels and "dsn" not in spec.labels


def test_unit_values() -> None:
    reg = registry_for(Snapshot(units=(broken_unit(),), taken_at=1700000002.0,
                                duration_seconds=0.7))
    u = {"unit": "app.service"}
    get = reg.get_sample_value
    assert get("driftwatch_unit_up", u) == 1
    assert get("driftwatch_last_check_timestamp_seconds", u) == 1700000000.0
    assert get("driftwatch_check_success", {**u, "check": "migrations"}) == 1
    assert get("driftwatch_check_success", {**u, "check": "schema"}) == 0
    assert get("driftwatch_check_duration_seconds", {**u, "check": "schema"}) == 1.5
    assert get("driftwatch_app_load_success", u) == 1
    assert get("driftwatch_db_up", u) == 1
    assert get("driftwatch_database_info", {**u, "database": "db.internal:5432/app",
                                            "backend": "postgresql"}) == 1
    assert get("driftwatch_version_table_present", u) == 1
    # One series per unit (not current x head): heads joined with ','.
    assert get("driftwatch_revision_info", {**u, "current": "aaa", "head": "bbb,ccc"}) == 1
    assert get("driftwatch_pending_revisions", u) == 3
    assert get("driftwatch_migration_heads", u) == 2
    assert get("driftwatch_db_revision_unknown", u) == 0
    assert get("driftwatch_migration_in_progress", u) == 0
    assert get("driftwatch_schema_drift_objects", {**u, "kind": "missing_column"}) == 2
    assert get("driftwatch_schema_drift_objects", {**u, "kind": "extra_foreign_key"}) == 1
    assert get("driftwatch_schema_drift_objects", {**u, "kind": "missing_table"}) == 0
    assert get("driftwatch_applied_migration_modified", u) == 1
    assert get("driftwatch_venv_mismatch", u) == 1
    assert get("driftwatch_environment_stale_variables", u) == 2
    assert get("driftwatch_needs_daemon_reload", u) == 1
    assert get("driftwatch_needs_restart", u) == 1
    assert get("driftwatch_database_mismatch", u) == 0
    assert get("driftwatch_migration_privileges_ok", u) == 1
    assert get("driftwatch_journal_schema_errors_total", {**u, "kind": "undefined_column"}) == 4
    assert get("driftwatch_findings", {**u, "severity": "critical"}) == 1
    assert get("driftwatch_findings", {**u, "severity": "warning"}) == 0
    assert get("driftwatch_units_watched") == 1
    assert get("driftwatch_inspection_duration_seconds") == 0.7
    assert get("driftwatch_snapshot_timestamp_seconds") == 1700000002.0


def test_none_means_absent_except_success_gauges() -> None:
    reg = registry_for(Snapshot(units=(unknown_unit(),)))
    u = {"unit": "down.service"}
    assert reg.get_sample_value("driftwatch_unit_up", u) == 0
    assert reg.get_sample_value("driftwatch_app_load_success", u) == 0
    for name in ("driftwatch_db_up", "driftwatch_version_table_present",
                 "driftwatch_pending_revisions", "driftwatch_migration_heads",
                 "driftwatch_database_mismatch", "driftwatch_migration_privileges_ok"):
        assert reg.get_sample_value(name, u) is None, name
    text = generate_latest(reg).decode()
    assert "driftwatch_revision_info{" not in text
    assert "driftwatch_schema_drift_objects{" not in text
    assert "driftwatch_database_info{" not in text


def test_revision_info_empty_labels() -> None:
    unit = UnitSnapshot(unit="new.service", timestamp=0.0, unit_up=True,
                        migrations=MigrationState(version_table_present=False, heads=("h1",),
                                                  pending=("h1",)))
    reg = registry_for(Snapshot(units=(unit,)))
    assert reg.get_sample_value("driftwatch_revision_info",
                                {"unit": "new.service", "current": "", "head": "h1"}) == 1
    assert reg.get_sample_value("driftwatch_version_table_present", {"unit": "new.service"}) == 0


def test_agent_metrics_and_no_snapshot() -> None:
    reg = registry_for(None, CollectorStats(inspections_total=3, failures_total=1,
                                            last_success=False))
    assert reg.get_sample_value("driftwatch_build_info",
                                {"version": __version__, "python": __import__("platform")
                                 .python_version()}) == 1
    assert reg.get_sample_value("driftwatch_inspections_total") == 3
    assert reg.get_sample_value("driftwatch_inspection_failures_total") == 1
    assert reg.get_sample_value("driftwatch_inspection_success") == 0
    assert reg.get_sample_value("driftwatch_scrape_collection_duration_seconds") >= 0
    assert reg.get_sample_value("driftwatch_units_watched") is None


def test_no_stale_label_sets() -> None:
    """A unit that disappears from the snapshot disappears from the exposition."""
    current: list[Snapshot] = [Snapshot(units=(broken_unit(), unknown_unit()))]
    reg = CollectorRegistry()
    reg.register(DriftwatchCollector(lambda: current[0]))
    assert reg.get_sample_value("driftwatch_unit_up", {"unit": "down.service"}) == 0
    current[0] = Snapshot(units=(broken_unit(),))
    assert reg.get_sample_value("driftwatch_unit_up", {"unit": "down.service"}) is None
    assert reg.get_sample_value("driftwatch_unit_up", {"unit": "app.service"}) == 1


def test_no_secret_in_exposition() -> None:
    leaky = UnitSnapshot(unit="leaky.service", timestamp=0.0, unit_up=True,
                         database=f"postgresql://app:{SECRET}@db:5432/app?password={SECRET}")
    reg = registry_for(Snapshot(units=(broken_unit(), leaky),
                                errors=(f"password={SECRET}",)))
    text = generate_latest(reg).decode()
    assert SECRET not in text
    assert "pending revisions" not in text      # finding messages never become labels
    assert 'database="db:5432/app"' in text
    # and the exposition parses
    names = {f.name for f in text_string_to_metric_families(text)}
    assert "driftwatch_journal_schema_errors" in names


def test_safe_database_label() -> None:
    assert safe_database_label("db:5432/app") == "db:5432/app"
    assert safe_database_label("postgresql+psycopg2://u:p@db:5432/app?sslmode=require") \
        == "db:5432/app"
    assert safe_database_label("u:p@db/app") == "db/app"


def test_registering_does_not_inspect() -> None:
    calls: list[int] = []
    reg = CollectorRegistry(auto_describe=True)

    def get() -> Snapshot:
        calls.append(1)
        return Snapshot(units=())

    reg.register(DriftwatchCollector(get))
    assert calls == []
    generate_latest(reg)
    assert calls == [1]


def test_staleness_recent_errors_and_window() -> None:
    reg = registry_for(Snapshot(units=(broken_unit(), unknown_unit()),
                                journal_window_seconds=3600.0))
    u = {"unit": "app.service"}
    assert reg.get_sample_value("driftwatch_check_staleness_seconds",
                                {**u, "check": "migrations"}) == 0
    assert reg.get_sample_value("driftwatch_check_staleness_seconds",
                                {**u, "check": "schema"}) == 120
    assert reg.get_sample_value("driftwatch_journal_schema_errors_recent",
                                {**u, "kind": "undefined_column"}) == 6
    assert reg.get_sample_value("driftwatch_journal_window_seconds") == 3600
    # A check that never succeeded has no staleness sample (not a made-up age).
    assert reg.get_sample_value("driftwatch_check_staleness_seconds",
                                {"unit": "down.service", "check": "migrations"}) is None


def test_the_check_catalogue_is_the_inspectors() -> None:
    import re
    from pathlib import Path

    import agent.privileged.inspector
    from agent.daemon.metrics import CHECKS
    source = Path(agent.privileged.inspector.__file__).read_text()
    used = set(re.findall(r'timer\.check\("(\w+)"\)|name = "(\w+)"|CheckRun\("(\w+)"', source))
    assert {a or b or c for a, b, c in used} == set(CHECKS)


def test_stale_variable_names_and_unit_file_are_bounded_info() -> None:
    names = tuple(f"VAR_{i:02d}" for i in range(20)) + ("bad name", "X=1")
    unit = UnitSnapshot(unit="app.service", timestamp=1.0, unit_up=True,
                        stale_environment_variables=len(names), stale_variable_names=names,
                        unit_file="/etc/systemd/system/app.service")
    text = generate_latest(registry_for(Snapshot(units=(unit,)))).decode()
    shown = [line for line in text.splitlines()
             if line.startswith("driftwatch_environment_stale_variable_info{")]
    assert len(shown) == 8 and all('variable="VAR_0' in line for line in shown)
    assert "bad name" not in text and "X=1" not in text
    assert 'driftwatch_unit_file_info{path="/etc/systemd/system/app.service",unit="app.service"}' \
        in text


def test_modified_migration_files_are_bounded_plain_labels() -> None:
    files = tuple((f"r{i}", f"r{i}_step.py") for i in range(12)) + (("r$(x)", "x.py"),)
    unit = UnitSnapshot(unit="app.service", timestamp=1.0, unit_up=True,
                        applied_migrations_modified=len(files), modified_migration_files=files)
    text = generate_latest(registry_for(Snapshot(units=(unit,)))).decode()
    shown = [line for line in text.splitlines()
             if line.startswith("driftwatch_applied_migration_modified_info{")]
    assert len(shown) == 8 and 'file="r0_step.py",revision="r0"' in shown[0]
    assert "$(x)" not in text


def test_the_daemons_copies_of_journal_kinds_and_store_conditions_are_the_sources() -> None:
    from agent.daemon import metrics
    from agent.privileged.sources.journal import KINDS
    from agent.privileged.state import CONDITIONS
    assert metrics.JOURNAL_KINDS == KINDS
    assert metrics.STATE_STORE_CONDITIONS == CONDITIONS
