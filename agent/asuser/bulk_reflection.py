"""Probe side, bundled before child.py: catalog reads in bulk for Alembic's own comparison.

Stdlib only at module level, like child.py (this text is appended to it and run in the app's
interpreter); the app's SQLAlchemy and Alembic are imported inside functions.

Alembic's PostgreSQL comparison asks the server one question per integer column with a
``nextval(...)`` default: "is this sequence owned by this column?" (a SERIAL, whose default it
then ignores). At 1,000 tables that is 1,000 round trips and most of the comparison's time
in PostgreSQL. Here the same question is answered for every sequence with one catalog query,
and Alembic's own hook is fed from that answer; anything the bulk answer cannot decide
exactly goes to Alembic's own query, so the result is Alembic's.
"""

import re

# Alembic's own query (alembic/ddl/postgresql.py autogen_column_reflect) for every sequence
# at once, keyed the way nextval() defaults spell a sequence: regclass output, which is
# schema-qualified and quoted exactly as pg_get_expr renders the default in this session.
OWNED_SEQUENCES_SQL = (
    "select c.oid::regclass::text, c.relname, a.attname "
    "from pg_class as c join "
    "pg_depend d on d.objid=c.oid and "
    "d.classid='pg_class'::regclass and "
    "d.refclassid='pg_class'::regclass "
    "join pg_class t on t.oid=d.refobjid "
    "join pg_attribute a on a.attrelid=t.oid and "
    "a.attnum=d.refobjsubid "
    "where c.relkind='S'"
)
NEXTVAL = re.compile(r"nextval\('(.+?)'::regclass\)")


def owned_sequences(rows):
    """Pure: rows (regclass text, sequence, column) -> {regclass text: (sequence, column)};
    a sequence with several owner rows is left out (Alembic's .first() would pick one of
    them in no defined order: its own query decides, as it always did)."""
    found, ambiguous = {}, set()
    for key, relname, attname in rows:
        if key in found:
            ambiguous.add(key)
        found[key] = (relname, attname)
    for key in ambiguous:
        del found[key]
    return found


def serial_reflect_hook(original, load):
    """A stand-in for PostgresqlImpl.autogen_column_reflect answering from load() (the bulk
    map, read once on first use); what it cannot answer goes to original, unchanged."""
    state = {}

    def autogen_column_reflect(inspector, table, column_info):
        from sqlalchemy.dialects.postgresql import BIGINT, INTEGER
        default = column_info.get("default")
        if not default or not isinstance(column_info["type"], (INTEGER, BIGINT)):
            return None
        match = NEXTVAL.match(default)
        if not match:
            return None
        if "map" not in state:
            state["map"] = load(inspector)
        owner = state["map"].get(match.group(1))
        if owner is None:  # not owned, or spelled otherwise: Alembic's own query decides
            return original(inspector, table, column_info)
        if owner[1] == column_info["name"]:
            # a sequence owned by this very column: a SERIAL, whose default Alembic drops
            # (its log line about it is left out: it is no part of the answer)
            del column_info["default"]
        return None

    return autogen_column_reflect


def load_owned_sequences(inspector):
    """The bulk map, read on the inspector's own connection (the probe's read-only one)."""
    from alembic.util import sqla_compat
    from sqlalchemy import text
    rows = sqla_compat._exec_on_inspector(inspector, text(OWNED_SEQUENCES_SQL)).fetchall()
    return owned_sequences(tuple(r) for r in rows)


def asks_by_regclass(hook):
    """True when Alembic's hook asks the question the bulk query answers (by regclass)."""
    import inspect
    try:
        return "cast(:seqname as regclass)" in inspect.getsource(hook)
    except (OSError, TypeError):
        return False


def install_bulk_reflection(context):
    """Feed Alembic's per-column sequence question from one bulk query, on this migration
    context only; True when installed (PostgreSQL with Alembic's own unchanged hook)."""
    impl = getattr(context, "impl", None)
    if impl is None or "autogen_column_reflect" in vars(impl):
        return False
    try:
        from alembic.ddl.postgresql import PostgresqlImpl
    except ImportError:
        return False
    if type(impl).autogen_column_reflect is not PostgresqlImpl.autogen_column_reflect:
        return False  # a subclass with its own hook: leave it to answer for itself
    if not asks_by_regclass(PostgresqlImpl.autogen_column_reflect):
        return False  # Alembic < 1.8 asks by relname, another question: left as it is
    impl.autogen_column_reflect = serial_reflect_hook(impl.autogen_column_reflect,
                                                      load_owned_sequences)
    return True


# -- tables the catalog shows unchanged: left out of Alembic's per-table work -----------------
#
# Alembic's comparison costs about 2.5 ms of CPU per table (a reflected Table object is built,
# then every comparator runs), even though 1,000 tables are read from the catalog in a few
# bulk queries. A table whose catalog rows (read by those same bulk queries, from Alembic's
# own cache) equal its model in every property Alembic compares cannot produce an operation,
# so it is left out of the comparison; every other table goes through Alembic exactly as
# before. "Equal" is decided strictly: anything not recognised (an expression index, a
# dialect option, an identity column, an option spelled differently, a callable compare_type,
# a comparator not Alembic's own) means "compare it", never "skip it".

def only_alembic_comparators(dispatcher):
    """True when every registered comparator is Alembic's own (no third-party plugin)."""
    registry = getattr(dispatcher, "_registry", None)
    if not isinstance(registry, dict):
        return False
    for value in registry.values():
        for entry in value if isinstance(value, list) else [value]:
            fn = entry[0] if isinstance(entry, tuple) and entry else entry  # (fn, subgroup)
            if not str(getattr(fn, "__module__", "") or "").startswith("alembic."):
                return False
    return True


def _rendered_type(dialect, type_):
    """The type as the dialect renders it (what Alembic tokenizes), or None."""
    try:
        return dialect.type_compiler.process(type_).lower()
    except Exception:
        return None


def _given_name(value):
    """A constraint's given name, or None when it has none (matched by its columns)."""
    return str(value) if isinstance(value, str) and value else None


def same_columns(dialect, table, reflected, owned, compare_server_default):
    """Pure: the model table's columns equal the reflected ones in all Alembic compares."""
    from sqlalchemy.dialects.postgresql import BIGINT, INTEGER
    by_name = {c["name"]: c for c in reflected}
    if len(by_name) != len(reflected) or set(by_name) != {c.name for c in table.columns}:
        return False
    for col in table.columns:
        info = by_name[col.name]
        if info.get("identity") or info.get("computed") or \
                getattr(col, "identity", None) is not None or \
                getattr(col, "computed", None) is not None:
            return False
        if bool(info.get("nullable")) != bool(col.nullable):
            return False
        if info.get("comment") != col.comment:
            return False
        model_type = _rendered_type(dialect, col.type)
        db_type = _rendered_type(dialect, info["type"])
        if model_type is None or model_type != db_type:
            return False
        if compare_server_default:
            default = info.get("default")
            if col.server_default is not None:
                return False
            if default:
                match = NEXTVAL.match(default)
                owner = owned.get(match.group(1)) if match else None
                if owner is None or owner[1] != col.name or \
                        not isinstance(info["type"], (INTEGER, BIGINT)):
                    return False
    return True


def same_indexes(table, reflected):
    """Pure: plain column indexes, the same names, columns and uniqueness on both sides."""
    from sqlalchemy import Column
    db_side = []
    for ix in reflected:
        if ix.get("duplicates_constraint"):
            continue  # the index behind a unique constraint: compared as the constraint
        if ix.get("expressions") or ix.get("column_sorting") or ix.get("include_columns") \
                or any((ix.get("dialect_options") or {}).values()) \
                or None in (ix.get("column_names") or [None]):
            return False
        db_side.append((ix["name"], tuple(ix["column_names"]), bool(ix.get("unique"))))
    model_side = []
    for ix in table.indexes:
        if _given_name(ix.name) is None or any(v for v in ix.dialect_kwargs.values()) or \
                not all(isinstance(e, Column) for e in ix.expressions):
            return False
        model_side.append((_given_name(ix.name), tuple(c.name for c in ix.columns), bool(ix.unique)))
    return sorted(db_side) == sorted(model_side)


def same_uniques(table, reflected):
    """Pure: unique constraints on the same columns; where the model names one, that name."""
    from sqlalchemy import UniqueConstraint
    db_side = []
    for uq in reflected:
        if any((uq.get("dialect_options") or {}).values()) or \
                None in (uq.get("column_names") or [None]):
            return False
        db_side.append((uq["name"], tuple(uq["column_names"])))
    model_side = []
    for uc in table.constraints:
        if not isinstance(uc, UniqueConstraint):
            continue
        if uc.deferrable or uc.initially or any(v for v in uc.dialect_kwargs.values()):
            return False
        model_side.append((_given_name(uc.name), tuple(c.name for c in uc.columns)))
    return _matched(db_side, model_side)


def _matched(db_side, model_side):
    """(name, signature) lists: the same signatures, and each model name on its signature."""
    if sorted(sig for _, sig in db_side) != sorted(sig for _, sig in model_side):
        return False
    named = set(db_side)
    return all((name, sig) in named for name, sig in model_side if name is not None)


def same_foreign_keys(table, reflected):
    """Pure: the same FKs (columns, target, ON DELETE/UPDATE, deferrability, MATCH)."""
    db_side = []
    for fk in reflected:
        opts = fk.get("options") or {}
        if set(opts) - {"onupdate", "ondelete", "deferrable", "initially", "match"}:
            return False
        db_side.append((fk.get("name"), (
            tuple(fk["constrained_columns"]), fk.get("referred_schema"), fk["referred_table"],
            tuple(fk["referred_columns"]), opts.get("ondelete"), opts.get("onupdate"),
            opts.get("deferrable") or None, opts.get("initially"), opts.get("match"))))
    model_side = []
    for fk in table.foreign_key_constraints:
        try:
            targets = [e.column for e in fk.elements]
        except Exception:  # a target the models cannot resolve: Alembic decides
            return False
        if not targets or any(t.table is not targets[0].table for t in targets) or \
                any(v for v in fk.dialect_kwargs.values()):
            return False
        model_side.append((_given_name(fk.name), (
            tuple(c.name for c in fk.columns), targets[0].table.schema,
            targets[0].table.name, tuple(t.name for t in targets), fk.ondelete, fk.onupdate,
            fk.deferrable or None, fk.initially, fk.match)))
    return _matched(db_side, model_side)


def same_table(dialect, table, cache, key, owned, compare_server_default):
    """Pure: every catalog fact Alembic compares for table equals its model."""
    pk = (cache["alembic_pk_constraint"].get(key) or {}).get("constrained_columns") or []
    comment = (cache["alembic_table_comment"].get(key) or {}).get("text")
    return (comment == table.comment
            and sorted(pk) == sorted(c.name for c in table.primary_key.columns)
            and same_columns(dialect, table, cache["alembic_columns"].get(key) or [], owned,
                             compare_server_default)
            and same_indexes(table, cache["alembic_indexes"].get(key) or [])
            and same_uniques(table, cache["alembic_unique_constraints"].get(key) or [])
            and same_foreign_keys(table, cache["alembic_foreign_keys"].get(key) or []))


CACHE_KEYS = ("alembic_columns", "alembic_pk_constraint", "alembic_foreign_keys",
              "alembic_indexes", "alembic_unique_constraints", "alembic_table_comment")


def catalog_names(autogen):
    """The default-schema table names Alembic will compare, after Alembic's own bulk read
    of their catalog into the inspector's cache; None whenever the shortcuts cannot be
    exact (not PostgreSQL, include_schemas, a callable compare_type or
    compare_server_default, a comparator not Alembic's own, no bulk cache)."""
    from alembic.autogenerate.compare.util import _InspectorConv
    from sqlalchemy import MetaData
    opts = autogen.opts
    if autogen.dialect is None or autogen.dialect.name != "postgresql" or \
            opts.get("include_schemas") or callable(opts.get("compare_type")) or \
            callable(opts.get("compare_server_default")) or \
            not isinstance(autogen.metadata, MetaData) or \
            not only_alembic_comparators(autogen.comparators):
        return None
    inspector, context = autogen.inspector, autogen.migration_context
    available = set(inspector.get_table_names(schema=None))
    names = available.difference([context.version_table]) \
        if context.version_table_schema is None else available
    # the names Alembic itself will compare (include_name applies, as in Alembic)
    names = [n for n in names if autogen.run_name_filters(n, "table", {"schema_name": None})]
    _InspectorConv(inspector).pre_cache_tables(None, names, available)  # Alembic's own call
    if any(not isinstance(inspector.info_cache.get(k), dict) for k in CACHE_KEYS):
        return None
    return names


def unchanged_tables(autogen, names=None, owned=None):
    """Names of default-schema tables whose catalog equals their model, read through
    Alembic's own bulk cache; empty whenever the shortcut cannot be exact."""
    if names is None:
        names = catalog_names(autogen)
        if names is None:
            return set()
    opts, cache = autogen.opts, autogen.inspector.info_cache
    if owned is None:
        owned = load_owned_sequences(autogen.inspector) \
            if opts.get("compare_server_default") else {}
    tables = autogen.metadata.tables
    return {name for name in names if name in tables and tables[name].schema is None and
            same_table(autogen.dialect, tables[name], cache, (None, name), owned,
                       bool(opts.get("compare_server_default")))}


def hide_tables(autogen, hidden):
    """Leave hidden tables out of both sides of Alembic's table comparison."""
    original = autogen.run_name_filters

    def run_name_filters(name, type_, parent_names):
        if type_ == "table" and parent_names.get("schema_name") is None and name in hidden:
            return False
        return original(name, type_, parent_names)

    metadata = autogen.metadata
    rest = [t for t in metadata.tables.values() if t.schema is not None or t.name not in hidden]
    present = set(autogen.inspector.get_table_names(schema=None))
    if any(t.schema is not None or t.name not in present for t in rest):
        # tables to create: Alembic lists them in dependency order, so keep its sort
        rest = [t for t in autogen.sorted_tables
                if t.schema is not None or t.name not in hidden]
    autogen.run_name_filters = run_name_filters
    autogen.__dict__["sorted_tables"] = rest  # Alembic's memoized property, pre-filled


# -- per-table catalog fingerprints: a later check compares only what changed ----------------
#
# A table's comparison is a function of its model (fixed while the code fingerprint holds:
# root passes previous fingerprints only then), env.py's options and the libraries (the
# basis below) and its own catalog rows, as Alembic's bulk read caches them (all eight kinds,
# check constraints and table options included, and the enum labels of its types). So a
# table whose fingerprint of those rows is the one the previous check recorded, on the same
# basis, gives the operations it gave then: it is left out of Alembic's comparison and its
# previous entries are reused. A table with anything that cannot be reduced to plain data,
# or whose comparison asks the server (compare_server_default evaluating two defaults),
# gets no fingerprint and is compared every time.

FINGERPRINT_VERSION = 1
FINGERPRINT_KEYS = CACHE_KEYS + ("alembic_check_constraints", "alembic_table_options")


class Unplain(Exception):
    """Catalog data that cannot be reduced to plain data: the table is always compared."""


def canonical(value):
    """Pure: cached catalog data as canonical JSON text (keys sorted); a type by its class,
    repr and enum labels; anything else unknown (or a repr showing an object address)
    raises Unplain. (json's C encoder: most of the cost of fingerprinting 1,000 tables.)"""
    import json
    from sqlalchemy.types import TypeEngine

    def default(obj):
        if isinstance(obj, TypeEngine):
            text = repr(obj)
            if " at 0x" in text:
                raise Unplain(text)
            return ["type", type(obj).__module__, type(obj).__qualname__, text,
                    list(getattr(obj, "enums", None) or ())]
        raise Unplain(type(obj).__name__)

    return json.dumps(value, sort_keys=True, default=default, allow_nan=True)


def evaluates_defaults(table, columns, compare_server_default):
    """True when Alembic's PostgreSQL comparison may evaluate a server default on the
    server (both sides have one): its answer is the server's, not the catalog's."""
    if not compare_server_default or table is None:
        return False
    reflected = {c.get("name"): c.get("default") for c in columns or () if isinstance(c, dict)}
    return any(col.server_default is not None and reflected.get(col.name) is not None
               for col in table.columns)


def table_fingerprint(cache, name, owned, compare_server_default, table):
    """Pure: the fingerprint of one table's cached catalog rows (None: always compare)."""
    import hashlib
    key = (None, name)
    columns = cache["alembic_columns"].get(key)
    if evaluates_defaults(table, columns, compare_server_default):
        return None
    # a kind the dialect cannot reflect (NotImplementedError) is empty for every table
    parts = [cache[k].get(key) if isinstance(cache[k], dict) else "n/a"
             for k in FINGERPRINT_KEYS]
    if compare_server_default:  # which column owns each nextval() default (a SERIAL)
        parts.append([[c.get("name"), owned.get(m.group(1))]
                      for c in columns or () if isinstance(c, dict)
                      for m in [NEXTVAL.match(str(c.get("default") or ""))] if m])
    try:
        text = canonical(parts)
    except (Unplain, TypeError, ValueError, RecursionError):
        return None
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def fingerprint_basis(autogen):
    """What every table's comparison depends on beside its rows: libraries, server,
    default schema, version table and env.py's comparison options (callables by name)."""
    import hashlib
    import json
    import alembic
    import sqlalchemy
    context, opts = autogen.migration_context, autogen.opts

    def option(value):
        if callable(value):
            return "callable %s.%s" % (getattr(value, "__module__", ""),
                                       getattr(value, "__qualname__", type(value).__name__))
        return repr(value)

    basis = [FINGERPRINT_VERSION, sqlalchemy.__version__, alembic.__version__,
             repr(getattr(autogen.dialect, "server_version_info", None)),
             str(getattr(autogen.dialect, "default_schema_name", "")),
             str(context.version_table), str(context.version_table_schema),
             sorted((k, option(opts.get(k))) for k in (
                 "compare_type", "compare_server_default", "include_schemas",
                 "include_object", "include_name", "render_as_batch", "user_module_prefix",
                 "render_item", "sqlalchemy_module_prefix", "alembic_module_prefix"))]
    return hashlib.sha256(json.dumps(basis).encode()).hexdigest()


def table_fingerprints(autogen, names, owned):
    """{table: fingerprint} for names (tables without one left out)."""
    cache = autogen.inspector.info_cache
    if any(not isinstance(cache.get(k), dict) and cache.get(k) is not NotImplementedError
           for k in FINGERPRINT_KEYS):
        return {}  # a kind Alembic did not read in bulk: it would be read per table
    compare_defaults = bool(autogen.opts.get("compare_server_default"))
    tables = autogen.metadata.tables
    found = {}
    for name in names:
        table = tables.get(name)
        if table is not None and table.schema is not None:
            continue
        fp = table_fingerprint(cache, name, owned, compare_defaults, table)
        if fp is not None:
            found[str(name)] = fp
    return found


def reusable(previous, basis, fingerprints):
    """Pure: tables whose fingerprint equals the previous check's on the same basis;
    anything malformed in previous means none (compare everything)."""
    if not isinstance(previous, dict) or previous.get("basis") != basis:
        return set()
    tables = previous.get("tables")
    if not isinstance(tables, dict):
        return set()
    return {name for name, fp in fingerprints.items()
            if isinstance(tables.get(name), str) and tables[name] == fp}


def produce_migrations_skipping(context, metadata, previous=None):
    """alembic.autogenerate.produce_migrations, with unchanged tables left out (see above):
    those whose catalog equals their model, and those whose catalog fingerprint equals
    previous["tables"] (on the same basis; their previous operations stand).
    Returns (MigrationScript, number of clean tables left out, fingerprints), fingerprints
    being {"basis", "tables": {name: fp}, "reused": [names]} or None when unavailable."""
    from alembic.autogenerate import api, compare
    from alembic.operations import ops
    from alembic.util import sqla_compat
    if not getattr(sqla_compat, "sqla_2", False):
        return api.produce_migrations(context, metadata), 0, None
    try:
        from alembic.autogenerate.compare.util import _InspectorConv
        _InspectorConv.pre_cache_tables  # noqa: B018 (Alembic >= 1.14: the bulk cache)
    except (ImportError, AttributeError):
        return api.produce_migrations(context, metadata), 0, None
    autogen = api.AutogenContext(context, metadata=metadata)
    names = catalog_names(autogen)
    clean, fingerprints = set(), None
    if names is not None:
        owned = load_owned_sequences(autogen.inspector) \
            if autogen.opts.get("compare_server_default") else {}
        basis = fingerprint_basis(autogen)
        found = table_fingerprints(autogen, names, owned)
        reused = reusable(previous, basis, found)
        fingerprints = {"basis": basis, "tables": found, "reused": sorted(reused)}
        clean = unchanged_tables(autogen, [n for n in names if n not in reused], owned)
        hidden = clean | reused
        if hidden:
            hide_tables(autogen, hidden)
    script = ops.MigrationScript(rev_id=None, upgrade_ops=ops.UpgradeOps([]),
                                 downgrade_ops=ops.DowngradeOps([]))
    compare._populate_migration_script(autogen, script)
    return script, len(clean), fingerprints
