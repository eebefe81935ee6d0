"""A Flask-Migrate app with many models (issue #9: 1,000 models, 5 columns, an index and an
FK each), written as a real project by :func:`tests.harness.apps.write_app`.

Table ``m0000`` .. ``m{N-1}``, class ``M0000`` ..; each table has ``id`` (primary key),
``parent_id`` (FK to the previous table's ``id``; the first table refers to itself),
``name`` (``String(80)``, indexed: ``ix_<table>_name``), ``amount`` (``Integer``) and
``created_at`` (``DateTime``). One migration, ``big1``, creates them all, in FK order, with the
same text ``flask db migrate`` renders, so ``flask db upgrade`` then ``flask db check`` says
"No new upgrade operations detected".

``drift=K`` gives the first K models one more column (``note``, ``String(40)``) than the
migration creates: ``flask db check`` then reports K ``add_column`` operations.

    app = write_bigapp(workspace / "big", models=1000)
    db_upgrade(app, venv, db.url)      # from tests.harness.apps
"""

from __future__ import annotations

from pathlib import Path

from tests.harness.apps import AppDir, AppSpec, Revision, write_app

DEFAULT_MODELS = 1000
REVISION = "big1"


def table_name(i: int) -> str:
    """Table of model number i."""
    return f"m{i:04d}"


def class_name(i: int) -> str:
    """Class of model number i."""
    return f"M{i:04d}"


def parent_of(i: int) -> int:
    """Which model's id model i refers to (the previous one; the first refers to itself)."""
    return max(i - 1, 0)


def render_models(models: int, drift: int = 0) -> str:
    """app/models.py: MODELS classes; the first DRIFT carry a column no migration creates."""
    if models < 1 or not 0 <= drift <= models:
        raise ValueError("need models >= 1 and 0 <= drift <= models")
    out = [f'"""{models} models, 5 columns, an index and an FK each (tests/harness/bigapp.py)."""',
           "from . import db", ""]
    for i in range(models):
        out += ["", f"class {class_name(i)}(db.Model):",
                f"    __tablename__ = {table_name(i)!r}",
                "",
                "    id = db.Column(db.Integer, primary_key=True)",
                f"    parent_id = db.Column(db.Integer, db.ForeignKey('{table_name(parent_of(i))}.id'),"
                " nullable=True)",
                "    name = db.Column(db.String(80), nullable=False, index=True)",
                "    amount = db.Column(db.Integer, nullable=True)",
                "    created_at = db.Column(db.DateTime, nullable=True)"]
        if i < drift:
            out.append("    note = db.Column(db.String(40), nullable=True)")
        out.append("")
    return "\n".join(out) + "\n"


def render_upgrade(models: int) -> str:
    """The body of big1's upgrade(): what ``flask db migrate`` renders for the models."""
    parts = []
    for i in range(models):
        t, parent = table_name(i), table_name(parent_of(i))
        parts.append(f"""\
op.create_table('{t}',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('parent_id', sa.Integer(), nullable=True),
    sa.Column('name', sa.String(length=80), nullable=False),
    sa.Column('amount', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=True),
    sa.ForeignKeyConstraint(['parent_id'], ['{parent}.id'], ),
    sa.PrimaryKeyConstraint('id')
)
with op.batch_alter_table('{t}', schema=None) as batch_op:
    batch_op.create_index(batch_op.f('ix_{t}_name'), ['name'], unique=False)
""")
    return "\n".join(parts)


def render_downgrade(models: int) -> str:
    """The body of big1's downgrade(): drop in reverse FK order."""
    return "\n".join(f"op.drop_table('{table_name(i)}')" for i in reversed(range(models)))


def bigapp_spec(models: int = DEFAULT_MODELS, drift: int = 0) -> AppSpec:
    """The AppSpec of a MODELS-model app (see the module docstring)."""
    rev = Revision(REVISION, None, render_upgrade(models), render_downgrade(models),
                   message=f"create {models} tables")
    return AppSpec(models_at=0, revisions=(rev,), models_source=render_models(models, drift))


def write_bigapp(dest: Path, models: int = DEFAULT_MODELS, drift: int = 0) -> AppDir:
    """Write the app into dest; ``db_upgrade(app, venv, url)`` creates its tables."""
    return write_app(dest, bigapp_spec(models, drift))
