"""Probe child extension: the SQL each pending revision would run (Alembic offline mode).

Runs INSIDE the app's interpreter as the unit's user, as part of the probe child: the runner
sends this file's text followed by probe_child.py's as one ``python -c`` source, so the names of
probe_child.py (``prepare``, ``load_app``, ``migrations_config``, ``engines``, ...) are reached
through the namespace probe_child.py hands in, never imported. Stdlib only at module level.

For every pending revision, one at a time (``upgrade DOWN:REV --sql``), so an object created
earlier in the range never hides a finding on a later one; env.py's offline branch runs, it
never connects. A revision whose upgrade() queries the database (``op.get_bind()``) cannot
be rendered offline: its partial SQL, the error and the ``op.*`` calls read from its source
are reported instead. Also reported: the tables and columns the app's models map, so the
agent can name drops and renames the running code still uses.
"""

import ast
import contextlib
import io
import os

# Bounds: SQL per revision and revisions per run, so hostile migrations cannot flood the pipe.
OFFLINE_MAX_SQL = 200000
OFFLINE_MAX_REVISIONS = 200


def offline_pending_steps(script_dir, current, heads):
    """[(down or None, revision, doc, path)] from current to heads, in upgrade order."""
    steps = []
    revs = list(script_dir.iterate_revisions(tuple(heads) or "heads", tuple(current) or
                                             "base"))
    for script in reversed(revs):
        down = script.down_revision
        if isinstance(down, (tuple, list)):
            down = down[0] if down else None
        doc = (script.doc or "").strip().splitlines()[0][:200] if script.doc else ""
        steps.append((down, script.revision, doc, script.path))
    return steps[:OFFLINE_MAX_REVISIONS]


def offline_ops(path):
    """op.* calls in a revision's upgrade() (what is known without running it)."""
    try:
        with open(path) as fh:
            tree = ast.parse(fh.read())
    except (OSError, SyntaxError, ValueError):
        return []
    found = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "upgrade":
            for sub in ast.walk(node):
                if isinstance(sub, ast.Call) and isinstance(sub.func, ast.Attribute) and \
                        isinstance(sub.func.value, ast.Name) and sub.func.value.id == "op":
                    found.append(sub.func.attr)
    return found[:100]


def offline_model_tables(app, ns):
    """{'schema.table' or 'table': [column names]} of every bind's models."""
    out = {}
    try:
        _, db = ns["engines"](app)
    except Exception:
        return out
    if db is None:
        return out
    metadatas = list((getattr(db, "metadatas", None) or {}).values()) or \
        [getattr(db, "metadata", None)]
    for metadata in metadatas:
        if metadata is None:
            continue
        for table in metadata.tables.values():
            name = "%s.%s" % (table.schema, table.name) if table.schema else table.name
            out[name] = sorted(str(c.name) for c in table.columns)
    return out


def offline_sql_for(config, down, revision, seen):
    """(sql text, error) for one revision rendered offline by Alembic's own command; the
    options env.py configured go into seen (transaction_per_migration decides how long a
    lock lasts: to the revision's COMMIT, or to the end of the whole upgrade)."""
    from alembic import command
    from alembic.runtime.migration import MigrationContext
    buffer = io.StringIO()
    config.output_buffer = buffer
    target = "%s:%s" % (down, revision) if down else revision
    error = ""
    original = MigrationContext.__dict__["configure"]

    def configure(cls, *args, **kwargs):
        context = original.__func__(cls, *args, **kwargs)
        opts = getattr(context, "opts", {}) or {}
        seen["transaction_per_migration"] = bool(opts.get("transaction_per_migration")) or \
            seen.get("transaction_per_migration", False)
        url = kwargs.get("url")
        if url is not None and not seen.get("url"):   # the URL env.py's offline branch names
            seen["url"] = url
        return context
    MigrationContext.configure = classmethod(configure)
    try:
        command.upgrade(config, target, sql=True)
    except BaseException as exc:  # noqa: B036 - SystemExit from env.py is a failure too
        error = exc
    finally:
        MigrationContext.configure = original
    return buffer.getvalue()[:OFFLINE_MAX_SQL], error


def offline_report(request, report, gunicorn_app, ns):
    """Load the app as the probe does, then fill report['offline'] per pending revision."""
    app, source, _ = ns["load_app"](request, gunicorn_app)
    report["app_source"] = source
    steps_out = []
    report["offline"] = steps_out
    # A Flask app's extensions need its app context; a plain Alembic app (FastAPI, any
    # ASGI/WSGI callable) has none, and its database is env.py's business.
    flask = hasattr(app, "app_context")
    with app.app_context() if flask else contextlib.nullcontext():
        report["urls"] = {}
        if flask:
            try:  # the database the plan weighs the SQL against: the app's own URL
                found, _ = ns["engines"](app)
                report["urls"] = {("default" if k is None else str(k)): ns["render_url"](e.url)
                                  for k, e in found.items()}
            except Exception:
                uri = app.config.get("SQLALCHEMY_DATABASE_URI")
                report["urls"] = {"default": str(uri)} if uri else {}
            report["model_tables"] = offline_model_tables(app, ns)
        else:
            report["model_tables"] = {}
        config, configure_args = ns["migrations_config"](app, report)
        if config is None:
            raise ns["ProbeError"]("migrations", "no migrations directory or alembic.ini found")
        from alembic.script import ScriptDirectory
        script_dir = ScriptDirectory.from_config(config)
        steps = offline_pending_steps(script_dir, request.get("current") or [],
                                      request.get("heads") or [])
        roots = [os.path.dirname(path) for _, _, _, path in steps]
        # Flask-Migrate passes Migrate(..., transaction_per_migration=...) to the online
        # configure only; env.py's offline branch may set it itself.
        seen = {"transaction_per_migration":
                bool((configure_args or {}).get("transaction_per_migration"))}
        for down, revision, doc, path in steps:
            sql, error = offline_sql_for(config, down, revision, seen)
            entry = {"revision": revision, "down_revision": down or "", "doc": doc,
                     "sql": sql, "error": "", "ops": []}
            if error:
                entry["error"] = ns["one_line"](error) + ns["where"](error, roots)
                entry["ops"] = offline_ops(path)
            steps_out.append(entry)
        report["transaction_per_migration"] = seen["transaction_per_migration"]
        if not report["urls"]:   # a plain Alembic app: the database is env.py's choice
            url = seen.get("url") or config.get_main_option("sqlalchemy.url") or ""
            url = url if isinstance(url, str) else ns["render_url"](url)
            if url:
                report["urls"] = {"default": ns["absolute_sqlite"](url)}
