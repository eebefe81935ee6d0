"""Last known values through an outage: agent.privileged.inspector.last_known, pure."""

from __future__ import annotations

from pathlib import Path

from agent.privileged.inspector import last_known
from agent.model import Finding
from agent.snapshot import CheckRun, DriftItem, MigrationState, UnitSnapshot

PENDING = MigrationState(version_table_present=True, current=("r2",), heads=("r3",),
                         pending=("r3",))
OK = ("unit", "app_load", "database", "migrations", "schema", "privileges", "integrity",
      "connections", "journal")


def runs(*failed: str, skipped: tuple[str, ...] = ()) -> tuple[CheckRun, ...]:
    return tuple(CheckRun(c, c not in failed, 0.1, "down" if c in failed else "")
                 for c in OK if c not in skipped)


def healthy_pending() -> UnitSnapshot:
    return UnitSnapshot(unit="app.service", timestamp=100.0, unit_up=True,
                        database="db:5432/app", app_loaded=True, db_up=True,
                        migrations=PENDING,
                        schema_drift=(DriftItem("missing_table", "posts", "posts"),),
                        migration_privileges_ok=True, applied_migrations_modified=1,
                        database_mismatch=False, checks=runs())


def test_database_down_keeps_the_migration_state() -> None:
    down = UnitSnapshot(unit="app.service", timestamp=130.0, unit_up=True,
                        database="db:5432/app", app_loaded=True, db_up=False,
                        checks=runs("database", skipped=("migrations", "schema", "privileges",
                                                         "integrity")),
                        findings=(Finding("database_unreachable", "critical", "refused"),))
    merged = last_known(down, healthy_pending())
    assert merged.migrations == PENDING and merged.schema_drift is not None
    assert merged.migration_privileges_ok is True and merged.applied_migrations_modified == 1
    # What was seen now stays what was seen now.
    assert merged.db_up is False and merged.timestamp == 130.0
    assert [f.check for f in merged.findings] == ["database_unreachable"]


def test_a_fixed_state_replaces_the_last_known_one() -> None:
    fixed = UnitSnapshot(unit="app.service", timestamp=130.0, unit_up=True,
                         database="db:5432/app", app_loaded=True, db_up=True,
                         migrations=MigrationState(True, ("r3",), ("r3",)), schema_drift=(),
                         migration_privileges_ok=True, database_mismatch=False, checks=runs())
    merged = last_known(fixed, healthy_pending())
    assert merged.migrations is not None and merged.migrations.pending == ()
    assert merged.schema_drift == () and merged.applied_migrations_modified == 0


def test_app_that_cannot_load_keeps_its_database_label() -> None:
    broken = UnitSnapshot(unit="app.service", timestamp=130.0, unit_up=True, app_loaded=False,
                          checks=runs("app_load", skipped=("database", "migrations", "schema",
                                                           "privileges", "integrity",
                                                           "connections")))
    merged = last_known(broken, healthy_pending())
    assert merged.database == "db:5432/app" and merged.migrations == PENDING
    assert merged.app_loaded is False


def test_dbus_down_keeps_everything_but_says_when() -> None:
    lost = UnitSnapshot(unit="app.service", timestamp=130.0, unit_up=False,
                        checks=(CheckRun("unit", False, 5.0, "D-Bus timeout"),))
    merged = last_known(lost, healthy_pending(), whole=True)
    assert merged.unit_up is True and merged.migrations == PENDING and merged.db_up is True
    assert merged.checks == lost.checks and merged.timestamp == 130.0


def test_nothing_known_before_stays_unknown() -> None:
    down = UnitSnapshot(unit="app.service", timestamp=1.0, unit_up=True, db_up=False,
                        checks=runs("database"))
    assert last_known(down, None) is down


def test_newest_file_can_leave_the_migrations_directory_out(tmp_path: Path) -> None:
    import os

    from agent.privileged.sources.files import newest_file
    (tmp_path / "migrations" / "versions").mkdir(parents=True)
    app, rev = tmp_path / "app.py", tmp_path / "migrations" / "versions" / "r2.py"
    app.write_text("x = 1\n")
    rev.write_text("revision = 'r2'\n")
    os.utime(app, (1000, 1000))
    os.utime(rev, (2000, 2000))
    assert newest_file(str(tmp_path)) == (str(rev), 2000)
    assert newest_file(str(tmp_path), skip=(str(tmp_path / "migrations"),)) == (str(app), 1000)


def test_modified_files_names_only_applied_revisions_whose_file_changed() -> None:
    from agent.privileged.inspector import modified_files
    revisions = [{"revision": "r1", "path": "/app/migrations/versions/r1_users.py", "sha256": "a"},
                 {"revision": "r2", "path": "/app/migrations/versions/r2_name.py", "sha256": "B"},
                 {"revision": "r3", "path": "/app/migrations/versions/r3_posts.py", "sha256": "c"}]
    assert modified_files(revisions, {"r1": "a", "r2": "b"}) == (("r2", "r2_name.py"),)
    assert modified_files(revisions, {}) == ()
