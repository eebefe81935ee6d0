"""Probe side, bundled after child.py: catalog reads in bulk for Alembic's own comparison.

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
