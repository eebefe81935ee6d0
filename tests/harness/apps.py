"""Real Flask + Flask-SQLAlchemy + Flask-Migrate apps for tests, and the venvs they run in.

- :func:`app_venv` builds (once, cached across runs) a venv from ``/usr/bin/python3`` holding a
  requirement set, readable and executable by ``www-data``.
- :class:`AppSpec` / :class:`Revision` describe an app: which schema version its models are at,
  which migration files exist (hand-written, any graph, any file text), import-time hooks.
  :func:`write_app` writes it as a real project: ``app/`` package with ``create_app()``,
  ``wsgi.py``, and a Flask-Migrate ``migrations/`` directory (the files ``flask db init`` makes).
- :func:`gunicorn_unit` renders a realistic ``gunicorn.service``.
- :func:`flask_db` / :func:`db_upgrade` / :func:`db_current` run ``flask db ...`` on the host in
  the app's venv, cwd and environment, to put a database at a chosen revision.

The standard schema (``models_at`` / :func:`standard_revisions`) grows one step per revision:
  1 ``users(id, email)``  2 ``users.name``  3 ``posts(id, user_id -> users, title)``
  4 ``posts.created_at``  5 ``comments(id, post_id -> posts, body)``
with revision ids ``r1`` .. ``r5`` by default. The app serves ``/healthz`` (no database),
``/db`` (selects every mapped model, so a schema behind the models raises UndefinedColumn /
UndefinedTable, and returns the alembic_version rows) and ``/whoami`` (uid, pid, interpreter,
database host/port/name/user; never the password).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import pwd
import re
import shlex
import shutil
import subprocess
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

# -- venvs ---------------------------------------------------------------------------------

BASE_PYTHON = "/usr/bin/python3"
VENV_CACHE_ROOT = Path(os.environ.get("DRIFTWATCH_TEST_VENV_CACHE",
                                      "/var/cache/driftwatch-tests/venvs"))
VENV_FORMAT = 2  # bump to invalidate every cached venv when the build recipe changes
VENV_MARKER = ".driftwatch-venv.json"
APP_USER = "www-data"

_COMMON = ("flask==3.1.3", "flask-migrate==4.1.0", "gunicorn==23.0.0",
           "psycopg2-binary==2.9.13")
#: SQLAlchemy 2.0 (the default set)
SQLALCHEMY_20_REQUIREMENTS: tuple[str, ...] = (
    *_COMMON, "flask-sqlalchemy==3.1.1", "sqlalchemy==2.0.58", "alembic==1.18.4")
#: SQLAlchemy 1.4 needs Flask-SQLAlchemy 3.0.x (3.1 requires SQLAlchemy >= 2.0.16)
SQLALCHEMY_14_REQUIREMENTS: tuple[str, ...] = (
    *_COMMON, "flask-sqlalchemy==3.0.5", "sqlalchemy==1.4.54", "alembic==1.13.3")
#: SQLAlchemy 2.1: ``postgresql://`` means psycopg (3) there, which this set does not install
SQLALCHEMY_21_REQUIREMENTS: tuple[str, ...] = (
    *_COMMON, "flask-sqlalchemy==3.1.1", "sqlalchemy==2.1.9", "alembic==1.18.4")
DEFAULT_REQUIREMENTS = SQLALCHEMY_20_REQUIREMENTS
_IMPORT_CHECK = "import flask, flask_sqlalchemy, flask_migrate, gunicorn, psycopg2, sqlalchemy"


class HarnessError(RuntimeError):
    """A venv could not be built, or a command run for a test app failed."""


def _python_version(python: str) -> str:
    return subprocess.run([python, "-c", "import sys; print(sys.version)"],
                          capture_output=True, text=True, check=True).stdout.strip()


def venv_key(requirements: Sequence[str], python: str = BASE_PYTHON) -> str:
    """The cache key of a requirement set: order-insensitive, per interpreter build."""
    reqs = sorted({r.strip().lower() for r in requirements if r.strip()})
    blob = json.dumps({"format": VENV_FORMAT, "python": python,
                       "version": _python_version(python), "requirements": reqs})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def app_venv(requirements: tuple[str, ...] = DEFAULT_REQUIREMENTS, *,
             python: str = BASE_PYTHON, cache_root: Path | None = None) -> Path:
    """A venv (made by ``python -m venv``) with requirements installed; built once, cached.

    Cached under ``cache_root/<key>``. Builders take an exclusive lock per key, build in a
    sibling temp dir, fix the absolute paths venv/pip wrote there, verify the imports as
    ``www-data``, and rename into place, so a cached path is always complete.
    """
    cache_root = Path(cache_root or VENV_CACHE_ROOT)
    if not os.access(python, os.X_OK):
        raise HarnessError(f"{python} not found: test app venvs are made with the system "
                           f"python (a venv from an interpreter under /root is not "
                           f"executable for User=www-data)")
    key = venv_key(requirements, python)
    final = cache_root / key
    if (final / VENV_MARKER).exists():
        return final
    _mkdirs_world_readable(cache_root)
    with _locked(cache_root / f".{key}.lock"):
        if (final / VENV_MARKER).exists():
            return final
        if final.exists():  # incomplete leftover from an older recipe; we hold the lock
            shutil.rmtree(final)
        for stale in cache_root.glob(f".build-{key}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        build = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=cache_root))
        try:
            _build_venv(build, final, requirements, python)
            os.rename(build, final)
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)
            raise
    _verify_venv(final)
    return final


def _build_venv(build: Path, final: Path, requirements: Sequence[str], python: str) -> None:
    started = time.monotonic()
    _run([python, "-m", "venv", str(build)], "python -m venv")
    env = {**_clean_env(), "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    _run([str(build / "bin" / "python"), "-m", "pip", "install", "-q", *requirements],
         "pip install", env=env, timeout=900)
    # venv and pip write absolute paths (shebangs, activate scripts, pyvenv.cfg); point
    # them at the final location before the rename. .pyc co_filename is fixed on import.
    old, new = str(build).encode(), str(final).encode()
    for path in [*build.joinpath("bin").iterdir(), build / "pyvenv.cfg"]:
        if path.is_symlink() or not path.is_file():
            continue
        data = path.read_bytes()
        if old in data:
            path.write_bytes(data.replace(old, new))
    freeze = subprocess.run([str(build / "bin" / "python"), "-m", "pip", "freeze"],
                            capture_output=True, text=True, env=env).stdout.split()
    build.joinpath(VENV_MARKER).write_text(json.dumps({
        "requirements": list(requirements), "python": python, "freeze": freeze,
        "build_seconds": round(time.monotonic() - started, 1)}, indent=1) + "\n")
    _make_world_readable(build)


def _verify_venv(venv: Path) -> None:
    """The venv imports its packages, also as www-data when we are root."""
    argv = [str(venv / "bin" / "python"), "-c", _IMPORT_CHECK]
    _run(argv, f"import check in {venv}", env=_clean_env(), cwd="/")
    if os.geteuid() == 0 and _user_exists(APP_USER):
        _run(as_user_argv(APP_USER, argv), f"import check as {APP_USER} in {venv}",
             env=_clean_env(), cwd="/")


def _clean_env() -> dict[str, str]:
    """os.environ without what would leak the test runner's Python into a venv."""
    drop = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP", "PYTHONUSERBASE",
            "PYTHONNOUSERSITE", "PYTHONSAFEPATH", "PIP_REQUIRE_VIRTUALENV"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def venv_info(venv: Path) -> dict[str, object]:
    """What app_venv recorded about a cached venv (requirements, pip freeze, build time)."""
    return json.loads((venv / VENV_MARKER).read_text())


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _mkdirs_world_readable(path: Path) -> None:
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            d.mkdir()
            d.chmod(0o755)


def _make_world_readable(root: Path) -> None:
    """chmod go+r on files, go+rx on dirs and executables (www-data must run the venv)."""
    for dirpath, dirnames, filenames in os.walk(root):
        os.chmod(dirpath, os.stat(dirpath).st_mode | 0o755)
        for name in filenames:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                continue
            mode = os.stat(p).st_mode
            mode |= 0o044 | (0o011 if mode & 0o100 else 0)
            os.chmod(p, mode)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def as_user_argv(user: str, argv: Sequence[str]) -> list[str]:
    """argv run as user (uid, gid, supplementary groups) via setpriv; needs root."""
    pw = pwd.getpwnam(user)
    return ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups",
            "--", *argv]


def _run(argv: Sequence[str], what: str, env: Mapping[str, str] | None = None,
         timeout: float = 300, cwd: str | Path | None = None,
         ) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=cwd, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise HarnessError(f"{what} failed ({shlex.join(argv)} exited {proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return proc


# -- app specs -------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Step:
    message: str
    upgrade: str
    downgrade: str
    # table -> (class name, [column source lines]) added to the models at this step
    model_columns: Mapping[str, tuple[str, tuple[str, ...]]]


_STEPS: tuple[_Step, ...] = (
    _Step("create users",
          """\
op.create_table('users',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('email', sa.String(length=120), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('email')
)""",
          "op.drop_table('users')",
          {"users": ("User", ("id = db.Column(db.Integer, primary_key=True)",
                              "email = db.Column(db.String(120), nullable=False, unique=True)"))}),
    _Step("add users.name",
          "op.add_column('users', sa.Column('name', sa.String(length=80), nullable=True))",
          "op.drop_column('users', 'name')",
          {"users": ("User", ("name = db.Column(db.String(80), nullable=True)",))}),
    _Step("create posts",
          """\
op.create_table('posts',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('title', sa.String(length=200), nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], ),
    sa.PrimaryKeyConstraint('id')
)""",
          "op.drop_table('posts')",
          {"posts": ("Post", ("id = db.Column(db.Integer, primary_key=True)",
                              "user_id = db.Column(db.Integer, db.ForeignKey('users.id'), "
                              "nullable=False)",
                              "title = db.Column(db.String(200), nullable=False)"))}),
    _Step("add posts.created_at",
          "op.add_column('posts', sa.Column('created_at', sa.DateTime(), nullable=True))",
          "op.drop_column('posts', 'created_at')",
          {"posts": ("Post", ("created_at = db.Column(db.DateTime, nullable=True)",))}),
    _Step("create comments",
          """\
op.create_table('comments',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('post_id', sa.Integer(), nullable=False),
    sa.Column('body', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['post_id'], ['posts.id'], ),
    sa.PrimaryKeyConstraint('id')
)""",
          "op.drop_table('comments')",
          {"comments": ("Comment", ("id = db.Column(db.Integer, primary_key=True)",
                                    "post_id = db.Column(db.Integer, "
                                    "db.ForeignKey('posts.id'), nullable=False)",
                                    "body = db.Column(db.Text, nullable=False)"))}),
)
MAX_SCHEMA_VERSION = len(_STEPS)


@dataclass(frozen=True)
class Revision:
    """One migration file. ``source`` (verbatim file text) overrides everything but the ids,
    which are still used for ``AppSpec.heads`` and the file name."""

    id: str
    down_revision: str | tuple[str, ...] | None
    upgrade: str = "pass"
    downgrade: str = "pass"
    message: str = ""
    branch_labels: str | tuple[str, ...] | None = None
    depends_on: str | tuple[str, ...] | None = None
    source: str | None = None
    filename: str | None = None

    @property
    def file_name(self) -> str:
        if self.filename:
            return self.filename
        slug = re.sub(r"[^a-z0-9]+", "_", self.message.lower()).strip("_")[:40]
        return f"{self.id}_{slug}.py" if slug else f"{self.id}_.py"

    @property
    def parents(self) -> tuple[str, ...]:
        if self.down_revision is None:
            return ()
        if isinstance(self.down_revision, str):
            return (self.down_revision,)
        return tuple(self.down_revision)

    def render(self, index: int = 0) -> str:
        if self.source is not None:
            return self.source
        down = self.down_revision
        revises = ", ".join(self.parents)
        return f'''"""{self.message or self.id}

Revision ID: {self.id}
Revises: {revises}
Create Date: 2024-01-{1 + index % 28:02d} 12:00:00.000000

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = {self.id!r}
down_revision = {down!r}
branch_labels = {self.branch_labels!r}
depends_on = {self.depends_on!r}


def upgrade():
{textwrap.indent(self.upgrade.strip() or "pass", "    ")}


def downgrade():
{textwrap.indent(self.downgrade.strip() or "pass", "    ")}
'''


def standard_revisions(count: int = 3, ids: Sequence[str] | None = None,
                       start: int = 1) -> tuple[Revision, ...]:
    """Linear revisions for standard schema steps start..start+count-1 (ids r<step>)."""
    if start < 1 or start + count - 1 > MAX_SCHEMA_VERSION:
        raise ValueError(f"the standard schema has steps 1..{MAX_SCHEMA_VERSION}")
    ids = list(ids) if ids is not None else [f"r{n}" for n in range(start, start + count)]
    if len(ids) != count:
        raise ValueError("need one id per revision")
    revs = []
    down: str | None = None if start == 1 else f"r{start - 1}"
    for n, rev_id in zip(range(start, start + count), ids):
        step = _STEPS[n - 1]
        revs.append(Revision(rev_id, down, step.upgrade, step.downgrade, step.message))
        down = rev_id
    return tuple(revs)


def broken_revision(rev_id: str, down_revision: str | None,
                    message: str = "broken") -> Revision:
    """A migration file with a Python syntax error in it."""
    return Revision(rev_id, down_revision, message=message, source=(
        f'"""{message}\n\nRevision ID: {rev_id}\nRevises: {down_revision or ""}\n"""\n'
        f"from alembic import op\nimport sqlalchemy as sa\n\n"
        f"revision = {rev_id!r}\ndown_revision = {down_revision!r}\n"
        f"branch_labels = None\ndepends_on = None\n\n\n"
        f"def upgrade(:\n    op.add_column('users', sa.Column('oops', sa.Integer()))\n"))


def record_identity_hook(directory: str) -> str:
    """on_import code writing one JSON file per import of the app package into directory
    (uid, gid, groups, pid, ppid, cwd, interpreter, argv, sorted env keys, time). One file
    per process, so a root-run ``flask db upgrade`` cannot leave a root-owned file that a
    www-data worker then fails to append to. Read them with :func:`read_identities`."""
    return textwrap.dedent(f"""\
        import json as _dw_json, os as _dw_os, sys as _dw_sys, time as _dw_time
        _dw_name = "%d-%d-%s.json" % (_dw_os.getuid(), _dw_os.getpid(), _dw_os.urandom(4).hex())
        with open(_dw_os.path.join({directory!r}, _dw_name), "x") as _dw_fh:
            _dw_json.dump({{
                "uid": _dw_os.getuid(), "euid": _dw_os.geteuid(), "gid": _dw_os.getgid(),
                "groups": sorted(_dw_os.getgroups()), "pid": _dw_os.getpid(),
                "ppid": _dw_os.getppid(), "cwd": _dw_os.getcwd(),
                "executable": _dw_sys.executable, "prefix": _dw_sys.prefix,
                "argv": _dw_sys.argv, "env_keys": sorted(_dw_os.environ),
                "time": _dw_time.time(),
            }}, _dw_fh)
        """)


def read_identities(directory: Path) -> list[dict[str, object]]:
    """The records record_identity_hook wrote into directory, oldest first. For a sandbox,
    pass ``sb.path(str(directory))``."""
    records = [json.loads(p.read_text()) for p in Path(directory).glob("*.json")]
    return sorted(records, key=lambda r: r["time"])  # type: ignore[arg-type,return-value]


def db_write_hook(table: str = "import_side_effect") -> str:
    """on_create code that writes to the database while the app is created (i.e. on import
    of wsgi.py): CREATE TABLE IF NOT EXISTS + INSERT, committed. Raises if it cannot."""
    return textwrap.dedent(f"""\
        db.session.execute(sa.text(
            "CREATE TABLE IF NOT EXISTS {table} (id serial PRIMARY KEY, "
            "pid integer, at timestamptz DEFAULT now())"))
        db.session.execute(sa.text("INSERT INTO {table} (pid) VALUES (:pid)"),
                           {{"pid": os.getpid()}})
        db.session.commit()
        """)


@dataclass(frozen=True)
class AppSpec:
    """What :func:`write_app` writes. The default: models at schema version 3, migrations
    r1 -> r2 -> r3."""

    models_at: int = 3
    revisions: tuple[Revision, ...] = field(default_factory=lambda: standard_revisions(3))
    #: verbatim app/models.py instead of the standard schema at models_at
    models_source: str | None = None
    #: code at module level of app/__init__.py (runs on import, before create_app)
    on_import: str = ""
    #: code at the end of create_app(), inside app.app_context(); ``app``, ``db``, ``sa``,
    #: ``os`` are in scope
    on_create: str = ""
    #: environment variable holding the database URL (os.environ[...]: KeyError if unset)
    database_env: str = "DATABASE_URL"
    package: str = "app"
    #: Migrate(directory=...): None = Flask-Migrate's default, "migrations" relative to cwd
    migrate_directory: str | None = None
    #: extra files, path relative to the app root -> text
    extra_files: Mapping[str, str] = field(default_factory=dict)
    #: verbatim migrations/env.py instead of Flask-Migrate's (see :func:`custom_env_py`)
    env_py: str | None = None

    def with_revisions(self, *extra: Revision) -> "AppSpec":
        """A copy with more migration files."""
        return replace(self, revisions=(*self.revisions, *extra))

    @property
    def heads(self) -> tuple[str, ...]:
        """Revision ids no other revision revises (sorted)."""
        parents = {p for r in self.revisions for p in r.parents}
        return tuple(sorted(r.id for r in self.revisions if r.id not in parents))

    @property
    def head(self) -> str:
        heads = self.heads
        if len(heads) != 1:
            raise ValueError(f"spec has {len(heads)} heads: {heads}")
        return heads[0]


def two_heads_spec(models_at: int = 3) -> AppSpec:
    """r1 -> r2 -> r3 plus r3b -> r2 (adds users.nickname): heads r3 and r3b."""
    branch = Revision(
        "r3b", "r2", message="add users.nickname",
        upgrade="op.add_column('users', sa.Column('nickname', sa.String(length=40), "
                "nullable=True))",
        downgrade="op.drop_column('users', 'nickname')")
    return AppSpec(models_at=models_at).with_revisions(branch)


def render_models(version: int) -> str:
    """app/models.py for the standard schema after step ``version`` (0 = no models)."""
    if not 0 <= version <= MAX_SCHEMA_VERSION:
        raise ValueError(f"models_at must be 0..{MAX_SCHEMA_VERSION}")
    tables: dict[str, tuple[str, list[str]]] = {}
    for step in _STEPS[:version]:
        for table, (cls, cols) in step.model_columns.items():
            tables.setdefault(table, (cls, []))[1].extend(cols)
    out = [f'"""Models at standard schema version {version}."""', "from . import db", ""]
    for table, (cls, cols) in tables.items():
        out += ["", f"class {cls}(db.Model):", f"    __tablename__ = {table!r}", ""]
        out += [f"    {c}" for c in cols]
        out.append("")
    return "\n".join(out) + "\n"


# -- writing an app ----------------------------------------------------------------------

@dataclass(frozen=True)
class AppDir:
    """A written app: root holds the package, wsgi.py and migrations/."""

    root: Path
    spec: AppSpec

    @property
    def package_dir(self) -> Path:
        return self.root / self.spec.package

    @property
    def wsgi(self) -> Path:
        return self.root / "wsgi.py"

    @property
    def migrations(self) -> Path:
        return self.root / (self.spec.migrate_directory or "migrations")

    @property
    def versions(self) -> Path:
        return self.migrations / "versions"

    def revision_file(self, rev_id: str) -> Path:
        for rev in self.spec.revisions:
            if rev.id == rev_id:
                return self.versions / rev.file_name
        raise KeyError(rev_id)

    def write(self, relpath: str, content: str, mode: int = 0o644) -> Path:
        """Write (or overwrite) a file under the app root, readable by www-data."""
        return _write(self.root / relpath, content, mode)


def write_app(dest: Path, spec: AppSpec | None = None) -> AppDir:
    """Write the app described by spec into dest (created; files 0644, dirs 0755)."""
    spec = spec or AppSpec()
    dest = Path(dest)
    pkg = dest / spec.package
    models = spec.models_source if spec.models_source is not None else \
        render_models(spec.models_at)
    _write(pkg / "__init__.py", _render_init(spec))
    _write(pkg / "models.py", models)
    _write(pkg / "views.py", _VIEWS)
    _write(dest / "wsgi.py", f"from {spec.package} import create_app\n\napp = create_app()\n")
    mig = dest / (spec.migrate_directory or "migrations")
    _write(mig / "alembic.ini", FLASK_MIGRATE_ALEMBIC_INI)
    _write(mig / "env.py", spec.env_py if spec.env_py is not None else FLASK_MIGRATE_ENV_PY)
    _write(mig / "script.py.mako", FLASK_MIGRATE_SCRIPT_MAKO)
    _write(mig / "README", "Single-database configuration for Flask.\n")
    (mig / "versions").mkdir(parents=True, exist_ok=True)
    (mig / "versions").chmod(0o755)
    for index, rev in enumerate(spec.revisions):
        _write(mig / "versions" / rev.file_name, rev.render(index))
    for rel, text in spec.extra_files.items():
        _write(dest / rel, text)
    dest.chmod(0o755)
    return AppDir(dest, spec)


def _write(path: Path, content: str, mode: int = 0o644) -> Path:
    missing = []
    p = path.parent
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir()
        d.chmod(0o755)
    path.write_text(content)
    path.chmod(mode)
    return path


def _render_init(spec: AppSpec) -> str:
    migrate_args = "app, db" if spec.migrate_directory is None else \
        f"app, db, directory=os.path.join(os.path.dirname(os.path.dirname(" \
        f"os.path.abspath(__file__))), {spec.migrate_directory!r})"
    on_create = textwrap.indent(spec.on_create.strip(), "        ") if spec.on_create.strip() \
        else "        pass"
    return f'''"""Test app from tests/harness/apps.py, models at schema version {spec.models_at}."""
import os

import sqlalchemy as sa
from flask import Flask
from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy

SCHEMA_VERSION = {spec.models_at}

db = SQLAlchemy()
migrate = Migrate()

# --- on_import hook ---
{spec.on_import.strip()}
# --- end on_import hook ---


def create_app():
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = os.environ[{spec.database_env!r}]
    db.init_app(app)
    migrate.init_app({migrate_args})

    from . import models  # noqa: F401
    from .views import bp

    app.register_blueprint(bp)

    with app.app_context():
        # --- on_create hook ---
{on_create}
        # --- end on_create hook ---
    return app
'''


_VIEWS = '''"""Routes of the test app."""
import os
import sys

import sqlalchemy as sa
from flask import Blueprint, jsonify

from . import SCHEMA_VERSION, db

bp = Blueprint("driftwatch_test_app", __name__)


@bp.get("/healthz")
def healthz():
    return "ok\\n"


@bp.get("/db")
def db_state():
    """Select every mapped model (all its columns) and the alembic_version rows."""
    revision = db.session.execute(
        sa.text("SELECT version_num FROM alembic_version")).scalars().all()
    tables = {}
    for mapper in db.Model.registry.mappers:
        cls = mapper.class_
        tables[cls.__tablename__] = len(db.session.execute(sa.select(cls)).scalars().all())
    return jsonify(revision=sorted(revision), tables=tables, schema_version=SCHEMA_VERSION)


@bp.get("/whoami")
def whoami():
    url = db.engine.url
    return jsonify(
        uid=os.getuid(), gid=os.getgid(), groups=sorted(os.getgroups()), pid=os.getpid(),
        ppid=os.getppid(), cwd=os.getcwd(), executable=sys.executable, prefix=sys.prefix,
        database={"driver": url.drivername, "host": url.host, "port": url.port,
                  "database": url.database, "username": url.username},
    )
'''

# The files `flask db init` writes with Flask-Migrate 4.1.0 (templates/flask/), verbatim.
FLASK_MIGRATE_ALEMBIC_INI = """\
# A generic, single database configuration.

[alembic]
# template used to generate migration files
# file_template = %%(rev)s_%%(slug)s

# set to 'true' to run the environment during
# the 'revision' command, regardless of autogenerate
# revision_environment = false


# Logging configuration
[loggers]
keys = root,sqlalchemy,alembic,flask_migrate

[handlers]
keys = console

[formatters]
keys = generic

[logger_root]
level = WARN
handlers = console
qualname =

[logger_sqlalchemy]
level = WARN
handlers =
qualname = sqlalchemy.engine

[logger_alembic]
level = INFO
handlers =
qualname = alembic

[logger_flask_migrate]
level = INFO
handlers =
qualname = flask_migrate

[handler_console]
class = StreamHandler
args = (sys.stderr,)
level = NOTSET
formatter = generic

[formatter_generic]
format = %(levelname)-5.5s [%(name)s] %(message)s
datefmt = %H:%M:%S
"""

FLASK_MIGRATE_ENV_PY = '''\
import logging
from logging.config import fileConfig

from flask import current_app

from alembic import context

# this is the Alembic Config object, which provides
# access to the values within the .ini file in use.
config = context.config

# Interpret the config file for Python logging.
# This line sets up loggers basically.
fileConfig(config.config_file_name)
logger = logging.getLogger('alembic.env')


def get_engine():
    try:
        # this works with Flask-SQLAlchemy<3 and Alchemical
        return current_app.extensions['migrate'].db.get_engine()
    except (TypeError, AttributeError):
        # this works with Flask-SQLAlchemy>=3
        return current_app.extensions['migrate'].db.engine


def get_engine_url():
    try:
        return get_engine().url.render_as_string(hide_password=False).replace(
            '%', '%%')
    except AttributeError:
        return str(get_engine().url).replace('%', '%%')


# add your model's MetaData object here
# for 'autogenerate' support
# from myapp import mymodel
# target_metadata = mymodel.Base.metadata
config.set_main_option('sqlalchemy.url', get_engine_url())
target_db = current_app.extensions['migrate'].db

# other values from the config, defined by the needs of env.py,
# can be acquired:
# my_important_option = config.get_main_option("my_important_option")
# ... etc.


def get_metadata():
    if hasattr(target_db, 'metadatas'):
        return target_db.metadatas[None]
    return target_db.metadata


def run_migrations_offline():
    """Run migrations in 'offline' mode.

    This configures the context with just a URL
    and not an Engine, though an Engine is acceptable
    here as well.  By skipping the Engine creation
    we don't even need a DBAPI to be available.

    Calls to context.execute() here emit the given string to the
    script output.

    """
    url = config.get_main_option("sqlalchemy.url")
    context.configure(
        url=url, target_metadata=get_metadata(), literal_binds=True
    )

    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online():
    """Run migrations in 'online' mode.

    In this scenario we need to create an Engine
    and associate a connection with the context.

    """

    # this callback is used to prevent an auto-migration from being generated
    # when there are no changes to the schema
    # reference: http://alembic.zzzcomputing.com/en/latest/cookbook.html
    def process_revision_directives(context, revision, directives):
        if getattr(config.cmd_opts, 'autogenerate', False):
            script = directives[0]
            if script.upgrade_ops.is_empty():
                directives[:] = []
                logger.info('No changes in schema detected.')

    conf_args = current_app.extensions['migrate'].configure_args
    if conf_args.get("process_revision_directives") is None:
        conf_args["process_revision_directives"] = process_revision_directives

    connectable = get_engine()

    with connectable.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=get_metadata(),
            **conf_args
        )

        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
'''

FLASK_MIGRATE_SCRIPT_MAKO = '''\
"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}

"""
from alembic import op
import sqlalchemy as sa
${imports if imports else ""}

# revision identifiers, used by Alembic.
revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = ${repr(branch_labels)}
depends_on = ${repr(depends_on)}


def upgrade():
    ${upgrades if upgrades else "pass"}


def downgrade():
    ${downgrades if downgrades else "pass"}
'''


def custom_env_py(configure: str = "", preamble: str = "") -> str:
    """Flask-Migrate's env.py with extra ``context.configure`` keyword lines (e.g.
    ``"version_table='alembic_version_billing',"``) and module-level code before
    ``run_migrations_offline`` (e.g. an ``include_object`` function), as users write them."""
    # Through conf_args: Flask-Migrate passes its own compare_type / render_as_batch there,
    # and a second keyword of the same name would be a TypeError.
    extra = textwrap.indent("conf_args = {**conf_args, **dict(\n"
                            + textwrap.indent(textwrap.dedent(configure).strip(), "    ")
                            + "\n)}\n", " " * 4)
    text = FLASK_MIGRATE_ENV_PY.replace("    connectable = get_engine()\n",
                                        extra + "    connectable = get_engine()\n", 1)
    anchor = "def run_migrations_offline():"
    return text.replace(anchor, textwrap.dedent(preamble).strip() + "\n\n\n" + anchor, 1)


# -- running flask db on the host --------------------------------------------------------

def app_env(app: AppDir, venv: Path, database_url: str | None,
            extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A clean environment for running the app's CLI: venv on PATH, FLASK_APP=wsgi.py, the
    database URL in spec.database_env (omitted when None), no .pyc files written."""
    env = {
        "PATH": f"{venv}/bin:/usr/bin:/bin",
        "VIRTUAL_ENV": str(venv),
        "LANG": "C.UTF-8",
        "HOME": str(app.root),
        "FLASK_APP": "wsgi.py",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    if database_url is not None:
        env[app.spec.database_env] = database_url
    env.update(extra or {})
    return env


def run_in_app(app: AppDir, venv: Path, database_url: str | None, argv: Sequence[str],
               what: str, env: Mapping[str, str] | None = None, user: str | None = None,
               check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run argv in the app root with the app's environment (as user via setpriv if given)."""
    argv = list(argv)
    if user is not None:
        argv = as_user_argv(user, argv)
    proc = subprocess.run(argv, cwd=app.root, env=app_env(app, venv, database_url, env),
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise HarnessError(f"{what} exited {proc.returncode} in {app.root}:\n"
                           f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return proc


def flask_db(app: AppDir, venv: Path, database_url: str | None, *args: str,
             env: Mapping[str, str] | None = None, user: str | None = None,
             check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``<venv>/bin/flask db ARGS`` in the app root (as user via setpriv if given)."""
    return run_in_app(app, venv, database_url, [str(venv / "bin" / "flask"), "db", *args],
                      f"flask db {' '.join(args)}", env, user, check, timeout)


def db_upgrade(app: AppDir, venv: Path, database_url: str, revision: str = "head",
               **kw: Any) -> subprocess.CompletedProcess[str]:
    """``flask db upgrade REVISION`` (keyword arguments as for flask_db)."""
    return flask_db(app, venv, database_url, "upgrade", revision, **kw)


def db_downgrade(app: AppDir, venv: Path, database_url: str, revision: str = "-1",
                 **kw: Any) -> subprocess.CompletedProcess[str]:
    """``flask db downgrade REVISION`` (keyword arguments as for flask_db)."""
    return flask_db(app, venv, database_url, "downgrade", "--", revision, **kw)


@dataclass(frozen=True)
class DbCheck:
    """What ``flask db check`` said: clean, drift (its operations), or not up to date."""

    clean: bool
    not_up_to_date: bool
    # (op, table) per operation it printed, e.g. ("add_column", "posts"); tables unqualified
    ops: tuple[tuple[str, str], ...]
    output: str


_CHECK_OP = re.compile(
    r"\('(?P<op>add_table|remove_table|add_table_comment|remove_table_comment)', "
    r"Table\('(?P<t1>[^']*)'"
    r"|\('(?P<cop>add_column|remove_column|modify_[a-z_]+)', (?:None|'[^']*'), '(?P<t2>[^']*)'"
    r"|\('(?P<iop>add_index|remove_index)', "
    r"|\('(?P<kop>add_constraint|remove_constraint|add_fk|remove_fk)', ")


def flask_db_check(app: AppDir, venv: Path, database_url: str,
                   user: str | None = APP_USER, env: Mapping[str, str] | None = None,
                   ) -> DbCheck:
    """Run ``flask db check`` (Alembic's own check, through env.py) as user; parse its verdict."""
    proc = flask_db(app, venv, database_url, "check", user=user, check=False, env=env)
    out = proc.stdout + proc.stderr
    ops = []
    for m in _CHECK_OP.finditer(out):
        op = m.group("op") or m.group("cop") or m.group("iop") or m.group("kop")
        table = m.group("t1") or m.group("t2") or ""
        ops.append((op, table))
    clean = proc.returncode == 0 and "No new upgrade operations detected" in out
    not_up_to_date = "Target database is not up to date" in out
    if not clean and not not_up_to_date and not ops:
        raise HarnessError(f"flask db check gave no verdict (exit {proc.returncode}):\n{out}")
    return DbCheck(clean, not_up_to_date, tuple(sorted(ops)), out)


def check_ops(schema_diff: Sequence[Mapping[str, str]]) -> tuple[tuple[str, str], ...]:
    """The probe's schema_diff in flask_db_check's (op, unqualified table) form."""
    ops = []
    for d in schema_diff:
        kind = d["kind"]
        if kind in ("add_unique", "remove_unique"):
            kind = kind.replace("_unique", "_constraint")
        table = d["table"].rsplit(".", 1)[-1]
        ops.append((kind, "" if kind.endswith(("_constraint", "_fk", "_index")) else table))
    return tuple(sorted(ops))


def db_current(app: AppDir, venv: Path, database_url: str) -> list[str]:
    """Revision ids ``flask db current`` reports (sorted; [] for an empty database)."""
    out = flask_db(app, venv, database_url, "current").stdout
    return sorted(line.split()[0] for line in out.splitlines()
                  if line.strip() and not line.startswith(("INFO", "WARN")))


# -- systemd unit ------------------------------------------------------------------------

LAUNCHERS = ("script", "python-m", "sh-c", "sh-activate")


def gunicorn_unit(*, venv: Path, app_dir: Path | AppDir, port: int,
                  user: str | None = APP_USER, group: str | None = APP_USER,
                  workers: int = 2, app_spec: str = "wsgi:app",
                  launcher: str = "script", chdir: bool = False,
                  working_directory: Path | str | None | bool = True,
                  environment: Mapping[str, str] | None = None,
                  environment_files: Sequence[str] = (),
                  extra_args: Sequence[str] = (), service: str = "",
                  unit_type: str = "simple", restart: str | None = None,
                  description: str = "Gunicorn instance to serve the test app") -> str:
    """The text of a realistic gunicorn.service.

    launcher: ``script`` = <venv>/bin/gunicorn; ``python-m`` = <venv>/bin/python -m gunicorn;
    ``sh-c`` = /bin/sh -c 'exec <venv>/bin/gunicorn ...'; ``sh-activate`` = /bin/sh -c
    '. <venv>/bin/activate && exec gunicorn ...' (gunicorn found through PATH).
    chdir adds ``--chdir <app_dir>``; working_directory True = app_dir, False/None = no
    WorkingDirectory=, a path = that path. app_spec e.g. ``wsgi:app`` or
    ``app:create_app()``. environment_files entries may start with ``-``. service: extra
    raw lines for [Service]. restart: a Restart= value; none by default, so a broken app
    ends up ``failed`` instead of flapping between active and auto-restart.
    """
    root = app_dir.root if isinstance(app_dir, AppDir) else Path(app_dir)
    args = ["--workers", str(workers), "--bind", f"127.0.0.1:{port}"]
    if chdir:
        args += ["--chdir", str(root)]
    args += [*extra_args, app_spec]
    if launcher == "script":
        exec_start = _sh_join([f"{venv}/bin/gunicorn", *args])
    elif launcher == "python-m":
        exec_start = _sh_join([f"{venv}/bin/python", "-m", "gunicorn", *args])
    elif launcher == "sh-c":
        exec_start = _sh_c(_sh_join(["exec", f"{venv}/bin/gunicorn", *args]))
    elif launcher == "sh-activate":
        exec_start = _sh_c(f". {_sh_word(f'{venv}/bin/activate')} && "
                           + _sh_join(["exec", "gunicorn", *args]))
    else:
        raise ValueError(f"launcher must be one of {LAUNCHERS}")
    lines = ["[Unit]", f"Description={description}", "After=network.target", "",
             "[Service]", f"Type={unit_type}"]
    if user:
        lines.append(f"User={user}")
    if group:
        lines.append(f"Group={group}")
    if working_directory is True:
        lines.append(f"WorkingDirectory={root}")
    elif working_directory not in (None, False):
        lines.append(f"WorkingDirectory={working_directory}")
    for path in environment_files:
        lines.append(f"EnvironmentFile={path}")
    for key, value in (environment or {}).items():
        lines.append(f"Environment={systemd_quote(f'{key}={value}')}")
    lines.append(f"ExecStart={_systemd_escape_specifiers(exec_start)}")
    if restart:
        lines += [f"Restart={restart}", "RestartSec=1"]
    lines += ["KillMode=mixed", "TimeoutStopSec=5"]
    if service.strip():
        lines += service.strip().splitlines()
    lines += ["", "[Install]", "WantedBy=multi-user.target", ""]
    return "\n".join(lines)


def _sh_word(word: str) -> str:
    """Quote a shell word the way people write it: bare, else "double", else 'single'."""
    if word and re.fullmatch(r"[A-Za-z0-9_@%+=:,./-]+", word):
        return word
    if not re.search(r'["$`\\!]', word):
        return f'"{word}"'
    return shlex.quote(word)


def _sh_join(words: Sequence[str]) -> str:
    return " ".join(_sh_word(w) for w in words)


def _sh_c(command: str) -> str:
    """/bin/sh -c '<command>' as a unit file would spell it."""
    if "'" not in command:
        return f"/bin/sh -c '{command}'"
    return shlex.join(["/bin/sh", "-c", command])


def systemd_quote(word: str) -> str:
    """One systemd unit-file word (e.g. for Environment=): double-quoted, backslashes and
    quotes escaped, % doubled (specifiers). Environment= does not expand $."""
    escaped = word.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return f'"{escaped}"'


def _systemd_escape_specifiers(text: str) -> str:
    """ExecStart= expands %specifiers and $VARS: keep both literal."""
    return text.replace("%", "%%").replace("$", "$$")


def env_file_text(values: Mapping[str, str]) -> str:
    """An EnvironmentFile body: KEY="value" lines, quoted so systemd reads them back as-is."""
    out = []
    for key, value in values.items():
        quoted = value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$")
        out.append(f'{key}="{quoted}"')
    return "\n".join(out) + "\n"


# -- places for test apps ------------------------------------------------------------------

#: Test apps live here, not under /tmp: the sandbox mounts a fresh tmpfs on /tmp, and
#: pytest's tmp dirs sit inside root-only (0700) directories www-data cannot traverse.
APPS_ROOT = Path(os.environ.get("DRIFTWATCH_TEST_APPS_ROOT", "/var/lib/driftwatch-tests"))


def new_workspace(root: Path | None = None) -> Path:
    """A fresh, world-traversable (0755) directory under APPS_ROOT."""
    root = Path(root or APPS_ROOT)
    _mkdirs_world_readable(root)
    path = Path(tempfile.mkdtemp(prefix="ws-", dir=root))
    path.chmod(0o755)
    return path


def writable_dir(path: Path, user: str = APP_USER) -> Path:
    """Create path (0755 parents) owned by user, e.g. for record_identity_hook output."""
    _mkdirs_world_readable(path)
    pw = pwd.getpwnam(user)
    os.chown(path, pw.pw_uid, pw.pw_gid)
    path.chmod(0o755)
    return path


def import_app(app: AppDir, venv: Path, database_url: str | None,
               env: Mapping[str, str] | None = None, user: str | None = None,
               check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``<venv>/bin/python -c 'import wsgi'`` in the app root: runs create_app() and its hooks
    (as user via setpriv if given). With check=False, inspect returncode/stderr."""
    return run_in_app(app, venv, database_url, [str(venv / "bin" / "python"), "-c", "import wsgi"],
                      "import wsgi", env, user, check, timeout)


# -- talking to a running app --------------------------------------------------------------

def http_get(url: str, timeout: float = 30.0,
             describe: Callable[[], str] | None = None) -> tuple[int, str]:
    """GET url -> (status, body), retrying while nothing listens yet (a Type=simple gunicorn
    is "active" before it binds). HTTP errors are returned, not raised. On giving up raises
    HarnessError with describe() appended (e.g. the unit's status and journal)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except (urllib.error.URLError, ConnectionError) as exc:
            if time.monotonic() > deadline:
                detail = describe() if describe else ""
                raise HarnessError(f"{url} unreachable after {timeout}s: {exc}\n{detail}") \
                    from exc
            time.sleep(0.1)


def unit_diagnostics(sb: object, unit: str, lines: int = 60) -> str:
    """systemctl status + the journal tail of unit inside sandbox sb, for error messages."""
    status = sb.systemctl("status", unit, check=False).stdout  # type: ignore[attr-defined]
    journal = sb.run(["journalctl", "-u", unit, "-n", str(lines),  # type: ignore[attr-defined]
                      "--no-pager"], check=False).stdout
    return f"{status}\n{journal}"


def proc_status(sb: object, pid: int) -> dict[str, str]:
    """/proc/PID/status of a process inside sandbox sb (PID as the sandbox sees it)."""
    text = sb.path(f"/proc/{pid}/status").read_text()  # type: ignore[attr-defined]
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def gunicorn_pids(sb: object, unit: str, workers: int = 2,
                  timeout: float = 20.0) -> tuple[int, list[int]]:
    """(master PID, worker PIDs) of a gunicorn unit in sandbox sb, waiting until the master
    has ``workers`` children. The master is MainPID unless the unit runs it under a shell
    that does not exec; then pass the right PID yourself."""
    master = sb.main_pid(unit)  # type: ignore[attr-defined]
    children = sb.path(f"/proc/{master}/task/{master}/children")  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout
    while True:
        kids = [int(p) for p in children.read_text().split()]
        if len(kids) >= workers or time.monotonic() > deadline:
            return master, kids
        time.sleep(0.05)


# -- the tricky-types app (drift comparisons beyond plain columns) ---------------------------

#: Models with the types and constraints autogenerate is most often wrong about: a native
#: enum, JSON and JSONB, timezone-aware and naive timestamps, numerics and floats, server
#: defaults (literal, function, boolean, a sequence it does not own), a composite unique
#: constraint, cascading foreign keys, and a mixed-case table whose SERIAL sequence needs
#: quoting. Used with standard revisions r1..r3 plus TRICKY_REVISION.
TRICKY_MODELS = render_models(3) + '''

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql


class Article(db.Model):
    __tablename__ = "articles"
    __table_args__ = (db.UniqueConstraint("author_id", "slug", name="uq_articles_author_slug"),)

    id = db.Column(db.Integer, primary_key=True)
    author_id = db.Column(db.Integer, db.ForeignKey("users.id", ondelete="CASCADE",
                                                    onupdate="CASCADE"), nullable=False)
    slug = db.Column(db.String(120), nullable=False)
    status = db.Column(db.Enum("draft", "published", name="article_status"),
                       nullable=False, server_default="draft")
    meta = db.Column(db.JSON)
    attrs = db.Column(postgresql.JSONB, server_default=sa.text("'{}'::jsonb"))
    published_at = db.Column(db.DateTime(timezone=True), server_default=sa.text("now()"))
    edited_at = db.Column(db.DateTime)
    price = db.Column(db.Numeric(10, 2), server_default="0")
    score = db.Column(db.Float)
    pinned = db.Column(db.Boolean, nullable=False, server_default=sa.false())
    number = db.Column(db.BigInteger, server_default=sa.text("nextval('article_numbers')"))


class Tag(db.Model):
    __tablename__ = "Tag Names"

    id = db.Column(db.Integer, primary_key=True)
    article_id = db.Column(db.Integer, db.ForeignKey("articles.id", ondelete="SET NULL"))
    label = db.Column(db.String(40), nullable=False, index=True)
'''

TRICKY_REVISION = Revision(
    "r4", "r3", message="tricky types",
    upgrade="""\
from sqlalchemy.dialects import postgresql
op.execute("CREATE SEQUENCE article_numbers")
op.create_table('articles',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('author_id', sa.Integer(), nullable=False),
    sa.Column('slug', sa.String(length=120), nullable=False),
    sa.Column('status', sa.Enum('draft', 'published', name='article_status'),
              server_default='draft', nullable=False),
    sa.Column('meta', sa.JSON(), nullable=True),
    sa.Column('attrs', postgresql.JSONB(astext_type=sa.Text()),
              server_default=sa.text("'{}'::jsonb"), nullable=True),
    sa.Column('published_at', sa.DateTime(timezone=True), server_default=sa.text('now()'),
              nullable=True),
    sa.Column('edited_at', sa.DateTime(), nullable=True),
    sa.Column('price', sa.Numeric(precision=10, scale=2), server_default='0', nullable=True),
    sa.Column('score', sa.Float(), nullable=True),
    sa.Column('pinned', sa.Boolean(), server_default=sa.false(), nullable=False),
    sa.Column('number', sa.BigInteger(), server_default=sa.text("nextval('article_numbers')"),
              nullable=True),
    sa.ForeignKeyConstraint(['author_id'], ['users.id'], onupdate='CASCADE',
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('author_id', 'slug', name='uq_articles_author_slug')
)
op.create_table('Tag Names',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('article_id', sa.Integer(), nullable=True),
    sa.Column('label', sa.String(length=40), nullable=False),
    sa.ForeignKeyConstraint(['article_id'], ['articles.id'], ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id')
)
op.create_index(op.f('ix_Tag Names_label'), 'Tag Names', ['label'], unique=False)""",
    downgrade="""\
op.drop_table('Tag Names')
op.drop_table('articles')
op.execute("DROP TYPE article_status")
op.execute("DROP SEQUENCE article_numbers")""")


def tricky_spec(env_py: str | None = None) -> AppSpec:
    """The tricky-types app at head (r1..r3 + r4), with env.py as given (None: Flask-Migrate's)."""
    return AppSpec(models_source=TRICKY_MODELS,
                   revisions=(*standard_revisions(3), TRICKY_REVISION), env_py=env_py)
