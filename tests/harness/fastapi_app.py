"""A plain Alembic app: FastAPI + SQLAlchemy models, alembic.ini and env.py with
target_metadata (no Flask), served by gunicorn with uvicorn workers."""

from __future__ import annotations

import textwrap
from pathlib import Path

from tests.harness.apps import SQLALCHEMY_20_REQUIREMENTS

# The harness's venv import check needs Flask too; the app itself never imports it.
FASTAPI_REQUIREMENTS = (*SQLALCHEMY_20_REQUIREMENTS, "fastapi==0.115.6", "uvicorn==0.32.1")
APP_SPEC = "shop.main:app"
WORKER_ARGS = ("-k", "uvicorn.workers.UvicornWorker")

MODELS = '''"""Models at schema version {version}."""
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"
    id = sa.Column(sa.Integer, primary_key=True)
    name = sa.Column(sa.String(80), nullable=False)
{extra}
'''
PRICE = "    price = sa.Column(sa.Integer, nullable=True)\n"

MAIN = '''"""The FastAPI app."""
import os

import sqlalchemy as sa
from fastapi import FastAPI

engine = sa.create_engine(os.environ["DATABASE_URL"])
app = FastAPI()


@app.get("/healthz")
def healthz():
    return "ok"


@app.get("/db")
def db_state():
    """Select every item through the model (a schema behind it raises UndefinedColumn); the
    pool keeps the worker's connection open afterwards, as a real app's does."""
    from shop.models import Item

    with engine.connect() as conn:
        revision = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars()
        revision = sorted(revision.all())
        items = len(conn.execute(sa.select(Item)).all())
    return {"revision": revision, "items": items}
'''

ALEMBIC_INI = '''[alembic]
script_location = migrations
prepend_sys_path = .
sqlalchemy.url = driver://user:pass@localhost/dbname

[loggers]
keys = root

[handlers]
keys = console

[formatters]
keys = generic

[logger_root]
level = WARN
handlers = console

[handler_console]
class = StreamHandler
args = (sys.stderr,)
level = NOTSET
formatter = generic

[formatter_generic]
format = %(levelname)-5.5s [%(name)s] %(message)s
'''

ENV_PY = '''"""env.py of a plain Alembic project: the URL from the environment."""
import os

from alembic import context
from sqlalchemy import engine_from_config, pool

from shop.models import Base

config = context.config
config.set_main_option("sqlalchemy.url", os.environ["DATABASE_URL"])
target_metadata = Base.metadata


def run_migrations_offline():
    context.configure(url=config.get_main_option("sqlalchemy.url"),
                      target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online():
    connectable = engine_from_config(config.get_section(config.config_ini_section, {}),
                                     prefix="sqlalchemy.", poolclass=pool.NullPool)
    with connectable.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
'''

SCRIPT_MAKO = '''"""${message}"""
revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = None
depends_on = None


def upgrade():
    ${upgrades if upgrades else "pass"}


def downgrade():
    ${downgrades if downgrades else "pass"}
'''

R1 = '''"""items"""
from alembic import op
import sqlalchemy as sa

revision = "a1"
down_revision = None
branch_labels = None
depends_on = None


def upgrade():
    op.create_table("items", sa.Column("id", sa.Integer, primary_key=True),
                    sa.Column("name", sa.String(80), nullable=False))


def downgrade():
    op.drop_table("items")
'''

R2 = '''"""items.price"""
from alembic import op
import sqlalchemy as sa

revision = "a2"
down_revision = "a1"
branch_labels = None
depends_on = None


def upgrade():
    op.add_column("items", sa.Column("price", sa.Integer, nullable=True))


def downgrade():
    op.drop_column("items", "price")
'''


def write_fastapi_app(root: Path, revisions: int = 2, models_price: bool = True) -> Path:
    """Write the project under root (world-readable); revisions: a1 only, or a1 -> a2."""
    files = {
        "shop/__init__.py": "",
        "shop/main.py": MAIN,
        "shop/models.py": MODELS.format(version=2 if models_price else 1,
                                        extra=PRICE if models_price else ""),
        "alembic.ini": ALEMBIC_INI,
        "migrations/env.py": ENV_PY,
        "migrations/script.py.mako": SCRIPT_MAKO,
        "migrations/versions/a1_items.py": R1,
    }
    if revisions >= 2:
        files["migrations/versions/a2_price.py"] = R2
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
        path.chmod(0o644)
    for directory in [root, *[p for p in root.rglob("*") if p.is_dir()]]:
        directory.chmod(0o755)
    return root
