"""tests/harness/bigapp.py writes an app `flask db upgrade` builds and `flask db check` accepts."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness.apps import db_upgrade, flask_db_check
from tests.harness.bigapp import bigapp_spec, render_models, write_bigapp
from tests.harness.postgres import PgDatabase

pytestmark = pytest.mark.postgres


def test_models_compile_with_five_columns_an_index_and_an_fk_each() -> None:
    source = render_models(3, drift=1)
    compile(source, "models.py", "exec")
    assert source.count("db.Column(") == 5 * 3 + 1
    assert source.count("index=True") == 3 and source.count("db.ForeignKey(") == 3
    assert "db.ForeignKey('m0000.id')" in source.split("class M0001")[1]
    assert len(bigapp_spec(1000).revisions) == 1
    with pytest.raises(ValueError):
        render_models(2, drift=3)


def test_upgrade_then_check_is_clean_and_drift_is_seen(flask_venv: Path, app_workspace: Path,
                                                       pg_database: PgDatabase) -> None:
    app = write_bigapp(app_workspace / "big", models=20)
    db_upgrade(app, flask_venv, pg_database.url)
    assert pg_database.alembic_versions() == ["big1"]
    assert flask_db_check(app, flask_venv, pg_database.url).clean
    drifted = write_bigapp(app_workspace / "drifted", models=20, drift=2)
    check = flask_db_check(drifted, flask_venv, pg_database.url)
    assert check.ops == (("add_column", "m0000"), ("add_column", "m0001"))
