"""Schema drift is exactly what `flask db check` reports: every app here runs both.

Each app's migrations/env.py passes its own options to context.configure (include_object,
include_name, include_schemas, version_table(_schema), compare_type / compare_server_default
as values and callables, render_as_batch). `flask db check` runs in the app's venv as its
user; the probe runs env.py the way `alembic check` does; both must agree. Where revisions
are pending, `flask db check` refuses ("Target database is not up to date") and driftwatch
reports the pending revisions from the version table env.py names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.checks import migrations as migration_checks
from agent.context import ContextInputs, build_context
from agent.model import ExecCommand, UnitProperties
from agent.privileged import table_fingerprints as tablefp
from agent.privileged.probe_runner import ProbeRequest, ProbeResult, run_probe
from agent.privileged.sources import database
from tests.harness.apps import (
    APP_USER,
    SQLALCHEMY_14_REQUIREMENTS,
    SQLALCHEMY_21_REQUIREMENTS,
    AppDir,
    AppSpec,
    Revision,
    check_ops,
    custom_env_py,
    db_upgrade,
    flask_db_check,
    render_models,
    standard_revisions,
    tricky_spec,
)
from tests.harness import bigapp
from tests.harness.postgres import PgDatabase
from tests.integration.test_probe import BIND_APP
from tests.integration.test_probe import probe as probe_app

pytestmark = pytest.mark.postgres

INCLUDE_OBJECT = '''
def include_object(obj, name, type_, reflected, compare_to):
    # tables the app does not manage (a reporting tool's) are none of autogenerate's business
    return not (type_ == "table" and name.startswith("legacy_"))
'''
INCLUDE_NAME = '''
def include_name(name, type_, parent_names):
    if type_ == "table":
        return not name.startswith("tmp_")
    return True
'''
INCLUDE_SCHEMAS = '''
def include_name(name, type_, parent_names):
    if type_ == "schema":
        return name in (None, "public", "billing")
    return True
'''
COMPARE_TYPE_CALLABLE = '''
def compare_type(context, inspected_column, metadata_column, inspected_type, metadata_type):
    if metadata_column.name == "name":
        return False  # users.name may be wider in production: deliberate
    return None  # default comparison for everything else
'''

INVOICE_MODEL = '''

class Invoice(db.Model):
    __tablename__ = "invoices"
    __table_args__ = {"schema": "billing"}

    id = db.Column(db.Integer, primary_key=True)
    amount = db.Column(db.Integer, nullable=False)
'''
BILLING_REVISION = Revision(
    "r4", "r3", message="billing schema",
    upgrade="op.execute('CREATE SCHEMA billing')\n"
            "op.create_table('invoices', sa.Column('id', sa.Integer(), nullable=False),\n"
            "    sa.Column('amount', sa.Integer(), nullable=False),\n"
            "    sa.PrimaryKeyConstraint('id'), schema='billing')",
    downgrade="op.drop_table('invoices', schema='billing')\nop.execute('DROP SCHEMA billing')")

# Hand-made changes to the tricky app's tables, each one something autogenerate reports.
TRICKY_DRIFT = (
    "ALTER TABLE articles ALTER COLUMN price TYPE numeric(12, 2)",
    "ALTER TABLE articles ALTER COLUMN published_at TYPE timestamp without time zone",
    "ALTER TABLE articles ALTER COLUMN price SET DEFAULT 1",
    "ALTER TABLE articles DROP CONSTRAINT uq_articles_author_slug",
    "ALTER TABLE articles DROP CONSTRAINT articles_author_id_fkey",
    "ALTER TABLE articles ADD CONSTRAINT articles_author_id_fkey FOREIGN KEY (author_id) "
    "REFERENCES users (id)",
    'ALTER TABLE "Tag Names" ALTER COLUMN label DROP NOT NULL',
    'CREATE TABLE "Extra Table" (id serial PRIMARY KEY)',
)


@dataclass(frozen=True)
class Case:
    """One app: its spec, how far to upgrade, what to do by hand afterwards."""

    spec: AppSpec
    upgrade_to: str = "head"
    sql: tuple[str, ...] = ()
    before: tuple[str, ...] = ()          # SQL before the first upgrade (as superuser)
    expect_clean: bool = True
    version_table: str = "alembic_version"
    version_table_schema: str = ""


CASES = {
    "standard-at-head": Case(AppSpec()),
    "models-ahead": Case(AppSpec(models_at=4), expect_clean=False),
    "manual-extra-column": Case(AppSpec(), sql=("ALTER TABLE users ADD COLUMN legacy_flag "
                                                "boolean",), expect_clean=False),
    "manual-extra-table": Case(AppSpec(), sql=("CREATE TABLE legacy_reports (id int)",),
                               expect_clean=False),
    "include_object": Case(AppSpec(env_py=custom_env_py(
        "include_object=include_object,", INCLUDE_OBJECT)),
        sql=("CREATE TABLE legacy_reports (id int)",)),
    "include_name": Case(AppSpec(env_py=custom_env_py(
        "include_name=include_name,", INCLUDE_NAME)),
        sql=("CREATE TABLE tmp_import (id int)",)),
    "version_table": Case(AppSpec(env_py=custom_env_py(
        "version_table='alembic_version_billing',")),
        version_table="alembic_version_billing"),
    "version_table_schema": Case(AppSpec(env_py=custom_env_py(
        "version_table='versions', version_table_schema='meta',")),
        before=("CREATE SCHEMA meta AUTHORIZATION {owner}",),
        version_table="versions", version_table_schema="meta"),
    "include_schemas-two-schemas": Case(AppSpec(
        models_source=render_models(3) + INVOICE_MODEL,
        revisions=(*standard_revisions(3), BILLING_REVISION),
        env_py=custom_env_py("include_schemas=True,\ninclude_name=include_name,",
                             INCLUDE_SCHEMAS)),
        sql=("ALTER TABLE billing.invoices ADD COLUMN note text",), expect_clean=False),
    "include_schemas-clean": Case(AppSpec(
        models_source=render_models(3) + INVOICE_MODEL,
        revisions=(*standard_revisions(3), BILLING_REVISION),
        env_py=custom_env_py("include_schemas=True,\ninclude_name=include_name,",
                             INCLUDE_SCHEMAS))),
    "compare_type-default": Case(AppSpec(), sql=(
        "ALTER TABLE users ALTER COLUMN name TYPE varchar(200)",), expect_clean=False),
    "compare_type-false": Case(AppSpec(env_py=custom_env_py("compare_type=False,")), sql=(
        "ALTER TABLE users ALTER COLUMN name TYPE varchar(200)",)),
    "compare_type-callable": Case(AppSpec(env_py=custom_env_py(
        "compare_type=compare_type,", COMPARE_TYPE_CALLABLE)), sql=(
        "ALTER TABLE users ALTER COLUMN name TYPE varchar(200)",)),
    "compare_server_default": Case(AppSpec(env_py=custom_env_py(
        "compare_server_default=True,")), sql=(
        "ALTER TABLE users ALTER COLUMN name SET DEFAULT 'anonymous'",), expect_clean=False),
    "render_as_batch": Case(AppSpec(env_py=custom_env_py("render_as_batch=True,")), sql=(
        "ALTER TABLE users ADD COLUMN legacy_flag boolean",), expect_clean=False),
    "pending": Case(AppSpec(), upgrade_to="r2", expect_clean=False),
    "pending-custom-version-table": Case(AppSpec(env_py=custom_env_py(
        "version_table='alembic_version_billing',")), upgrade_to="r1", expect_clean=False,
        version_table="alembic_version_billing"),
    # tests/harness/apps.py TRICKY_MODELS: enum, JSON/JSONB, timestamps with and without
    # time zone, numerics, server defaults, a composite unique, cascading FKs, a quoted
    # mixed-case table with its SERIAL, a default from a sequence no column owns.
    "tricky-at-head": Case(tricky_spec()),
    "tricky-server-defaults-at-head": Case(tricky_spec(custom_env_py(
        "compare_server_default=True,"))),
    "tricky-manual-drift": Case(tricky_spec(custom_env_py("compare_server_default=True,")),
        sql=TRICKY_DRIFT, expect_clean=False),
}


def probe(app: AppDir, venv: Path, url: str,
          request: ProbeRequest | None = None) -> ProbeResult:
    """The probe on a gunicorn.service context for app, as www-data."""
    gunicorn = f"{venv}/bin/gunicorn"
    props = UnitProperties(
        name="gunicorn.service", load_state="loaded", active_state="active",
        sub_state="running", working_directory=str(app.root),
        environment=(f"DATABASE_URL={url}",),
        exec_start=(ExecCommand(gunicorn, (gunicorn, "--bind", "127.0.0.1:8000",
                                           "wsgi:app")),),
        user=APP_USER, group=APP_USER)
    ctx = build_context(props, ContextInputs(venvs={str(venv): True}))
    return run_probe(ctx, request or ProbeRequest(), 60.0)


# The same comparison on the other supported stacks (Alembic 1.13 / SQLAlchemy 1.4 and
# Alembic 1.18 / SQLAlchemy 2.1), for the cases whose env.py options matter most.
OTHER_STACKS = ["models-ahead", "include_object", "version_table",
                "include_schemas-two-schemas", "compare_type-callable", "pending"]
# Alembic 1.13 evaluates server defaults with a SELECT (nextval() included): the tricky app
# with compare_server_default there is test_old_alembic_evaluating_nextval_is_refused.
STACK_21_ONLY = ["tricky-manual-drift"]


@pytest.mark.parametrize("name, requirements", [
    *[(n, None) for n in sorted(CASES)],
    *[(n, SQLALCHEMY_14_REQUIREMENTS) for n in OTHER_STACKS],
    *[(n, SQLALCHEMY_21_REQUIREMENTS) for n in OTHER_STACKS + STACK_21_ONLY]],
    ids=[*sorted(CASES), *[f"{n}-sqlalchemy-1.4" for n in OTHER_STACKS],
         *[f"{n}-sqlalchemy-2.1" for n in OTHER_STACKS + STACK_21_ONLY]])
def test_driftwatch_and_flask_db_check_agree(name: str, requirements: tuple[str, ...] | None,
                                             make_app: Callable[..., AppDir],
                                             make_venv: Callable[..., Path],
                                             pg_database: PgDatabase) -> None:
    case = CASES[name]
    flask_venv = make_venv(requirements) if requirements else make_venv()
    app = make_app(case.spec)
    for sql in case.before:
        pg_database.execute(sql.format(owner=pg_database.owner))
    db_upgrade(app, flask_venv, pg_database.url, case.upgrade_to)
    for sql in case.sql:
        pg_database.execute(sql)

    check = flask_db_check(app, flask_venv, pg_database.url)
    result = probe(app, flask_venv, pg_database.url)
    assert result.ok, result.error
    env = result.alembic_env
    assert env.drift_source == "env.py"
    assert (env.version_table, env.version_table_schema) == (case.version_table,
                                                            case.version_table_schema)

    # The current revision from the version table env.py names, as the agent reads it.
    inspection = database.inspect(pg_database.url, env.version_table,
                                  env.version_table_schema or None)
    assert inspection.reachable, inspection.error
    graph = migration_checks.revisions_from_dicts(result.revisions)
    state = migration_checks.evaluate("gunicorn.service", inspection.version.revisions
                                      if inspection.version.exists else None, graph)
    assert state.current == ((case.upgrade_to,) if case.upgrade_to != "head"
                             else case.spec.heads)

    if check.not_up_to_date:
        # flask db check refuses to compare; driftwatch says why: pending revisions.
        assert case.upgrade_to != "head" and state.pending, check.output
        return
    assert state.pending == (), state
    assert check.clean is case.expect_clean, check.output
    assert check_ops(result.schema_diff or ()) == check.ops, check.output
    assert (result.schema_diff == ()) is check.clean


def test_without_env_py_options_the_filtered_table_would_be_drift(
        make_app: Callable[..., AppDir], flask_venv: Path, pg_database: PgDatabase) -> None:
    """The contrast: the same database, env.py without include_object -> extra table."""
    app = make_app(AppSpec())
    db_upgrade(app, flask_venv, pg_database.url)
    pg_database.execute("CREATE TABLE legacy_reports (id int)")
    result = probe(app, flask_venv, pg_database.url)
    assert [(d["kind"], d["table"]) for d in result.schema_diff or ()] == [
        ("remove_table", "legacy_reports")]
    filtered = make_app(AppSpec(env_py=custom_env_py("include_object=include_object,",
                                                     INCLUDE_OBJECT)), name="filtered")
    result = probe(filtered, flask_venv, pg_database.url)
    assert result.schema_diff == ()
    assert result.alembic_env.options["include_object"] == "callable include_object"


def test_env_py_error_names_env_py_and_line(make_app: Callable[..., AppDir],
                                            flask_venv: Path,
                                            pg_database: PgDatabase) -> None:
    app = make_app(AppSpec(env_py=custom_env_py(preamble="raise RuntimeError('boom')")))
    db_upgrade(app, make_app and flask_venv, pg_database.url, check=False)
    result = probe(app, flask_venv, pg_database.url)
    assert not result.ok and result.error_kind == "migrations"
    assert "RuntimeError: boom" in result.schema_diff_error
    assert f"(at {app.migrations}/env.py line" in result.schema_diff_error
    assert result.heads == ("r3",)  # the revision graph is still read


def test_multi_database_env_py_compares_each_bind_like_flask_db_check(
        make_app: Callable[..., AppDir], flask_venv: Path, pg: Any,
        pg_database: PgDatabase) -> None:
    """Flask-Migrate's own multi-database env.py (`flask db init --multidb`): one
    context.configure per engine, each compared against its own database."""
    template = next(flask_venv.glob("lib/python3*/site-packages/flask_migrate/templates/"
                                    "flask-multidb/env.py")).read_text()
    audit = pg.new_database()
    try:
        app = make_app(AppSpec(revisions=(), env_py=template,
                               extra_files={"bindapp.py": BIND_APP}))
        env = {"DATABASE_URL": pg_database.url, "AUDIT_DATABASE_URL": audit.url}
        result = probe_app(app, flask_venv, env, app_spec="bindapp:app")
        assert result.ok, result.error
        assert sorted((d["bind"], d["kind"], d["table"]) for d in result.schema_diff or ()) \
            == [("audit", "add_table", "audit_log"), ("default", "add_table", "accounts")]
        check = flask_db_check(app, flask_venv, pg_database.url,
                               env={**env, "FLASK_APP": "bindapp.py"})
        assert check_ops(result.schema_diff or ()) == check.ops, check.output
    finally:
        pg.drop(audit)


def test_tricky_drift_is_seen_operation_by_operation(make_app: Callable[..., AppDir],
                                                     flask_venv: Path,
                                                     pg_database: PgDatabase) -> None:
    """The tricky app's hand-made changes, each one named, as `flask db check` names them."""
    case = CASES["tricky-manual-drift"]
    app = make_app(case.spec)
    db_upgrade(app, flask_venv, pg_database.url)
    for sql in case.sql:
        pg_database.execute(sql)
    result = probe(app, flask_venv, pg_database.url)
    assert result.ok, result.error
    assert sorted((d["kind"], d["table"], d["name"]) for d in result.schema_diff or ()) == [
        ("add_fk", "articles", ""), ("add_unique", "articles", "uq_articles_author_slug"),
        ("modify_default", "articles", "price"), ("modify_nullable", "Tag Names", "label"),
        ("modify_type", "articles", "price"), ("modify_type", "articles", "published_at"),
        ("remove_fk", "articles", "articles_author_id_fkey"),
        ("remove_table", "Extra Table", "Extra Table")]
    assert check_ops(result.schema_diff or ()) == flask_db_check(
        app, flask_venv, pg_database.url).ops


def test_old_alembic_evaluating_nextval_is_refused(make_app: Callable[..., AppDir],
                                                   make_venv: Callable[..., Path],
                                                   pg_database: PgDatabase) -> None:
    """Alembic 1.13 (SQLAlchemy 1.4) compares server defaults by running them in a SELECT:
    `flask db check` with compare_server_default then calls nextval() on the live database
    and consumes a sequence value. The probe's read-only session refuses, and says so,
    instead of reporting drift; the sequence is untouched."""
    venv = make_venv(SQLALCHEMY_14_REQUIREMENTS)
    app = make_app(CASES["tricky-server-defaults-at-head"].spec)
    db_upgrade(app, venv, pg_database.url)

    def sequence() -> tuple[Any, ...]:
        return tuple(pg_database.execute("SELECT last_value, is_called FROM article_numbers")[0])

    before = sequence()
    result = probe(app, venv, pg_database.url)
    assert not result.ok and result.error_kind == "database"
    assert "cannot execute nextval() in a read-only transaction" in result.schema_diff_error
    assert sequence() == before
    flask_db_check(app, venv, pg_database.url)
    assert sequence() != before  # flask db check itself advanced it


# -- after one ALTER, a probe given the previous check's table fingerprints ----------------

BIG_DRIFT = (  # the 60-model app's 9 manual changes (5 models also carry a new column)
    "ALTER TABLE m0010 ALTER COLUMN name TYPE varchar(90)",
    "DROP INDEX ix_m0011_name", "CREATE INDEX ix_m0012_extra ON m0012 (amount)",
    "ALTER TABLE m0013 DROP CONSTRAINT m0013_parent_id_fkey",
    "ALTER TABLE m0014 ALTER COLUMN amount SET NOT NULL",
    "COMMENT ON COLUMN m0015.amount IS 'cents'", "COMMENT ON TABLE m0016 IS 'x'",
    "ALTER TABLE m0017 ADD COLUMN extra int", "CREATE TABLE m9999 (id int)")


@pytest.mark.parametrize("name, alter", [
    ("big", "ALTER TABLE m0010 ALTER COLUMN amount TYPE bigint"),          # a drifted table
    ("big", "ALTER TABLE m0040 DROP COLUMN created_at"),                   # a clean one
    ("tricky-manual-drift", "ALTER TABLE articles ALTER COLUMN score TYPE real"),
    ("tricky-manual-drift", "ALTER TABLE users ADD COLUMN legacy int"),
], ids=["big-drifted", "big-clean", "tricky-drifted", "tricky-clean"])
def test_an_incremental_probe_agrees_with_flask_db_check(
        name: str, alter: str, make_app: Callable[..., AppDir], flask_venv: Path,
        pg_database: PgDatabase) -> None:
    if name == "big":
        app, sql = make_app(bigapp.bigapp_spec(60, drift=5)), BIG_DRIFT
    else:
        app, sql = make_app(CASES[name].spec), CASES[name].sql
    db_upgrade(app, flask_venv, pg_database.url)
    for statement in sql:
        pg_database.execute(statement)
    first = probe(app, flask_venv, pg_database.url)
    assert first.ok, first.error
    previous = tablefp.previous_check(first.table_fingerprints, first.schema_diff)
    assert previous is not None
    pg_database.execute(alter)
    again = probe(app, flask_venv, pg_database.url, ProbeRequest(previous_check=previous))
    full = probe(app, flask_venv, pg_database.url)
    check = flask_db_check(app, flask_venv, pg_database.url)
    assert again.ok and full.ok, (again.error, full.error)
    assert again.schema_diff == full.schema_diff
    assert again.schema_diff != first.schema_diff
    assert check_ops(again.schema_diff or ()) == check.ops, check.output
    assert again.table_fingerprints == full.table_fingerprints
