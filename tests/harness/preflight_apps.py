"""Test apps for the migration preflight (agentctl plan): one hazard per pending revision.

The base revision ``p1`` creates ``orgs(id)``, ``items(id, org_id, email, name, note)``,
``legacy(id)`` and ``events(id)`` (no primary key); the models map ``orgs`` and ``items``. Every later revision
is one migration: :data:`UNSAFE` breaks one rule each, :data:`SAFE` does the same job in
the form the rule asks for. Chained one after the other, so one offline probe renders them
all, one revision at a time. :func:`fill_items` puts N rows into ``items`` in seconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from agent.context import AppContext, ContextInputs, build_context
from agent.model import ExecCommand, UnitProperties
from tests.harness.apps import APP_USER, AppDir, AppSpec, Revision
from tests.harness.postgres import PgDatabase

MODELS = '''"""Models of the preflight test app."""
from . import db


class Org(db.Model):
    __tablename__ = "orgs"
    id = db.Column(db.Integer, primary_key=True)


class Item(db.Model):
    __tablename__ = "items"
    id = db.Column(db.Integer, primary_key=True)
    org_id = db.Column(db.Integer)
    email = db.Column(db.String(200))
    name = db.Column(db.String(100))
    note = db.Column(db.Text)
'''

BASE = Revision("p1", None, message="base tables", upgrade="""
op.create_table('orgs', sa.Column('id', sa.Integer(), primary_key=True))
op.create_table('items', sa.Column('id', sa.Integer(), primary_key=True),
                sa.Column('org_id', sa.Integer()), sa.Column('email', sa.String(200)),
                sa.Column('name', sa.String(100)), sa.Column('note', sa.Text()))
op.create_table('legacy', sa.Column('id', sa.Integer(), primary_key=True))
op.create_table('events', sa.Column('id', sa.Integer(), nullable=False))
""")

AUTOCOMMIT = "with op.get_context().autocommit_block():\n    "

#: (revision id, rule expected, upgrade body): each breaks exactly that rule
UNSAFE: tuple[tuple[str, str, str], ...] = (
    ("u_index", "require-concurrent-index-creation",
     "op.create_index('ix_items_email', 'items', ['email'])"),
    ("u_fk", "adding-foreign-key-constraint",
     "op.create_foreign_key('fk_items_org', 'items', 'orgs', ['org_id'], ['id'])"),
    ("u_check", "constraint-missing-not-valid",
     "op.create_check_constraint('ck_items_name', 'items', 'length(name) > 0')"),
    ("u_type", "changing-column-type",
     "op.alter_column('items', 'org_id', type_=sa.BigInteger(), existing_type=sa.Integer())"),
    ("u_type_widen", "changing-column-type",  # binary-compatible: the rule fires, risk low
     "op.alter_column('items', 'name', type_=sa.Text(), existing_type=sa.String(100))"),
    ("u_notnull", "adding-not-nullable-field",
     "op.alter_column('items', 'note', nullable=False, existing_type=sa.Text())"),
    ("u_default", "adding-field-with-default",
     "op.add_column('items', sa.Column('token', sa.String(36), "
     "server_default=sa.text('gen_random_uuid()::text')))"),
    ("u_required", "adding-required-field",
     "op.add_column('items', sa.Column('code', sa.Integer(), nullable=False))"),
    ("u_unique", "disallowed-unique-constraint",
     "op.create_unique_constraint('uq_items_email', 'items', ['email'])"),
    ("u_pk", "adding-serial-primary-key-field",
     "op.create_primary_key('pk_events', 'events', ['id'])"),
    ("u_cic_tx", "ban-concurrent-index-creation-in-transaction",
     "op.create_index('ix_items_name', 'items', ['name'], postgresql_concurrently=True)"),
    ("u_drop_index", "require-concurrent-index-deletion",
     "op.drop_index('ix_items_email', table_name='items')"),
    ("u_rename_col", "renaming-column",
     "op.alter_column('items', 'note', new_column_name='remark')"),
    ("u_drop_col", "ban-drop-column", "op.drop_column('items', 'email')"),
    ("u_drop_table", "ban-drop-table", "op.drop_table('legacy')"),
    ("u_rename_table", "renaming-table", "op.rename_table('orgs', 'organisations')"),
)

#: (revision id, the rule whose safe form it is, upgrade body): no rule may fire. NOT VALID
#: and its VALIDATE are apart only with transaction_per_migration (preflight_spec's flag).
SAFE: tuple[tuple[str, str, str], ...] = (
    ("s_index", "require-concurrent-index-creation",
     AUTOCOMMIT + "op.create_index('ix_items_email', 'items', ['email'], "
     "postgresql_concurrently=True)"),
    ("s_fk", "adding-foreign-key-constraint",
     "op.execute('ALTER TABLE items ADD CONSTRAINT fk_items_org FOREIGN KEY (org_id) "
     "REFERENCES orgs (id) NOT VALID')"),
    ("s_fk_validate", "adding-foreign-key-constraint",
     "op.execute('ALTER TABLE items VALIDATE CONSTRAINT fk_items_org')"),
    ("s_check", "constraint-missing-not-valid",
     "op.execute('ALTER TABLE items ADD CONSTRAINT ck_items_name CHECK (length(name) > 0) "
     "NOT VALID')"),
    ("s_type", "changing-column-type",
     "op.add_column('items', sa.Column('name_text', sa.Text()))"),
    ("s_notnull", "adding-not-nullable-field",
     "op.execute('ALTER TABLE items ADD CONSTRAINT ck_note_nn CHECK (note IS NOT NULL) "
     "NOT VALID')"),
    ("s_notnull_validate", "adding-not-nullable-field",
     "op.execute('ALTER TABLE items VALIDATE CONSTRAINT ck_note_nn')"),
    ("s_default", "adding-field-with-default",
     "op.add_column('items', sa.Column('token', sa.String(36), server_default='none'))"),
    ("s_required", "adding-required-field",
     "op.add_column('items', sa.Column('code', sa.Integer(), nullable=False, "
     "server_default='0'))"),
    ("s_unique", "disallowed-unique-constraint",
     AUTOCOMMIT + "op.create_index('ux_items_email', 'items', ['email'], unique=True, "
     "postgresql_concurrently=True)\n"
     "op.execute('ALTER TABLE items ADD CONSTRAINT uq_items_email UNIQUE USING INDEX "
     "ux_items_email')"),
    ("s_pk", "adding-serial-primary-key-field",
     AUTOCOMMIT + "op.create_index('ux_events_id', 'events', ['id'], unique=True, "
     "postgresql_concurrently=True)\n"
     "op.execute('ALTER TABLE events ADD CONSTRAINT pk_events PRIMARY KEY USING INDEX "
     "ux_events_id')"),
    ("s_drop_index", "require-concurrent-index-deletion",
     AUTOCOMMIT + "op.drop_index('ix_items_email', table_name='items', "
     "postgresql_concurrently=True)"),
    ("s_add_col", "renaming-column / ban-drop-column (expand first)",
     "op.add_column('items', sa.Column('remark', sa.Text()))"),
)

#: a data migration: it reads the database, so Alembic cannot render it offline
DATA_MIGRATION = """
op.add_column('items', sa.Column('score', sa.Integer()))
conn = op.get_bind()
for (item_id,) in conn.execute(sa.text('SELECT id FROM items LIMIT 10')).fetchall():
    conn.execute(sa.text('UPDATE items SET score = 1 WHERE id = :id'), {'id': item_id})
"""


def chain(steps: Sequence[tuple[str, str]], base: Revision = BASE) -> tuple[Revision, ...]:
    """base, then one revision per (id, upgrade body), each revising the one before."""
    revisions, down = [base], base.id
    for rev_id, body in steps:
        revisions.append(Revision(rev_id, down, upgrade=body, message=rev_id))
        down = rev_id
    return tuple(revisions)


# Migrate(app, db, transaction_per_migration=True), set after init_app (create_app's hook).
PER_MIGRATION = "app.extensions['migrate'].configure_args['transaction_per_migration'] = True"


def preflight_spec(steps: Sequence[tuple[str, str]], per_migration: bool = False) -> AppSpec:
    """An app whose models map orgs and items, with base p1 and the given revisions; with
    per_migration, `flask db upgrade` commits after each revision."""
    return AppSpec(models_at=0, models_source=MODELS, revisions=chain(steps),
                   on_create=PER_MIGRATION if per_migration else "")


def fill_items(db: PgDatabase, rows: int) -> None:
    """rows rows in items (generate_series, one statement), then ANALYZE for reltuples."""
    db.execute("INSERT INTO items (id, org_id, email, name, note) "
               "SELECT g, NULL, 'user' || g || '@example.org', 'name ' || g, 'note' "
               f"FROM generate_series(1, {int(rows)}) AS g")
    db.execute("ANALYZE items")


def unit_context(app: AppDir, venv: Path, env: dict[str, str], user: str = APP_USER,
                 app_spec: str = "wsgi:app") -> AppContext:
    """The context of a gunicorn.service running app from venv as user (no systemd)."""
    gunicorn = f"{venv}/bin/gunicorn"
    props = UnitProperties(
        name="gunicorn.service", load_state="loaded", active_state="active",
        sub_state="running", working_directory=str(app.root),
        environment=tuple(f"{k}={v}" for k, v in env.items()),
        exec_start=(ExecCommand(gunicorn, (gunicorn, "--workers", "2", "--bind",
                                           "127.0.0.1:8000", app_spec)),),
        user=user, group=user)
    return build_context(props, ContextInputs(venvs={str(venv): True}))
