"""A large Flask app for drift-check tests and measurements: N models (default 1,000).

Each model has 5 columns (id, parent_id, name, amount, created_at), an index on ``name`` and a
foreign key ``parent_id -> <previous table>.id`` (the first table refers to itself). One
migration file creates them all with the same shape, so after ``flask db upgrade`` the live
schema equals the models and ``flask db check`` is clean.

(bench9 writes tests/harness/bigapp.py for the benchmark; this is the drift tests' own,
minimal generator, kept apart so both branches merge cleanly.)
"""

from __future__ import annotations

from pathlib import Path

from tests.harness.apps import AppDir, AppSpec, Revision, write_app

DEFAULT_MODELS = 1000


def table_name(index: int) -> str:
    """The table of model number index (t0000, t0001, ...)."""
    return f"t{index:04d}"


def render_models(count: int = DEFAULT_MODELS) -> str:
    """app/models.py with count models."""
    out = [f'"""{count} generated models: 5 columns, an index and a foreign key each."""',
           "from . import db", ""]
    for i in range(count):
        parent = table_name(i - 1 if i else 0)
        out += ["", f"class M{i:04d}(db.Model):", f"    __tablename__ = {table_name(i)!r}",
                "    id = db.Column(db.Integer, primary_key=True)",
                f"    parent_id = db.Column(db.Integer, db.ForeignKey('{parent}.id'))",
                "    name = db.Column(db.String(80), nullable=False, index=True)",
                "    amount = db.Column(db.Numeric(12, 2))",
                "    created_at = db.Column(db.DateTime(timezone=True))", ""]
    return "\n".join(out) + "\n"


def render_upgrade(count: int = DEFAULT_MODELS) -> str:
    """The body of the one migration that creates every table (a loop, not 1,000 blocks)."""
    return f"""\
for i in range({count}):
    name, parent = 't%04d' % i, 't%04d' % (i - 1 if i else 0)
    op.create_table(name,
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('parent_id', sa.Integer(), nullable=True),
        sa.Column('name', sa.String(length=80), nullable=False),
        sa.Column('amount', sa.Numeric(precision=12, scale=2), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(['parent_id'], [parent + '.id']),
        sa.PrimaryKeyConstraint('id'))
    op.create_index(op.f('ix_%s_name' % name), name, ['name'], unique=False)"""


def spec(count: int = DEFAULT_MODELS) -> AppSpec:
    """The app: count models, one revision ("big1") creating them."""
    revision = Revision("big1", None, upgrade=render_upgrade(count),
                        downgrade=f"for i in reversed(range({count})):\n"
                                  "    op.drop_table('t%04d' % i)",
                        message=f"create {count} tables")
    return AppSpec(models_source=render_models(count), revisions=(revision,))


def write(dest: Path, count: int = DEFAULT_MODELS) -> AppDir:
    """Write the app into dest."""
    return write_app(dest, spec(count))
