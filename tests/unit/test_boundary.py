"""Pure parts of the privilege boundary: transient properties, env merge, guard, answers."""

from __future__ import annotations

from dataclasses import replace

import pytest

from agent.asuser import readonly
from agent.context import ContextInputs, build_context, unset_names
from agent.model import ExecCommand, UnitProperties
from agent.privileged import transient
from agent.privileged.dbclient import parse_answer, rows_of
from agent.privileged.probe_runner import (ProbeRequest, ProbeResult, environment_url,
                                 unreadable_as_stand_in)
from agent.privileged.sources.systemd import exec_settings_from_dbus


def props(**kw: object) -> UnitProperties:
    base: dict[str, object] = {
        "name": "gunicorn.service", "load_state": "loaded", "active_state": "active",
        "sub_state": "running", "working_directory": "/srv/app",
        "exec_start": (ExecCommand("/srv/venv/bin/gunicorn",
                                   ("/srv/venv/bin/gunicorn", "wsgi:app")),)}
    base.update(kw)
    return UnitProperties(**base)  # type: ignore[arg-type]


def test_unset_environment_plain_and_with_value() -> None:
    env = {"A": "1", "B": "2", "C": "3"}
    assert unset_names(env, ("A", "B=2", "C=nope", "MISSING")) == ["A", "B"]


def test_pass_environment_then_environment_then_unset_in_systemds_order() -> None:
    ctx = build_context(props(
        pass_environment=("PM1", "PM2", "ABSENT"), manager_environment=("PM1=m1", "PM2=m2"),
        environment=("PM2=unit", "X=1", "GONE=1"), unset_environment=("GONE",)),
        ContextInputs())
    assert list(ctx.environment.items()) == [("PM1", "m1"), ("PM2", "unit"), ("X", "1")]
    assert ctx.environment_sources == {"PM1": "PassEnvironment=", "PM2": "Environment=",
                                       "X": "Environment="}
    assert ctx.unset_variables == ("GONE",)


def test_exec_settings_keep_only_what_the_unit_sets() -> None:
    got = exec_settings_from_dbus({
        b"User": b"www-data", b"Group": b"", b"Environment": [b"A=1"],
        b"LoadCredential": [(b"url", b"/etc/site/url")], b"PrivateTmp": True,
        b"ReadOnlyPaths": [], b"UMask": 18, b"MainPID": 42})
    assert got == {"User": "www-data", "Environment": ["A=1"],
                   "LoadCredential": [["url", "/etc/site/url"]], "PrivateTmp": True,
                   "UMask": 18}


def test_transient_properties_carry_the_unit_and_add_our_limits() -> None:
    settings = {"User": "www-data", "WorkingDirectory": "!/srv/app",
                "Environment": ["A=1"], "LoadCredential": [["url", "/etc/site/url"]],
                "BindReadOnlyPaths": [["/src", "/dst", 0, 0]]}
    p = transient.transient_properties(settings, description="d", extra_env={"PGAPPNAME": "x"},
                                       limits=transient.Limits(runtime_max_s=3))
    assert p[b"User"] == b"www-data" and b"DynamicUser" not in p
    assert p[b"WorkingDirectory"] == b"-/srv/app"
    assert p[b"Environment"] == [b"A=1", b"PGAPPNAME=x"]
    assert p[b"LoadCredential"] == [(b"url", b"/etc/site/url")]
    assert p[b"BindReadOnlyPaths"] == [(b"/src", b"/dst", False, 0)]
    assert p[b"RuntimeMaxUSec"] == 3_000_000 and p[b"KillMode"] == b"control-group"
    assert p[b"KillSignal"] == 9 and p[b"MemoryMax"] > 0 and p[b"TasksMax"] > 0


@pytest.mark.parametrize("probe_user, want", [("", {b"DynamicUser": True}),
                                              ("probe", {b"User": b"probe"})])
def test_unit_without_user_never_runs_as_root(probe_user: str, want: dict[bytes, object],
                                              ) -> None:
    p = transient.transient_properties({"Environment": ["A=1"]}, description="d",
                                       extra_env={}, limits=transient.Limits(),
                                       probe_user=probe_user)
    assert {k: p[k] for k in want} == want


def test_guard_statements_are_transaction_scoped() -> None:
    stmts = readonly.guard_statements({"statement_timeout_ms": 1500, "lock_timeout_ms": 300})
    assert stmts[0] == "SET TRANSACTION READ ONLY"
    assert all(s.startswith(("SET TRANSACTION", "SET LOCAL")) for s in stmts)
    assert "SET LOCAL statement_timeout = 1500" in stmts


class FakeCursor:
    def __init__(self, conn: "FakeConn") -> None:
        self.conn = conn

    def execute(self, sql: str) -> None:
        self.conn.sent.append(sql)

    def fetchone(self) -> tuple[str]:
        return (self.conn.read_only,)

    def close(self) -> None:
        pass


class FakeConn:
    def __init__(self, status: int | None, autocommit: bool = False,
                 read_only: str = "on") -> None:
        self.autocommit, self.read_only, self.sent = autocommit, read_only, []  # type: list[str]

        class Info:
            transaction_status = status
        self.info = Info()

    def cursor(self) -> FakeCursor:
        return FakeCursor(self)


def test_guard_opens_a_read_only_transaction_only_when_none_is_open() -> None:
    idle, busy = FakeConn(0), FakeConn(2)
    readonly.check_before_statement(idle, {}, {})
    readonly.check_before_statement(busy, {}, {})
    assert idle.sent[0] == "SET TRANSACTION READ ONLY" and idle.sent[-1].startswith("SHOW")
    assert busy.sent == []


@pytest.mark.parametrize("conn, match", [
    (FakeConn(0, autocommit=True), "autocommit"),
    (FakeConn(None), "transaction state"),
    (FakeConn(0, read_only="off"), "not read-only"),
])
def test_guard_refuses(conn: FakeConn, match: str) -> None:
    with pytest.raises(readonly.ReadOnlyGuardError, match=match):
        readonly.check_before_statement(conn, {}, {})


def test_answers_are_bounded_plain_json() -> None:
    assert rows_of(parse_answer(b'{"rows": [[1, "a", null, true, 1.5]]}')) == [
        (1, "a", None, True, 1.5)]
    assert rows_of({"rows": [[{"x": 1}]]}) == [("{'x': 1}",)]
    for bad in (b"[1]", b"not json"):
        with pytest.raises(ValueError):
            parse_answer(bad)
    with pytest.raises(ValueError):
        rows_of({"rows": "x"})


def test_unreadable_file_for_a_unit_without_user_names_file_and_fix() -> None:
    ctx = build_context(props(), ContextInputs())
    failed = ProbeResult(ok=False, error_kind="app_load", error=(
        "the app could not be loaded: PermissionError: [Errno 13] Permission denied: "
        "'/srv/app/app/settings.py'"))
    got = unreadable_as_stand_in(ctx, ProbeRequest(), failed)
    assert got.error_kind == "privileges" and "/srv/app/app/settings.py" in got.error
    assert "dynamic user" in got.error
    finding = got.finding()
    assert finding is not None and finding.check == "probe_privileges"
    assert "probe_user" in finding.remedy
    with_user = build_context(props(user="www-data"), ContextInputs())
    assert unreadable_as_stand_in(with_user, ProbeRequest(), failed) is failed


def test_stand_in_that_cannot_load_the_app_reads_the_environments_database() -> None:
    ctx = build_context(props(environment=(
        "FLASK_APP=wsgi.py", "DATABASE_URL=postgresql://app:s3cret@db:5432/app")),
        ContextInputs())
    failed = ProbeResult(ok=False, error_kind="app_load", revisions=(
        {"revision": "r1", "down_revisions": []},), heads=("r1",), error=(
        "the app could not be loaded: PermissionError: [Errno 13] Permission denied: "
        "'/srv/app/app/settings.py'"))
    got = unreadable_as_stand_in(ctx, ProbeRequest(), failed)
    assert got.urls == {"default": "postgresql://app:s3cret@db:5432/app"}
    assert got.heads == ("r1",) and got.error_kind == "privileges"
    assert "DATABASE_URL names" in got.error and "s3cret" not in got.error
    assert "revisions from the migration files" in got.error
    # The app's own URL, when it got that far, wins over the environment's.
    own = replace(failed, urls={"default": "postgresql://other/x"})
    assert unreadable_as_stand_in(ctx, ProbeRequest(), own).urls == own.urls
    # A DynamicUser= unit is not a stand-in: it is probed as itself.
    dyn = build_context(props(dynamic_user=True), ContextInputs())
    assert unreadable_as_stand_in(dyn, ProbeRequest(), failed) is failed


def test_environment_url_takes_only_urls() -> None:
    assert environment_url({"DATABASE_URL": "x"}) == ("", "")
    assert environment_url({"SQLALCHEMY_DATABASE_URI": " sqlite:////a.db "}) == (
        "SQLALCHEMY_DATABASE_URI", "sqlite:////a.db")


def test_session_child_speaks_libpq_uris_and_pyformat() -> None:
    from agent.asuser import dbsession

    assert dbsession.libpq_uri("postgresql+psycopg2://u:p%40w@h:5/d?sslmode=require") == \
        "postgresql://u:p%40w@h:5/d?sslmode=require"
    with pytest.raises(ValueError):
        dbsession.libpq_uri("mysql://u@h/d")
    assert dbsession.pyformat("SELECT to_regclass(:n)::oid WHERE x LIKE 'a%'") == \
        "SELECT to_regclass(%(n)s)::oid WHERE x LIKE 'a%%'"


@pytest.mark.parametrize("name", ["readonly.py", "dbsession.py"])
def test_asuser_modules_are_stdlib_only_at_module_level(name: str) -> None:
    """They run in the app's interpreter: nothing of the agent's venv may be imported."""
    import ast
    import sys
    from pathlib import Path

    import agent.asuser

    tree = ast.parse((Path(agent.asuser.__file__).parent / name).read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add((node.module or "").split(".")[0])
    assert names <= set(sys.stdlib_module_names), names - set(sys.stdlib_module_names)


def test_bundle_puts_the_guard_first() -> None:
    from agent.privileged.launch import DBSESSION, PROBE_CHILD, bundle

    for main in (DBSESSION, PROBE_CHILD):
        source = bundle(main)
        compile(source, "<bundle>", "exec")
        assert source.index("def install_readonly_guard") < source.index("def main(")


def test_probe_settings_in_the_config() -> None:
    from agent.config import ConfigError, parse_config
    from agent.privileged.inspector import InspectorSettings

    config = parse_config('[agent]\nprobe_user = "driftprobe"\nprobe_memory_max_mb = 1024\n')
    settings = InspectorSettings.from_config(config)
    assert (settings.probe_user, settings.probe_memory_max_mb) == ("driftprobe", 1024)
    for bad, what in (('probe_user = "root"', "must not be root"),
                      ("probe_memory_max_mb = 10", "at least 64"),
                      ("probe_memory_max_mb = true", "whole number")):
        with pytest.raises(ConfigError, match=what):
            parse_config(f"[agent]\n{bad}\n")


def test_pgbouncer_console_rows_are_parsed_by_position() -> None:
    from agent.privileged.sources import pooler
    from agent.privileged.sources.connections import ObservedConnection

    clients = pooler.parse_clients([
        ("C", "app", "app", "active", "127.0.0.1", 40001, "127.0.0.1", 6432),
        ("C", "admin", "pgbouncer", "active", "127.0.0.1", 40002),
        ("C", "app", "app_staging", "idle", "unix", None)])
    assert [(c.database, c.port) for c in clients] == [("app", 40001), ("app_staging", -1)]
    with pytest.raises(ValueError):
        pooler.parse_clients([("C", "app")])
    view = pooler.PoolerView(clients, pooler.parse_databases(
        [("app", "10.0.0.5", 5432, "app_prod", None), ("x", None, 5432, None)]))
    assert view.target("app") == "10.0.0.5:5432/app_prod"
    assert view.target("x") == "localhost:5432/x" and view.target("nope") == ""
    worker = ObservedConnection(7, "tcp", "127.0.0.1", 40001, "127.0.0.1", 6432)
    other = ObservedConnection(7, "tcp", "127.0.0.1", 49999, "127.0.0.1", 6432)
    assert [c.database for _, c in pooler.name_clients([worker, other], view)] == ["app"]
    assert pooler.refused_by_pgbouncer('... failed: FATAL:  not allowed')
    assert not pooler.refused_by_pgbouncer('database "pgbouncer" does not exist')
    assert pooler.url_database("postgresql://u:p@h:6432/app?sslmode=require") == "app"
