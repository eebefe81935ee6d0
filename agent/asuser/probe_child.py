"""The probe child: runs INSIDE the app's own interpreter, loads the app, reports JSON on a pipe.

Stdlib only at module level: this file is run as ``python -B -c SOURCE FD`` with the request
JSON in the environment variable REQUEST_ENV (popped at once; argv is world-readable, and the
request holds the gunicorn arguments), with the app's venv python, whose SQLAlchemy
(1.4/2.0/2.1), Alembic, Flask and gunicorn are the app's own.
Nothing from driftwatch or the agent's venv may be imported here. The app's packages are
imported lazily, inside functions, after the runner has already dropped privileges.

Protocol: exactly one JSON object written to the inherited file descriptor FD, then
``os._exit``. Whatever the app prints goes to stdout/stderr, never to FD.

With ``"resolve_only": true`` in the request, the child only resolves gunicorn's configuration
(config file, GUNICORN_CMD_ARGS, command line) and reports chdir, pythonpath and raw_env
(values included, for the agent's memory only); it never imports the app.
"""

import ast
import gc
import hashlib
import json
import os
import sys
import time
import traceback

PROTOCOL = 1
# The environment variable the runner passes the request in (removed before the app runs).
REQUEST_ENV = "DRIFTWATCH_PROBE_REQUEST"
# How much of one error message goes into the report (one line, already short).
MAX_MESSAGE = 500
# Bound on migration files read, so a huge versions/ directory cannot stall the probe.
MAX_REVISIONS = 5000
# The cyclic collector's first threshold while the probe runs (CPython's default: 700).
# Loading 1,000 models allocates millions of objects that all stay alive; at 700 the
# collector walks them again and again (a fifth of the import's CPU). The probe is short
# and memory-capped (MemoryMax), so collecting every 100,000 allocations is enough.
GC_THRESHOLD = 100000


def one_line(exc):
    """'KeyError: 'DATABASE_URL'' style text: type name and the first line of the message."""
    # SyntaxError's str() repeats "(file, line N)"; where() names the full path instead.
    text = exc.msg if isinstance(exc, SyntaxError) and exc.msg else str(exc)
    # SQLAlchemy appends "[SQL: ...]" and "(Background on this error at: ...)" lines.
    first = text.strip().splitlines()[0] if text.strip() else ""
    if first.startswith("(") and ") " in first:
        # "(psycopg2.errors.ReadOnlySqlTransaction) cannot execute ..." -> keep the DBAPI name
        inner, _, rest = first[1:].partition(") ")
        return "%s: %s" % (inner.rsplit(".", 1)[-1], rest)[:MAX_MESSAGE]
    name = type(exc).__name__
    return ("%s: %s" % (name, first) if first else name)[:MAX_MESSAGE]


def where(exc, roots):
    """' (at path line N)' for the innermost traceback frame under one of roots, else ''."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return " (at %s line %s)" % (exc.filename, exc.lineno)
    found = ""
    # The app's venv often lives inside the app directory: its frames are not the app's.
    skip = tuple(p.rstrip("/") + "/" for p in (sys.prefix, sys.base_prefix))
    for frame in traceback.extract_tb(exc.__traceback__):
        filename = frame.filename  # '<frozen os>' and the like are not files
        if not filename.startswith("/") or filename.startswith(skip) or \
                "/site-packages/" in filename:
            continue
        if any(filename.startswith(root.rstrip("/") + "/") for root in roots if root):
            found = " (at %s line %s)" % (filename, frame.lineno)
    return found


def versions():
    """Versions of the app's interpreter and database libraries, without importing them."""
    out = {"python": "%d.%d.%d" % sys.version_info[:3]}
    try:
        from importlib import metadata
    except ImportError:  # Python < 3.8
        return out
    for key, dist in (("sqlalchemy", "SQLAlchemy"), ("alembic", "alembic"),
                      ("flask", "Flask"), ("flask_sqlalchemy", "Flask-SQLAlchemy"),
                      ("flask_migrate", "Flask-Migrate"), ("gunicorn", "gunicorn")):
        try:
            out[key] = metadata.version(dist)
        except Exception:
            out[key] = None
    return out


# -- loading the app the way gunicorn / flask do ---------------------------------------------

def _literal_call(expr):
    """gunicorn's rule: 'name' or 'name(literal args)' -> (name, args, kwargs, is_call)."""
    try:
        node = ast.parse(expr.strip(), mode="eval").body
    except SyntaxError:
        raise ValueError("failed to parse %r as an attribute name or function call" % expr)
    if isinstance(node, ast.Name):
        return node.id, (), {}, False
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        args = tuple(ast.literal_eval(a) for a in node.args)
        kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
        return node.func.id, args, kwargs, True
    raise ValueError("failed to parse %r as an attribute name or function call" % expr)


def load_gunicorn(spec):
    """Import 'module:expr' like gunicorn.util.import_app (default variable 'application')."""
    import importlib
    module_name, _, expr = spec.partition(":")
    expr = expr or "application"
    module = importlib.import_module(module_name)
    name, args, kwargs, is_call = _literal_call(expr)
    if not hasattr(module, name):
        raise AttributeError("module %r has no attribute %r (gunicorn app %r)"
                             % (module_name, name, spec))
    app = getattr(module, name)
    if is_call:
        app = app(*args, **kwargs)
    if app is None:
        raise ValueError("%r returned None (gunicorn app %r)" % (expr, spec))
    return app


def _module_from_path(value):
    """FLASK_APP 'path/to/wsgi.py' -> module name, with its directory put on sys.path."""
    path = os.path.realpath(value)
    base, ext = os.path.splitext(path)
    if ext == ".py":
        path = base
    if os.path.basename(path) == "__init__":
        path = os.path.dirname(path)
    parts = []
    while True:  # walk up through packages, like flask.cli.prepare_import
        path, name = os.path.split(path)
        parts.append(name)
        if not os.path.exists(os.path.join(path, "__init__.py")):
            break
    if sys.path[0] != path:
        sys.path.insert(0, path)
    return ".".join(reversed(parts))


def _is_flask(obj):
    return hasattr(obj, "extensions") and hasattr(obj, "app_context") and hasattr(obj, "config")


def load_flask_app_env(value):
    """Find the app like `flask` does from FLASK_APP (module, module:name, factory, file)."""
    import importlib
    target, _, expr = value.partition(":")
    if target.endswith(".py") or "/" in target:
        target = _module_from_path(target)
    module = importlib.import_module(target)
    if expr:
        name, args, kwargs, is_call = _literal_call(expr)
        obj = getattr(module, name)
        return obj(*args, **kwargs) if is_call else obj
    for name in ("app", "application"):
        if _is_flask(getattr(module, name, None)):
            return getattr(module, name)
    found = [v for v in vars(module).values() if _is_flask(v)]
    if len(found) == 1:
        return found[0]
    for name in ("create_app", "make_app"):
        factory = getattr(module, name, None)
        if callable(factory):
            return factory()
    raise LookupError("no Flask app or factory found in module %r (FLASK_APP=%r)"
                      % (target, value))


def unwrap_flask(obj):
    """The Flask app behind WSGI middleware (ProxyFix(app), app.wsgi_app wrappers...)."""
    seen = 0
    while obj is not None and not _is_flask(obj) and seen < 8:
        seen += 1
        obj = next((getattr(obj, a) for a in ("app", "application", "wsgi_app", "__self__")
                    if getattr(obj, a, None) is not None), None)
    if not _is_flask(obj):
        raise TypeError("the WSGI app is not a Flask app (or is wrapped beyond recognition)")
    return obj


def plain_alembic():
    """True when the working directory holds a plain Alembic project (alembic.ini)."""
    return os.path.exists("alembic.ini")


def unwrap(obj):
    """The Flask app behind obj; or obj itself, unchanged, for a plain Alembic project (a
    FastAPI/Starlette app, any ASGI/WSGI callable: its database is env.py's business)."""
    try:
        return unwrap_flask(obj)
    except TypeError:
        if plain_alembic():
            return obj
        raise


def load_app(request, gunicorn_app=None):
    """(flask app, how it was found, app URI) the way the unit's gunicorn finds it.

    With gunicorn's own resolved configuration (gunicorn_app), its app URI (positional
    argument or wsgi_app) is loaded by gunicorn itself; else the ExecStart spec; else
    FLASK_APP; else flask's wsgi.py / app fallbacks.
    """
    if gunicorn_app is not None and gunicorn_app.app_uri:
        uri = gunicorn_app.app_uri
        return unwrap(gunicorn_app.wsgi()), "gunicorn " + uri, uri
    spec = "" if gunicorn_app is not None else request.get("app_spec") or ""
    if spec:
        return unwrap(load_gunicorn(spec)), "gunicorn " + spec, spec
    flask_app = os.environ.get("FLASK_APP", "")
    if flask_app:
        return unwrap_flask(load_flask_app_env(flask_app)), "FLASK_APP=" + flask_app, \
            flask_app
    for candidate in ("wsgi", "app"):  # flask's own fallbacks
        if os.path.exists(candidate + ".py") or os.path.isdir(candidate):
            return unwrap_flask(load_flask_app_env(candidate)), "default " + candidate, \
                candidate
    raise LookupError("no gunicorn app spec, no FLASK_APP, and no wsgi.py or app/ in %s"
                      % os.getcwd())


# -- gunicorn's own configuration ------------------------------------------------------------

class ProbeError(Exception):
    """A failure with its error kind, reported as is."""

    def __init__(self, kind, message):
        Exception.__init__(self, message)
        self.kind = kind


class _Tee(object):
    """A stderr that also keeps what was written (gunicorn prints its errors, then exits)."""

    def __init__(self, stream):
        self.stream, self.parts = stream, []

    def write(self, text):
        self.parts.append(text)
        return self.stream.write(text)

    def flush(self):
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def gunicorn_importable():
    """True when the app's interpreter can import gunicorn's WSGI application."""
    try:
        import gunicorn.app.wsgiapp  # noqa: F401
    except Exception:
        return False
    return True


def gunicorn_configure(args, report):
    """gunicorn's own WSGIApplication for args, configured like the real one, not run.

    gunicorn's order (gunicorn/app/base.py Application.load_config): defaults, chdir, the
    config file (-c, else -c in GUNICORN_CMD_ARGS, else ./gunicorn.conf.py), then
    GUNICORN_CMD_ARGS, then the command line, chdir again (os.chdir + sys.path). Then, as
    Application.run and Arbiter.setup do before any app is loaded: pythonpath into sys.path,
    raw_env into os.environ. No Arbiter is made and no socket is bound.
    """
    from gunicorn.app.base import Application
    from gunicorn.app.wsgiapp import WSGIApplication
    state = {"config": "", "config_done": False}

    class ProbeApplication(WSGIApplication):
        def load_config_from_module_name_or_filename(self, location):
            state["config"] = location[len("file:"):] if location.startswith("file:") \
                else location
            result = WSGIApplication.load_config_from_module_name_or_filename(self, location)
            state["config_done"] = True
            return result

        def load_config(self):
            # WSGIApplication.load_config without its "No application module specified"
            # exit: such a unit cannot serve, but FLASK_APP may still name the app.
            Application.load_config(self)
            if self.app_uri is None and "wsgi_app" in self.cfg.settings:
                self.app_uri = self.cfg.settings["wsgi_app"].get()

    saved_argv, saved_stderr = sys.argv, sys.stderr
    tee = _Tee(sys.stderr)
    sys.argv, sys.stderr = ["gunicorn"] + list(args), tee
    try:
        app = ProbeApplication("%(prog)s [OPTIONS] [APP_MODULE]", prog="gunicorn")
    except BaseException as exc:  # gunicorn prints its error and calls sys.exit
        raise ProbeError("app_load", gunicorn_failure(exc, state, "".join(tee.parts)))
    finally:
        sys.argv, sys.stderr = saved_argv, saved_stderr
    report["gunicorn_config"] = os.path.abspath(state["config"]) if state["config"] and \
        not state["config"].startswith("python:") else state["config"]
    cfg = app.cfg
    try:
        # Application.run: pythonpath entries, relative to the final chdir, first on sys.path.
        pythonpath = cfg.pythonpath if "pythonpath" in cfg.settings else None
        paths = [os.path.abspath(p) for p in pythonpath.split(",")] if pythonpath else []
        for path in paths:
            if path not in sys.path:
                sys.path.insert(0, path)
        env = cfg.env  # Arbiter.setup: raw_env into os.environ, before workers load the app
    except Exception as exc:
        raise ProbeError("app_load", "gunicorn's configuration failed: " + one_line(exc))
    os.environ.update(env)
    try:
        from gunicorn import SERVER_SOFTWARE
        os.environ["SERVER_SOFTWARE"] = SERVER_SOFTWARE  # Arbiter.__init__ sets it too
    except ImportError:
        pass
    report["config_source"] = "gunicorn config"
    report["chdir"] = cfg.chdir
    report["app_uri"] = app.app_uri or ""
    report["pythonpath"] = paths
    report["raw_env_names"] = sorted(env)
    # Values go to the agent only so it can mask them in messages; it never reports them.
    report["raw_env"] = dict(env)
    return app


def gunicorn_failure(exc, state, stderr):
    """One line for a failed gunicorn configuration: the config file and its exception."""
    cause = exc
    if isinstance(exc, SystemExit) and exc.__context__ is not None:
        cause = exc.__context__  # sys.exit(1) inside "except Exception:" keeps the error
    if state["config"] and not state["config_done"]:
        what = "gunicorn config %s failed: " % state["config"]
        roots = [os.path.dirname(os.path.abspath(state["config"]))]
    else:
        what = "gunicorn's configuration failed: "
        roots = [os.getcwd()]
    if isinstance(cause, SystemExit):  # argparse: "gunicorn: error: unrecognized ..."
        lines = [line.strip() for line in stderr.splitlines() if line.strip()]
        return what + (lines[-1][:MAX_MESSAGE] if lines else "exit status %s" % cause.code)
    return what + one_line(cause) + where(cause, roots)


def start_in(directory, report):
    """chdir like systemd's WorkingDirectory= does for the unit's user, or a clear error."""
    try:
        os.chdir(directory)
    except OSError as exc:
        report["error_kind"] = "privileges"
        report["error"] = "uid %d cannot enter the working directory %s: %s" % (
            os.getuid(), directory, exc.strerror)
        raise


def prepare(request, report):
    """Enter the unit's context; gunicorn's own WSGIApplication when it can be used, else None.

    Without gunicorn (FLASK_APP-only units, a system gunicorn the app's python cannot
    import), the ExecStart analysis stands: its --chdir and -e values.
    """
    start = request.get("start_dir") or request.get("cwd")
    if start:  # again after the drop: fails like systemd's 200/CHDIR
        start_in(start, report)
    args = request.get("gunicorn_args")
    if sys.path and sys.path[0] in ("", "."):
        del sys.path[0]  # "python -c" put the cwd first; gunicorn puts its chdir there
    if args is not None and gunicorn_importable():
        return gunicorn_configure(args, report)
    report["config_source"] = "ExecStart"
    if request.get("cwd") and request["cwd"] != start:
        start_in(request["cwd"], report)
    # gunicorn puts its --chdir (default: cwd) first on sys.path.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for assignment in request.get("gunicorn_env") or ():  # gunicorn -e, applied like raw_env
        name, sep, value = assignment.partition("=")
        if name and sep:
            os.environ[name] = value
    uvicorn_setup(request, report)
    report["chdir"] = os.getcwd()
    return None


def uvicorn_setup(request, report):
    """What uvicorn run directly does before importing the app: --app-dir first on
    sys.path, --env-file loaded with python-dotenv (variables already set win)."""
    for path in reversed(request.get("pythonpath") or ()):
        if path not in sys.path:
            sys.path.insert(0, path)
    if request.get("pythonpath"):
        report["pythonpath"] = list(request["pythonpath"])
    env_file = request.get("env_file") or ""
    if not env_file:
        return
    try:
        from dotenv import load_dotenv
    except ImportError:
        raise ProbeError("app_load", "uvicorn --env-file %s needs python-dotenv, which the "
                                     "app's interpreter cannot import" % env_file)
    load_dotenv(dotenv_path=env_file)


# -- what the app knows -----------------------------------------------------------------------

def render_url(url):
    """The full URL string (password included) for SQLAlchemy 1.3 .. 2.1 URL objects."""
    render = getattr(url, "render_as_string", None)
    return render(hide_password=False) if render else str(url)


def absolute_sqlite(url):
    """A SQLite file URL with a relative path made absolute against the working directory,
    as sqlite3 resolves it in the app (Flask-SQLAlchemy 3 already made it absolute under the
    instance folder); any other URL unchanged."""
    scheme, sep, rest = url.partition(":///")
    if not sep or scheme.split("+", 1)[0] != "sqlite" or not rest or rest.startswith("/") \
            or rest.split("?", 1)[0] in ("", ":memory:"):
        return url
    path, qmark, query = rest.partition("?")
    return "%s:///%s%s%s" % (scheme, os.path.abspath(path), qmark, query)


def engines(app):
    """{bind key or None: engine} from Flask-SQLAlchemy 3.x (db.engines) or 2.x (get_engine)."""
    ext = app.extensions.get("sqlalchemy")
    if ext is None:
        return {}, None
    db = getattr(ext, "db", ext)  # 2.x stores a _SQLAlchemyState holding .db
    found = {}
    if hasattr(db, "engines"):
        found = dict(db.engines)
    else:
        binds = [None] + list((app.config.get("SQLALCHEMY_BINDS") or {}).keys())
        for key in binds:
            found[key] = db.get_engine(app, bind=key)
    return found, db


def metadata_for(db, key):
    """The models' MetaData for one bind, and a filter for 2.x's single shared MetaData."""
    metadatas = getattr(db, "metadatas", None)
    if metadatas is not None:
        return metadatas.get(key), None
    metadata = db.metadata

    def include_object(obj, name, type_, reflected, compare_to):
        # Flask-SQLAlchemy 2.x keeps every bind's tables in one MetaData, tagged in info.
        if type_ == "table" and not reflected:
            return obj.info.get("bind_key") == key
        return True
    return metadata, include_object


def migrations_config(app, report):
    """Alembic Config the way Flask-Migrate builds it, or from ./alembic.ini; None if none."""
    from alembic.config import Config
    extensions = getattr(app, "extensions", None)   # a FastAPI app has none
    ext = extensions.get("migrate") if isinstance(extensions, dict) else None
    if ext is not None:
        directory = os.path.abspath(str(getattr(ext, "directory", "migrations")))
        report["migrations_dir"] = directory
        migrate = getattr(ext, "migrate", None)
        if migrate is not None and hasattr(migrate, "get_config"):
            config = migrate.get_config(directory)
        else:
            config = Config(os.path.join(directory, "alembic.ini"))
            config.set_main_option("script_location", directory)
        return config, dict(getattr(ext, "configure_args", {}) or {})
    if os.path.exists("alembic.ini"):
        config = Config(os.path.abspath("alembic.ini"))
        return config, {}
    return None, {}


def file_sha256(path):
    """sha256 hex of a file's bytes ('' when unreadable)."""
    try:
        with open(path, "rb") as fh:
            return hashlib.sha256(fh.read()).hexdigest()
    except OSError:
        return ""


def as_list(value):
    """Alembic's str / tuple / set / None revision fields -> sorted-stable list of str."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return sorted(str(v) for v in value) if isinstance(value, (set, frozenset)) else \
        [str(v) for v in value]


# Backends without transactional DDL, where a failed revision leaves its first objects
# behind: the probe records what each revision's upgrade() does (agent/checks/half_applied.py).
RECORD_OPS_BACKENDS = ("mysql", "mariadb")
MAX_OPS = 200


def _op_entry(operation):
    """One recorded Alembic operation -> [kind, table, name] (plain text, bounded)."""
    kind = type(operation).__name__
    table = getattr(operation, "table_name", None) or ""
    if kind == "CreateTableOp":
        return ["create_table", table, ""]
    if kind == "DropTableOp":
        return ["drop_table", table, ""]
    if kind == "AddColumnOp":
        return ["add_column", table, getattr(operation.column, "name", "") or ""]
    if kind == "DropColumnOp":
        return ["drop_column", table, operation.column_name]
    if kind == "CreateIndexOp":
        return ["create_index", table, operation.index_name or ""]
    if kind == "DropIndexOp":
        return ["drop_index", table, operation.index_name or ""]
    if kind == "RenameTableOp":
        return ["rename_table", table, operation.new_table_name]
    if kind == "AlterColumnOp" and getattr(operation, "modify_name", None):
        return ["rename_column", table, "%s>%s" % (operation.column_name,
                                                   operation.modify_name)]
    return ["other", table, kind]


def revision_ops(script, dialect_name):
    """What script's upgrade() asks Alembic to do, recorded without running any of it
    (an Operations whose invoke() only records), or None when it cannot be told (the
    upgrade needs a live connection, or fails)."""
    import io
    from alembic.operations import Operations
    from alembic.runtime.migration import MigrationContext
    recorded = []
    context = MigrationContext.configure(
        dialect_name=dialect_name, opts={"as_sql": True, "output_buffer": io.StringIO()})
    # Alembic's proxies (alembic.op) are set up per class: a plain Operations whose
    # invoke() only records; every op.* builds its operation and hands it to invoke().
    recorder = Operations(context)
    recorder.invoke = recorded.append
    recorder._install_proxy()
    try:
        script.module.upgrade()
    except Exception:
        return None
    finally:
        recorder._remove_proxy()
    return [[str(v)[:MAX_NAME] for v in _op_entry(o)] for o in recorded[:MAX_OPS]]


def _backend_of(report):
    url = str((report.get("urls") or {}).get("default") or "")
    return url.split("://", 1)[0].split("+", 1)[0] if "://" in url else ""


def read_revisions(config, report):
    """Fill revisions and heads from the ScriptDirectory; errors name the file and line."""
    from alembic.script import ScriptDirectory
    script_dir = ScriptDirectory.from_config(config)
    report["script_location"] = script_dir.dir
    # Alembic lists an unreadable versions directory as empty (no revisions, no error), and a
    # false "unknown revision" would follow: listing it here raises instead.
    for location in getattr(script_dir, "_version_locations", None) or [script_dir.versions]:
        if os.path.isdir(location):
            os.listdir(location)
    revisions = []
    backend = _backend_of(report)
    for script in _scripts(script_dir):
        revisions.append({
            "revision": script.revision,
            "down_revisions": as_list(script.down_revision),
            "branch_labels": as_list(script.branch_labels),
            "depends_on": as_list(getattr(script, "dependencies", None)),
            "path": script.path,
            "sha256": file_sha256(script.path),
            "doc": (script.doc or "").strip().splitlines()[0][:200] if script.doc else "",
        })
        if backend in RECORD_OPS_BACKENDS:
            revisions[-1]["ops"] = revision_ops(script, "mysql")
        if len(revisions) >= MAX_REVISIONS:
            break
    report["revisions"] = revisions
    try:
        report["heads"] = sorted(script_dir.get_heads())
    except Exception:  # a cycle: the agent's own graph check names it
        report["heads"] = []


def revisions_without_app(report):
    """A stand-in user (unit without User=) could not load the app: the revision graph from
    the migration files alone, where Flask-Migrate (./migrations) or Alembic (./alembic.ini)
    keeps them by default, read as that same user; nothing of the app is imported."""
    from alembic.config import Config
    try:
        if os.path.isfile(os.path.join("migrations", "env.py")):
            directory = os.path.abspath("migrations")
            config = Config(os.path.join(directory, "alembic.ini"))
            config.set_main_option("script_location", directory)
        elif os.path.isfile("alembic.ini"):
            config = Config(os.path.abspath("alembic.ini"))
            directory = os.path.abspath(config.get_main_option("script_location")
                                        or "migrations")
        else:
            report["revisions_error"] = "no migrations directory found without loading " \
                "the app (looked for ./migrations/env.py and ./alembic.ini in " + \
                os.getcwd() + ")"
            return
        report["migrations_dir"] = directory
        read_revisions(config, report)   # it refuses an unreadable versions directory
        report["revisions_source"] = "files"
    except BaseException as exc:
        report["revisions"], report["heads"] = [], []
        report["revisions_error"] = "the migration scripts could not be read without the " \
            "app: " + one_line(exc)


def _scripts(script_dir):
    """Every revision script, duplicates and cycles included: Alembic's walk keeps one of two
    scripts with the same id (or fails with an unrelated message) and refuses a cycle, which
    would leave an empty graph and a false "unknown revision"; the raw listing keeps them
    for the agent's graph check (migration_graph_invalid)."""
    load = getattr(script_dir, "_load_revisions", None)
    raw = list(load()) if load is not None else None
    if raw is not None and hasattr(script_dir, "revision_map"):
        # Alembic's graph built from this same listing: each file is loaded once, not again
        # by the revision map (a second import of every migration file).
        try:
            script_dir.revision_map = type(script_dir.revision_map)(lambda: iter(raw))
        except Exception:
            pass
    try:
        walked = list(script_dir.walk_revisions())
    except Exception:
        if raw is None:
            raise
        return raw
    if raw is not None and len(raw) != len(walked):
        return raw
    return walked


# -- schema drift ----------------------------------------------------------------------------

def _type_text(type_):
    try:
        return str(type_)
    except Exception:
        return repr(type_)


def _cols(names):
    return ", ".join(str(n) for n in names)


def _qualify(schema, name):
    """'schema.table' for a table outside the default schema, else the bare name."""
    return "%s.%s" % (schema, name) if schema else str(name)


def _default_text(value):
    """A server default as SQL text ('0', now(), none), never an object's repr (whose
    address would differ from run to run)."""
    arg = getattr(value, "arg", value)  # DefaultClause(arg)
    if arg is None or arg is False:
        return "none"
    if isinstance(arg, str):
        return "'%s'" % arg.replace("'", "''")  # a string default is a SQL literal
    text = getattr(arg, "text", None)  # text("now()")
    if isinstance(text, str):
        return text
    try:
        return str(arg)
    except Exception:
        return type(arg).__name__


def describe_diff(item):
    """One compare_metadata entry -> {kind, table, name, detail}."""
    if isinstance(item, list):  # modify_* ops come grouped per column
        return [d for sub in item for d in describe_diff(sub)]
    op = item[0]
    if op in ("add_table", "remove_table"):
        table = item[1]
        name = _qualify(table.schema, table.name)
        return [{"kind": op, "table": name, "name": name,
                 "detail": _cols(c.name for c in table.columns)}]
    if op in ("add_column", "remove_column"):
        column = item[3]
        return [{"kind": op, "table": _qualify(item[1], item[2]), "name": column.name,
                 "detail": "%s %s" % (_type_text(column.type),
                                      "NULL" if column.nullable else "NOT NULL")}]
    if op in ("add_index", "remove_index"):
        index = item[1]
        return [{"kind": op, "table": _qualify(index.table.schema, index.table.name)
                 if index.table is not None else "",
                 "name": index.name or "", "detail": ("UNIQUE " if index.unique else "") +
                 "(%s)" % _cols(getattr(c, "name", c) for c in index.expressions)}]
    if op in ("add_constraint", "remove_constraint", "add_fk", "remove_fk"):
        const = item[1]
        kind_of = type(const).__name__
        verb = op.split("_", 1)[0]
        table = _qualify(const.table.schema, const.table.name) \
            if getattr(const, "table", None) is not None else ""
        if kind_of == "ForeignKeyConstraint":
            detail = "(%s) -> %s(%s)" % (_cols(const.column_keys), const.referred_table.name,
                                         _cols(e.column.name for e in const.elements))
            kind = verb + "_fk"
        elif kind_of == "UniqueConstraint":
            detail = "(%s)" % _cols(c.name for c in const.columns)
            kind = verb + "_unique"
        else:
            detail, kind = kind_of, op
        return [{"kind": kind, "table": table, "name": const.name or "", "detail": detail}]
    if op in ("add_table_comment", "remove_table_comment"):
        # (op, table with the models' comment[, the database's comment])
        table = item[1]
        name = _qualify(table.schema, table.name)
        return [{"kind": op, "table": name, "name": name,
                 "detail": "database %s, models %s" % (item[2] if len(item) > 2 else None,
                                                       table.comment)
                 if op == "add_table_comment" else "models have no comment"}]
    if op.startswith("modify_"):
        # (op, schema, table, column, existing_kw, old (database), new (models))
        _, schema, table, column, _, old, new = item[:7]
        table = _qualify(schema, table)
        if op == "modify_type":
            old, new = _type_text(old), _type_text(new)
        elif op == "modify_nullable":
            old = "NULL" if old else "NOT NULL"
            new = "NULL" if new else "NOT NULL"
        elif op == "modify_default":
            old, new = _default_text(old), _default_text(new)
        return [{"kind": op, "table": table, "name": column,
                 "detail": "database %s, models %s" % (old, new)}]
    name = getattr(item[1], "name", "") if len(item) > 1 else ""
    return [{"kind": str(op), "table": "", "name": str(name or ""), "detail": repr(item)[:200]}]


def safe_describe(item):
    """describe_diff, degrading to a raw entry for shapes a future Alembic may add."""
    try:
        return describe_diff(item)
    except Exception:
        op = item[0] if isinstance(item, tuple) and item else "unknown"
        return [{"kind": str(op), "table": "", "name": "", "detail": repr(item)[:200]}]


def compare_bind(engine, metadata, include_object, configure_args):
    """compare_metadata for one engine without a migration environment (no env.py to run)."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    opts = {"compare_type": True}
    for key in ("compare_type", "compare_server_default", "include_schemas",
                "include_object", "include_name", "version_table", "version_table_schema",
                "render_as_batch"):
        if key in configure_args:
            opts[key] = configure_args[key]
    if include_object is not None:
        user_filter = opts.get("include_object")

        def both(*args):
            return include_object(*args) and (user_filter is None or user_filter(*args))
        opts["include_object"] = both
    connection = engine.connect()
    try:
        context = MigrationContext.configure(connection, opts=opts)
        return [d for item in compare_metadata(context, metadata) for d in safe_describe(item)]
    finally:
        try:
            connection.rollback() if hasattr(connection, "rollback") else None
        finally:
            connection.close()


# -- the app's own migration environment (env.py), the way `alembic check` runs it -----------

# context.configure options whose presence changes what is compared or where the version is.
ENV_OPTIONS = ("include_object", "include_name", "include_schemas", "compare_type",
               "compare_server_default", "render_as_batch", "version_table",
               "version_table_schema", "process_revision_directives")
MAX_NAME = 128


class EnvPyError(Exception):
    """env.py could not be run to the point of comparing (its own error, described)."""


def _option_text(value):
    """How an env.py option is reported: a callable by its name, else a short repr."""
    if callable(value):
        return "callable %s" % getattr(value, "__qualname__", type(value).__name__)
    return repr(value)[:MAX_NAME]


def _bind_of(context, found):
    """The Flask-SQLAlchemy bind key whose engine env.py connected with (None: default)."""
    conn = getattr(context, "connection", None)
    engine = getattr(conn, "engine", None)
    if engine is None:
        return None
    url = render_url(engine.url)
    for key, candidate in found.items():
        if render_url(candidate.url) == url:
            return key
    return None


# Flask-Migrate's env.py hook (the same text in its 2.x to 4.x templates).
FLASK_MIGRATE_HOOK = """
def process_revision_directives(context, revision, directives):
    if getattr(config.cmd_opts, 'autogenerate', False):
        script = directives[0]
        if script.upgrade_ops.is_empty():
            directives[:] = []
            logger.info('No changes in schema detected.')
"""


def inert_flask_migrate_hook(hook):
    """True for Flask-Migrate's own process_revision_directives (the same code as its
    template, compiled here) while its config has no autogenerate option: it then changes
    nothing. Any other hook may act on the whole script."""
    code = getattr(hook, "__code__", None)
    if code is None:
        return False
    namespace = {}
    exec(compile(FLASK_MIGRATE_HOOK, "<flask-migrate env.py>", "exec"), namespace)
    ref = namespace["process_revision_directives"].__code__
    fields = ("co_code", "co_names", "co_consts", "co_varnames", "co_freevars")
    if any(getattr(code, f, None) != getattr(ref, f, None) for f in fields):
        return False
    config = (getattr(hook, "__globals__", None) or {}).get("config")
    return not getattr(getattr(config, "cmd_opts", None), "autogenerate", False)


def check_like_alembic(config, heads, runs, found_urls=None, shortcut=True, previous=None):
    """Run env.py as `alembic check` does; append one entry per context.configure to runs.

    Like alembic.command.check: ScriptDirectory.run_env() inside an EnvironmentContext, so
    every option env.py passes to context.configure applies (include_object, include_name,
    include_schemas, version_table(_schema), compare_type / compare_server_default,
    render_as_batch, process_revision_directives). Unlike check, nothing is run or created:
    run_migrations is replaced by the comparison (no version table is read, none created,
    dont_mutate set), and the diff is computed even when revisions are pending (check stops
    there with "Target database is not up to date"), so drift stays apart from pending work.
    previous(context) gives the previous check's table fingerprints for that context's bind
    (or None): tables whose catalog fingerprint is unchanged are not compared again.
    """
    from alembic.autogenerate import produce_migrations
    from alembic.runtime.environment import EnvironmentContext
    from alembic.script import ScriptDirectory
    script_dir = ScriptDirectory.from_config(config)

    def never(rev, context):  # run_migrations is replaced below: nothing may migrate
        return []

    env = EnvironmentContext(config, script_dir, fn=never, as_sql=False, dont_mutate=True)
    original_configure = env.configure

    def configure(*args, **kw):
        original_configure(*args, **kw)
        conn = kw.get("connection")
        engine = getattr(conn, "engine", None)
        if engine is not None and found_urls is not None and "url" not in found_urls:
            found_urls["url"] = render_url(engine.url)
        # Recorded at configure time: known even if the comparison then fails.
        runs.append({"context": env.get_context(), "diff": None,
                     "options": {k: _option_text(kw[k]) for k in ENV_OPTIONS if k in kw}})

    def run_migrations(**kw):
        context = env.get_context()
        metadata = context.opts.get("target_metadata")
        if metadata is None:
            raise EnvPyError(
                "env.py does not provide a MetaData object (target_metadata) to "
                "context.configure: autogenerate and `flask db check` cannot compare")
        # agent/asuser/bulk_reflection.py (bundled before this file): one catalog query instead of one
        # per table; absent from bundles that never compare (agentctl plan's).
        bulk = globals().get("install_bulk_reflection")
        skipping = globals().get("produce_migrations_skipping")
        if bulk is not None:
            bulk(context)
        hook = context.opts.get("process_revision_directives")
        # A hook sees the whole script and may act on it as a whole (drop everything, keep
        # one table): reused entries never passed through it. So reuse only without a hook,
        # or with Flask-Migrate's own, which returns at once unless autogenerating.
        reuse = not hook or inert_flask_migrate_hook(hook)
        prior = previous(context) if previous is not None and reuse else None
        fingerprints = None
        if skipping is not None and shortcut:
            # tables whose catalog equals their model, or equals the previous check's
            # (its operations reused), left out: the answer is the same
            script, runs[-1]["unchanged_tables"], fingerprints = \
                skipping(context, metadata, prior)
        else:
            script = produce_migrations(context, metadata)
        directives = [script]
        if hook:  # what `alembic check` runs too (it may filter or rewrite the ops)
            hook(context, heads, directives)
        if not reuse:
            fingerprints = None  # none kept: the next check compares everything too
        runs[-1]["fingerprints"] = fingerprints
        runs[-1]["diff"] = [d for s in directives for ops in s.upgrade_ops_list
                            for d in ops.as_diffs()]

    # Instance attributes: the `alembic.context` module proxy env.py uses takes the bound
    # methods from the instance when the context is entered (a subclass would not be
    # proxied at all).
    env.configure, env.run_migrations = configure, run_migrations
    with env:
        script_dir.run_env()


def env_error(exc, roots):
    """One line for an env.py failure, with env.py's own file and line when it is the cause."""
    return one_line(exc) + where(exc, roots)


DIFF_KEYS = ("kind", "table", "name", "detail", "bind")


def previous_check(value):
    """The previous check's {"tables": {bind: {"basis", "tables"}}, "diff": [entries]} as
    root passed it, or None when anything in it is not as this probe writes it (then
    every table is compared)."""
    if not isinstance(value, dict) or not isinstance(value.get("tables"), dict) or \
            not isinstance(value.get("diff"), list):
        return None
    for entry in value["diff"]:
        if not isinstance(entry, dict) or \
                not all(isinstance(entry.get(k), str) for k in DIFF_KEYS):
            return None
    for bind in value["tables"].values():
        if not isinstance(bind, dict) or not isinstance(bind.get("basis"), str) or \
                not isinstance(bind.get("tables"), dict):
            return None
    if any(not entry["table"] for entry in value["diff"]):
        return None  # an entry that names no table cannot be reused with its table
    return value


def _in_alembic_order(diff):
    """Entries grouped by table as Alembic orders them: tables created or dropped first
    (in their order), then the others by name (their own entries in their order)."""
    groups, order = {}, []
    for entry in diff:
        key = (entry["bind"], entry["table"])
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(entry)
    first = [k for k in order if any(e["kind"] in ("add_table", "remove_table")
                                     for e in groups[k])]
    leading = set(first)
    rest = sorted((k for k in order if k not in leading), key=lambda k: (k[0], k[1]))
    return [e for k in first + rest for e in groups[k]]


def compare_with_env_py(config, found, report, seen_urls=None, shortcut=True, previous=None):
    """Fill schema_diff / alembic_env by running env.py; errors into schema_diff_error.
    previous: the previous check of the same code (see previous_check), or None."""
    location = os.path.abspath(config.get_main_option("script_location") or
                               report.get("migrations_dir") or ".")
    env_py = os.path.join(location, "env.py")
    info = {"drift_source": "env.py", "env_py": env_py, "version_table": "alembic_version",
            "version_table_schema": "", "include_schemas": False, "options": {}, "binds": []}
    report["alembic_env"] = info
    runs = []
    previous = previous_check(previous)
    asked = set()

    def previous_for(context):
        """The previous fingerprints of this context's bind (a bind asked twice: none)."""
        key = _bind_of(context, found)
        bind = "default" if key is None else str(key)
        if previous is None or bind in asked:
            asked.add(bind)
            return None
        asked.add(bind)
        return previous["tables"].get(bind)

    try:
        check_like_alembic(config, tuple(report.get("heads") or ()), runs, seen_urls,
                           shortcut, previous_for)
    except BaseException as exc:  # SystemExit from env.py too
        kind = "database" if _is_db_error(exc) else "migrations"
        report["schema_diff_error"] = (
            "the live schema could not be compared: %s" if kind == "database" else
            "the migration environment " + env_py + " failed: %s") % env_error(exc, [location])
        report["schema_diff_error_kind"] = kind
    finally:
        _describe_runs(runs, found, info)
    if report.get("schema_diff_error"):
        return
    if not runs or any(run["diff"] is None for run in runs):
        report["schema_diff_error"] = (
            "the migration environment %s never %s" % (env_py, "called context.configure"
                                                       if not runs else
                                                       "called context.run_migrations"))
        report["schema_diff_error_kind"] = "migrations"
        return
    diff, fingerprints, binds, reusing = [], {}, [], False
    for run in runs:
        key = run["bind"]
        bind = "default" if key is None else str(key)
        binds.append(bind)
        for item in run["diff"] or ():
            for entry in safe_describe(item):
                entry["bind"] = bind
                diff.append(entry)
        kept = run.get("fingerprints")
        if kept is not None:
            fingerprints[bind] = {"basis": kept["basis"], "tables": kept["tables"]}
            reused = set(kept["reused"])
            if reused:  # the previous check's entries of tables whose catalog is unchanged
                reusing = True
                diff += [dict(e) for e in previous["diff"]
                         if e["bind"] == bind and e["table"] in reused]
    report["schema_diff"] = _in_alembic_order(diff) if reusing else diff
    # a bind compared twice (two contexts on one engine) cannot say whose tables these are
    report["table_fingerprints"] = {b: v for b, v in fingerprints.items()
                                    if binds.count(b) == 1}


def _describe_runs(runs, found, info):
    """Version table and options of each context.configure call env.py made."""
    for index, run in enumerate(runs):
        context = run.pop("context", None)
        key = _bind_of(context, found) if context is not None else None
        run["bind"] = key
        version_table = getattr(context, "version_table", None) or "alembic_version"
        schema = getattr(context, "version_table_schema", None) or ""
        include_schemas = bool(context.opts.get("include_schemas")) if context else False
        entry = {"bind": "default" if key is None else str(key),
                 "version_table": str(version_table)[:MAX_NAME],
                 "version_table_schema": str(schema)[:MAX_NAME],
                 "include_schemas": include_schemas, "options": run["options"],
                 "unchanged_tables": run.get("unchanged_tables", 0),
                 "reused_tables": len((run.get("fingerprints") or {}).get("reused") or ())}
        info["binds"].append(entry)
        if index == 0 or key is None:  # the default bind's version table is the unit's
            info["version_table"] = entry["version_table"]
            info["version_table_schema"] = entry["version_table_schema"]
            info["options"] = run["options"]
            info["include_schemas"] = include_schemas


def _is_db_error(exc):
    """True for SQLAlchemy/DBAPI errors (the database answered badly or not at all)."""
    for cls in type(exc).__mro__:
        if cls.__module__.startswith(("sqlalchemy.exc", "psycopg", "pymysql", "MySQLdb")) and \
                cls.__name__ in ("DBAPIError", "OperationalError", "Error"):
            return True
    return False


# -- main --------------------------------------------------------------------------------------

def probe(request, report, gunicorn_app=None):
    """Fill report step by step; every failure is recorded, later steps still run if they can."""
    report["versions"] = versions()
    cwd = os.getcwd()
    roots = [cwd] + list(report.get("pythonpath") or [])
    try:
        app, source, uri = load_app(request, gunicorn_app)
        report["app_source"] = source
        report["app_uri"] = uri
    except BaseException as exc:  # SystemExit at import too: the app never loaded
        report["error_kind"] = "app_load"
        report["error"] = "the app could not be loaded: " + one_line(exc) + where(exc, roots)
        if request.get("revisions_without_app") and request.get("include_revisions", True):
            revisions_without_app(report)
        return
    if not _is_flask(app):
        probe_plain_alembic(request, report)
        return
    with app.app_context():
        try:
            found, db = engines(app)
            report["urls"] = {("default" if k is None else str(k)):
                              absolute_sqlite(render_url(e.url)) for k, e in found.items()}
        except Exception as exc:
            found, db = {}, None
            report["error_kind"], report["error"] = "app_load", \
                "the database settings could not be read: " + one_line(exc)
        if not found:
            uri = app.config.get("SQLALCHEMY_DATABASE_URI")
            if uri:
                report["urls"] = {"default": absolute_sqlite(str(uri))}
        configure_args, config = {}, None
        try:
            config, configure_args = migrations_config(app, report)
            if config is not None and request.get("include_revisions", True):
                read_revisions(config, report)
        except BaseException as exc:
            versions_dir = os.path.join(report.get("migrations_dir") or cwd, "versions")
            report["revisions_error"] = "a migration script could not be read: " + \
                one_line(exc) + where(exc, [versions_dir, report.get("migrations_dir", "")])
            if not report.get("error"):
                report["error_kind"], report["error"] = "migrations", report["revisions_error"]
        if not request.get("compare_schema", True):
            return
        if config is not None and request.get("run_env_py", True):
            compare_with_env_py(config, found, report,
                                shortcut=request.get("skip_unchanged_tables", True),
                                previous=request.get("previous_check"))
            kind = report.pop("schema_diff_error_kind", "")
            if report.get("schema_diff_error") and not report.get("error"):
                report["error_kind"], report["error"] = kind, report["schema_diff_error"]
            return
        if db is None:
            return
        report["alembic_env"] = {"drift_source": "models"}
        diff = []
        try:
            for key, engine in sorted(found.items(), key=lambda kv: str(kv[0] or "")):
                metadata, include_object = metadata_for(db, key)
                if metadata is None:
                    continue
                for entry in compare_bind(engine, metadata, include_object, configure_args):
                    entry["bind"] = "default" if key is None else str(key)
                    diff.append(entry)
            report["schema_diff"] = diff
        except Exception as exc:
            report["schema_diff_error"] = "the live schema could not be compared: " + \
                one_line(exc)
            if not report.get("error"):
                report["error_kind"], report["error"] = "database", report["schema_diff_error"]


def probe_plain_alembic(request, report):
    """A plain Alembic app (alembic.ini + env.py with target_metadata, e.g. FastAPI): the
    revision graph from alembic.ini, drift by running env.py like `alembic check`, and the
    URL env.py really connected with (from alembic.ini, env.py or the environment)."""
    from alembic.config import Config
    report["plain_alembic"] = True  # remedies then name `alembic ...`, not `flask db ...`
    config = Config(os.path.abspath("alembic.ini"))
    location = config.get_main_option("script_location") or "migrations"
    report["migrations_dir"] = os.path.abspath(location)
    try:
        if request.get("include_revisions", True):
            read_revisions(config, report)
    except BaseException as exc:
        report["revisions_error"] = "a migration script could not be read: " + one_line(exc)
        report["error_kind"], report["error"] = "migrations", report["revisions_error"]
    url = config.get_main_option("sqlalchemy.url") or ""
    if url:
        report["urls"] = {"default": absolute_sqlite(url)}
    if not request.get("compare_schema", True) or not request.get("run_env_py", True):
        return
    seen = {}
    compare_with_env_py(config, {}, report, seen,
                        shortcut=request.get("skip_unchanged_tables", True),
                        previous=request.get("previous_check"))
    # env.py's engine, else what env.py set (config.set_main_option) before failing to connect
    url = seen.get("url") or config.get_main_option("sqlalchemy.url") or ""
    if url:
        report["urls"] = {"default": absolute_sqlite(url)}
    kind = report.pop("schema_diff_error_kind", "")
    if report.get("schema_diff_error") and not report.get("error"):
        report["error_kind"], report["error"] = kind, report["schema_diff_error"]


def read_stdin_request(limit=1024 * 1024):
    """The request JSON from stdin (a pipe root wrote and closed), then stdin is /dev/null."""
    chunks, size = [], 0
    while size <= limit:
        chunk = os.read(0, 65536)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    return b"".join(chunks).decode("utf-8")


def main(argv):
    """Entry point: argv = [FD] (or [FD, REQUEST_JSON]); one JSON report to FD, then _exit."""
    started = time.monotonic()
    stdin_request = None
    if argv[0] == "stdio":
        # Started by systemd as a transient unit (agent/privileged/transient.py): the request
        # comes on stdin, the report goes to the stdout pipe; from here on the app's own
        # prints go to stderr, never into the report.
        stdin_request = read_stdin_request()
        fd = os.dup(1)
        os.dup2(2, 1)
    else:
        fd = int(argv[0])
    os.set_inheritable(fd, False)  # nothing the app spawns may hold or write our pipe
    report = {"protocol": PROTOCOL, "ok": False, "error": "", "error_kind": "",
              "app_uid": os.getuid(), "app_gid": os.getgid(),
              "groups": sorted(os.getgroups()), "urls": {}, "migrations_dir": "",
              "script_location": "", "revisions": [], "heads": [], "revisions_error": "",
              "schema_diff": None, "schema_diff_error": "", "versions": {},
              "config_source": "", "gunicorn_config": "", "chdir": "", "app_uri": "",
              "pythonpath": [], "raw_env_names": [], "raw_env": {}, "alembic_env": {}}
    try:
        # The request comes in the environment (only the unit's user and root can read it,
        # unlike argv): it holds the gunicorn arguments, -e values included.
        raw = os.environ.pop(REQUEST_ENV, None)
        if stdin_request is not None:
            raw = stdin_request
        request = json.loads(argv[1] if len(argv) > 1 else raw or "{}")
        if os.getuid() == 0 or os.geteuid() == 0:
            if not request.get("allow_root"):
                raise PermissionError("refusing to load app code as root")
        # Before anything of the app runs (its gunicorn config file included): every engine
        # it creates gets read-only, bounded transactions (agent/asuser/readonly.py,
        # bundled in front of this file by the runner).
        guard = globals().get("install_readonly_guard")
        if guard is None:
            raise RuntimeError("the read-only guard is missing from the probe")
        guard(request.get("guard") or {})
        gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])
        gunicorn_app = prepare(request, report)
        # resolve_only (agentctl exec/upgrade): gunicorn's settings are all that is wanted;
        # the app is not imported and nothing else runs.
        if request.get("mode") == "offline_sql":  # agentctl plan: agent/asuser/offline_sql.py
            globals()["offline_report"](request, report, gunicorn_app, globals())
        elif not request.get("resolve_only"):
            probe(request, report, gunicorn_app)
    except ProbeError as exc:
        report["error_kind"], report["error"] = exc.kind, str(exc)
    except BaseException as exc:
        report["error_kind"] = report.get("error_kind") or "internal"
        report["error"] = report.get("error") or "the probe failed: " + one_line(exc)
    report["ok"] = not report["error"]
    report["duration"] = round(time.monotonic() - started, 3)
    report["cpu_seconds"] = round(time.process_time(), 3)  # this process's own CPU
    try:
        data = json.dumps(report, default=str).encode()
    except Exception as exc:  # never leave the agent without a report
        data = json.dumps({"protocol": PROTOCOL, "ok": False, "error_kind": "internal",
                           "error": "the probe could not encode its report: " +
                           one_line(exc)}).encode()
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.close(fd)
    # Skip the app's atexit hooks and non-daemon threads: the report is out, we are done.
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
