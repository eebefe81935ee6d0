"""Pure parts of the probe: identity, environment, secrets, report parsing, child helpers."""

from __future__ import annotations

import ast
import json
import sys
from types import SimpleNamespace

import pytest

from agent.context import AppContext
from agent.execstart import LaunchSpec
from agent.asuser import probe_child as child
from agent.privileged.probe_runner import (
    CHILD_SOURCE_PATH,
    Identity,
    ProbeRequest,
    ProbeSetupError,
    build_probe_env,
    build_unit_env,
    child_request,
    gunicorn_config_files,
    parse_report,
    parse_resolved,
    pgoptions,
    privilege_plan,
    resolve_gunicorn_config,
    resolve_identity,
    resolve_request,
    scrub,
    secret_values,
)

PASSWD = {
    "www-data": SimpleNamespace(pw_name="www-data", pw_uid=33, pw_gid=33, pw_dir="/var/www",
                                pw_shell="/usr/sbin/nologin"),
    "root": SimpleNamespace(pw_name="root", pw_uid=0, pw_gid=0, pw_dir="/root",
                            pw_shell="/bin/bash"),
}
GROUPS = {"www-data": 33, "ssl-cert": 110, "adm": 4}


def lookups(member_of: tuple[int, ...] = ()) -> dict[str, object]:
    """Fake pwd/grp functions for resolve_identity."""
    def getpwnam(name: str) -> SimpleNamespace:
        return PASSWD[name]

    def getpwuid(uid: int) -> SimpleNamespace:
        return next(p for p in PASSWD.values() if p.pw_uid == uid) if uid in (0, 33) else \
            (_ for _ in ()).throw(KeyError(uid))

    return {"getpwnam": getpwnam, "getpwuid": getpwuid,
            "getgrnam": lambda name: SimpleNamespace(gr_gid=GROUPS[name]),
            "getgrouplist": lambda name, gid: [gid, *member_of]}


def make_ctx(**kw: object) -> AppContext:
    """An AppContext with plain defaults."""
    launch = LaunchSpec(argv=("/srv/venv/bin/gunicorn", "wsgi:app"), runs_gunicorn=True,
                        app_spec="wsgi:app", gunicorn_env=tuple(kw.pop("gunicorn_env", ())))  # type: ignore[arg-type]
    fields: dict[str, object] = dict(
        unit="gunicorn.service", user="www-data", group="www-data", supplementary_groups=(),
        working_directory="/srv/app", working_directory_optional=False, exec_start=(),
        launch=launch, venv="/srv/venv", venv_source="", python="/srv/venv/bin/python3",
        environment={}, environment_sources={}, environment_files=(), main_pid=0)
    fields.update(kw)
    return AppContext(**fields)  # type: ignore[arg-type]


# -- identity ---------------------------------------------------------------------------------

def test_identity_of_named_user_includes_initgroups_and_supplementary() -> None:
    ident = resolve_identity("www-data", "", ("ssl-cert", "4"), **lookups((4,)))  # type: ignore[arg-type]
    assert ident == Identity("www-data", 33, 33, (33, 4, 110), "/var/www", "/usr/sbin/nologin")


def test_identity_group_override_by_name_and_number() -> None:
    assert resolve_identity("www-data", "adm", (), **lookups()).gid == 4  # type: ignore[arg-type]
    assert resolve_identity("www-data", "110", (), **lookups()).gid == 110  # type: ignore[arg-type]


def test_identity_numeric_uid_without_passwd_entry() -> None:
    ident = resolve_identity("4242", "", (), **lookups())  # type: ignore[arg-type]
    assert (ident.uid, ident.gid, ident.groups, ident.home) == (4242, 4242, (4242,), "/")


def test_identity_empty_user_is_root() -> None:
    assert resolve_identity("", "", (), **lookups()).uid == 0  # type: ignore[arg-type]


@pytest.mark.parametrize("user, group, extra", [("nobody-here", "", ()),
                                                ("www-data", "nogroup-here", ()),
                                                ("www-data", "", ("nogroup-here",))])
def test_identity_unknown_names_are_privilege_errors(user: str, group: str,
                                                     extra: tuple[str, ...]) -> None:
    def getpwnam(name: str) -> SimpleNamespace:
        return PASSWD[name]

    fakes = lookups()
    fakes["getpwnam"] = getpwnam
    fakes["getgrnam"] = lambda name: SimpleNamespace(gr_gid=GROUPS[name])
    with pytest.raises(ProbeSetupError) as err:
        resolve_identity(user, group, extra, **fakes)  # type: ignore[arg-type]
    assert err.value.kind == "privileges" and "does not exist" in str(err.value)


def test_privilege_plan() -> None:
    www = Identity("www-data", 33, 33, (33, 4), "/var/www", "/bin/sh")
    root = Identity("root", 0, 0, (0,), "/root", "/bin/sh")
    assert privilege_plan(www, 0, False) == {"user": 33, "group": 33, "extra_groups": [33, 4]}
    assert privilege_plan(www, 33, False) == {}
    with pytest.raises(ProbeSetupError, match="agent runs as uid 1000 and cannot become "
                                              "User=www-data"):
        privilege_plan(www, 1000, False)
    with pytest.raises(ProbeSetupError, match="runs as root"):
        privilege_plan(root, 0, False)
    assert privilege_plan(root, 0, True)["user"] == 0


# -- environment ------------------------------------------------------------------------------

def test_pgoptions_appends_to_existing() -> None:
    req = ProbeRequest(statement_timeout_ms=1500, lock_timeout_ms=300)
    ours = ("-c default_transaction_read_only=on -c statement_timeout=1500 "
            "-c lock_timeout=300 -c idle_in_transaction_session_timeout=10000")
    assert pgoptions("", req) == ours
    assert pgoptions(" -c search_path=app ", req) == "-c search_path=app " + ours


def test_probe_env_layers_like_systemd_then_gunicorn() -> None:
    ident = Identity("www-data", 33, 33, (33,), "/var/www", "/usr/sbin/nologin")
    ctx = make_ctx(environment={"DATABASE_URL": "postgresql://a:b@h/d", "HOME": "/srv/home",
                                "PGOPTIONS": "-c search_path=app", "MODE": "unit"},
                   gunicorn_env=("MODE=gunicorn", "BAD"))
    env = build_probe_env(ctx, ident, ProbeRequest())
    assert env["HOME"] == "/srv/home"  # Environment= wins over systemd's User= defaults
    assert (env["USER"], env["LOGNAME"], env["SHELL"]) == ("www-data", "www-data",
                                                           "/usr/sbin/nologin")
    # gunicorn -e is the child's business (gunicorn applies raw_env after its config file).
    assert env["MODE"] == "unit"
    beside = build_unit_env(ctx, ident)  # commands run beside the app do get -e values
    assert beside["MODE"] == "gunicorn" and "BAD" not in beside
    assert env["PATH"].split(":")[:2] == ["/srv/venv/bin", "/usr/local/sbin"]
    # The unit's own PGOPTIONS as is: read-only comes from the child's guard (PgBouncer
    # refuses an options startup parameter).
    assert env["PGOPTIONS"] == "-c search_path=app"
    assert env["PGAPPNAME"] == "driftwatch-probe"
    assert "VIRTUAL_ENV" not in env and "PYTHONPATH" not in env  # nothing of the agent's


def test_probe_env_without_user_sets_no_user_vars_and_keeps_unit_path() -> None:
    ident = Identity("root", 0, 0, (0,), "/root", "/bin/sh")
    ctx = make_ctx(user="", environment={"PATH": "/opt/bin:/srv/venv/bin"})
    env = build_probe_env(ctx, ident, ProbeRequest())
    assert "HOME" not in env and "USER" not in env
    assert env["PATH"] == "/srv/venv/bin:/opt/bin"


def test_child_request_carries_app_spec_and_cwd() -> None:
    ctx = make_ctx(launch=LaunchSpec(argv=(), runs_gunicorn=True, app_spec="app:create_app()",
                                     chdir="/srv/code"))
    req = child_request(ctx, ProbeRequest(compare_schema=False))
    assert (req["app_spec"], req["cwd"], req["compare_schema"]) == (
        "app:create_app()", "/srv/code", False)


def test_child_request_carries_gunicorn_args_and_where_gunicorn_starts() -> None:
    args = ("-c", "conf/gunicorn.conf.py", "--chdir", "src", "-e", "A=1")
    ctx = make_ctx(launch=LaunchSpec(argv=("/v/bin/gunicorn", *args), runs_gunicorn=True,
                                     chdir="/srv/app/src", gunicorn_args=args,
                                     gunicorn_env=("A=1",), start_dir="/srv/app"))
    req = child_request(ctx, ProbeRequest())
    assert req["gunicorn_args"] == list(args)
    assert (req["start_dir"], req["cwd"], req["gunicorn_env"]) == ("/srv/app", "/srv/app/src",
                                                                   ["A=1"])
    flask_only = make_ctx(launch=LaunchSpec(argv=("/v/bin/flask", "run"), runs_gunicorn=False))
    req = child_request(flask_only, ProbeRequest())
    assert req["gunicorn_args"] is None and req["start_dir"] == "/srv/app"


def test_resolve_request_is_resolve_only_and_never_imports_the_app() -> None:
    ctx = make_ctx()
    assert child_request(ctx, ProbeRequest())["resolve_only"] is False
    req = resolve_request(ctx)
    assert (req["resolve_only"], req["compare_schema"], req["include_revisions"],
            req["allow_root"]) == (True, False, False, False)
    assert resolve_request(ctx, allow_root=True)["allow_root"] is True


def test_resolve_needs_gunicorn_and_a_known_interpreter() -> None:
    not_gunicorn = make_ctx(launch=LaunchSpec(argv=("/v/bin/flask",), runs_gunicorn=False))
    assert resolve_gunicorn_config(not_gunicorn, 5) is None
    assert resolve_gunicorn_config(make_ctx(venv="", python=""), 5) is None


def resolved_report(**kw: object) -> bytes:
    doc = {"protocol": 1, "ok": True, "error": "", "config_source": "gunicorn config",
           "gunicorn_config": "/etc/site/g.py", "chdir": "/srv/site",
           "pythonpath": ["/srv/lib"], "app_uri": "wsgi:app",
           "raw_env": {"DATABASE_URL": "postgresql://u:hunter22@db/app", "MODE": "prod-blue"}}
    doc.update(kw)
    return json.dumps(doc).encode()


def test_parse_resolved_keeps_raw_env_values_out_of_every_surfaced_form() -> None:
    got = parse_resolved(resolved_report(), 0, "", timed_out=False, timeout=5, duration=0.1)
    assert got.from_gunicorn and got.error == ""
    assert (got.gunicorn_config, got.chdir, got.pythonpath, got.app_uri) == (
        "/etc/site/g.py", "/srv/site", ("/srv/lib",), "wsgi:app")
    assert got.raw_env["DATABASE_URL"] == "postgresql://u:hunter22@db/app"
    shown = repr(got) + json.dumps(got.as_dict())
    assert "hunter22" not in shown and "prod-blue" not in shown
    assert got.as_dict()["raw_env_names"] == ["DATABASE_URL", "MODE"]


def test_parse_resolved_execstart_fallback_applies_nothing() -> None:
    got = parse_resolved(resolved_report(config_source="ExecStart", raw_env={}), 0, "",
                         timed_out=False, timeout=5, duration=0.1)
    assert not got.from_gunicorn and got.raw_env == {} and got.error == ""


def test_parse_resolved_errors_are_scrubbed_one_liners() -> None:
    got = parse_resolved(resolved_report(
        error="gunicorn config /etc/g.py failed: ValueError: postgresql://u:hunter22@db/app "
              "prod-blue", error_kind="app_load"), 0, "", timed_out=False, timeout=5,
        duration=0.1)
    assert got.error.startswith("gunicorn config /etc/g.py failed: ValueError: ")
    assert "hunter22" not in got.error and "prod-blue" not in got.error
    assert not got.from_gunicorn
    late = parse_resolved(b"", None, "", timed_out=True, timeout=7, duration=7)
    assert late.error == "resolving gunicorn's configuration timed out after 7 s"
    died = parse_resolved(b"", 1, "Traceback\nKeyError: 'x'\n", timed_out=False, timeout=5,
                          duration=0.1, secrets=["topsecret"])
    assert died.error == ("the app's interpreter exited with status 1 before reporting: "
                          "KeyError: 'x'")


def test_gunicorn_config_files_for_the_fingerprint() -> None:
    launch = LaunchSpec(argv=(), runs_gunicorn=True, start_dir="/srv/app",
                        gunicorn_args=("-c", "etc/g.py", "wsgi:app"))
    ctx = make_ctx(launch=launch, environment={"GUNICORN_CMD_ARGS": "--config=file:/etc/x.py"})
    assert gunicorn_config_files(ctx) == ["/srv/app/etc/g.py", "/etc/x.py",
                                          "/srv/app/gunicorn.conf.py"]
    plain = make_ctx(launch=LaunchSpec(argv=(), runs_gunicorn=True))  # no start_dir: workdir
    assert gunicorn_config_files(plain) == ["/srv/app/gunicorn.conf.py"]
    assert gunicorn_config_files(make_ctx(launch=LaunchSpec(argv=(), runs_gunicorn=False))) == []


# -- secrets ----------------------------------------------------------------------------------

def test_secret_values_and_scrub() -> None:
    env = {"SECRET_KEY": "hunter22", "DATABASE_URL": "postgresql://u:p%40ss-word@h/d",
           "PLAIN": "visible", "API_TOKEN": "abc"}
    secrets = secret_values(env)
    assert "hunter22" in secrets and "p@ss-word" in secrets and "p%40ss-word" in secrets
    assert "abc" not in secrets  # too short to mask without mangling ordinary text
    text = "KeyError hunter22 at postgresql://u:p%40ss-word@h/d, also p@ss-word; visible"
    assert scrub(text, secrets) == "KeyError **** at postgresql://u:****@h/d, also ****; visible"


# -- report parsing ---------------------------------------------------------------------------

def report(**kw: object) -> bytes:
    """A child report with defaults."""
    doc: dict[str, object] = {"protocol": 1, "ok": True, "error": "", "error_kind": "",
                              "urls": {"default": "postgresql://app:s3cret-pw@db/app"},
                              "heads": ["r3"], "revisions": [{"revision": "r3"}, "junk"],
                              "schema_diff": [], "app_uid": 33,
                              "versions": {"sqlalchemy": "2.0.58", "alembic": None}}
    doc.update(kw)
    return json.dumps(doc).encode()


def parse(raw: bytes, returncode: int | None = 0, tail: str = "", timed_out: bool = False,
          secrets: tuple[str, ...] = ()) -> object:
    return parse_report(raw, returncode, tail, timed_out=timed_out, timeout=5, duration=1.0,
                        secrets=secrets)


def test_parse_good_report_masks_urls_only_in_as_dict() -> None:
    result = parse(report())
    assert result.ok and result.error_kind == ""  # type: ignore[attr-defined]
    assert result.urls == {"default": "postgresql://app:s3cret-pw@db/app"}  # type: ignore[attr-defined]
    shown = result.as_dict()  # type: ignore[attr-defined]
    assert shown["urls"] == {"default": "postgresql://app:****@db/app"}
    assert shown["revisions"] == [{"revision": "r3"}] and shown["heads"] == ["r3"]
    assert "s3cret" not in repr(result) and "s3cret" not in json.dumps(shown)
    assert result.finding() is None  # type: ignore[attr-defined]


def test_parse_error_report_scrubs_password_from_messages() -> None:
    raw = report(ok=False, error_kind="database",
                 error="could not connect with password s3cret-pw to postgresql://app:s3cret-pw@db/app",
                 schema_diff=None, schema_diff_error="s3cret-pw again")
    result = parse(raw, tail="Traceback ... s3cret-pw\n")
    assert not result.ok and result.error_kind == "database"  # type: ignore[attr-defined]
    assert "s3cret-pw" not in json.dumps(result.as_dict())  # type: ignore[attr-defined]
    assert result.schema_diff is None  # type: ignore[attr-defined]
    finding = result.finding()  # type: ignore[attr-defined]
    assert finding.check == "probe_database_error" and finding.severity == "critical"
    assert finding.message == result.error  # type: ignore[attr-defined]


def test_parse_gunicorn_fields_keep_raw_env_names_and_mask_its_values() -> None:
    raw = report(ok=False, error_kind="app_load",
                 error="the app could not be loaded: ValueError: bad key tops3cret-key",
                 config_source="gunicorn config", gunicorn_config="/etc/app/gunicorn.conf.py",
                 chdir="/srv/app/src", app_uri="wsgi:app", pythonpath=["/srv/lib"],
                 raw_env_names=["SECRET_KEY", "DATABASE_URL"],
                 raw_env={"SECRET_KEY": "tops3cret-key",
                          "DATABASE_URL": "postgresql://u:rawpw-123@db/app"})
    result = parse(raw, tail="printed tops3cret-key and rawpw-123\n")
    assert (result.config_source, result.gunicorn_config, result.app_chdir,  # type: ignore[attr-defined]
            result.app_uri, result.pythonpath) == (  # type: ignore[attr-defined]
        "gunicorn config", "/etc/app/gunicorn.conf.py", "/srv/app/src", "wsgi:app",
        ("/srv/lib",))
    assert result.raw_env_names == ("DATABASE_URL", "SECRET_KEY")  # type: ignore[attr-defined]
    shown = json.dumps(result.as_dict())  # type: ignore[attr-defined]
    assert "tops3cret-key" not in shown and "rawpw-123" not in shown
    assert "tops3cret-key" not in repr(result) and "raw_env\"" not in shown
    assert result.error == "the app could not be loaded: ValueError: bad key ****"  # type: ignore[attr-defined]
    assert parse(report(config_source="bogus")).config_source == ""  # type: ignore[attr-defined]


def test_child_gunicorn_failure_names_the_config_file_and_the_cause() -> None:
    def failing() -> SystemExit:
        try:
            try:
                undefined_name  # type: ignore[name-defined]  # noqa: F821
            except Exception:
                raise SystemExit(1)  # what gunicorn's get_config_from_filename does
        except SystemExit as exc:
            return exc
        raise AssertionError

    state = {"config": "/etc/app/gunicorn.conf.py", "config_done": False}
    assert child.gunicorn_failure(failing(), state, "") == (
        "gunicorn config /etc/app/gunicorn.conf.py failed: NameError: name 'undefined_name' "
        "is not defined")
    state["config_done"] = True
    usage = "usage: gunicorn [OPTIONS]\ngunicorn: error: unrecognized arguments: --nope\n"
    assert child.gunicorn_failure(SystemExit(2), state, usage) == (
        "gunicorn's configuration failed: gunicorn: error: unrecognized arguments: --nope")


def test_parse_unknown_error_kind_becomes_internal() -> None:
    assert parse(report(error="x", error_kind="weird")).error_kind == "internal"  # type: ignore[attr-defined]


def test_parse_timeout() -> None:
    result = parse(b"", returncode=-9, timed_out=True)
    assert (result.error_kind, result.error) == ("timeout", "the probe timed out after 5 s")  # type: ignore[attr-defined]


@pytest.mark.parametrize("returncode, tail, expected", [
    (1, "Traceback...\nModuleNotFoundError: No module named 'encodings'\n",
     "the app's interpreter exited with status 1 before reporting: "
     "ModuleNotFoundError: No module named 'encodings'"),
    (-11, "", "the app's interpreter was killed by signal SIGSEGV before reporting"),
    (0, "postgresql://u:pw1234@h/d failed\n",
     "the app's interpreter exited with status 0 before reporting: postgresql://u:****@h/d "
     "failed"),
])
def test_parse_missing_report(returncode: int, tail: str, expected: str) -> None:
    result = parse(b"", returncode=returncode, tail=tail)
    assert (result.error_kind, result.error) == ("app_load", expected)  # type: ignore[attr-defined]


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe", b'"text"'])
def test_parse_garbage_report(raw: bytes) -> None:
    result = parse(raw)
    assert result.error_kind == "internal"  # type: ignore[attr-defined]
    assert result.error.startswith("the probe's report is not valid JSON")  # type: ignore[attr-defined]


def test_parse_protocol_mismatch() -> None:
    result = parse(report(protocol=99))
    assert result.error_kind == "internal" and "protocol 99" in result.error  # type: ignore[attr-defined]


# -- the child's pure helpers -----------------------------------------------------------------

def test_child_is_stdlib_only_at_module_level() -> None:
    tree = ast.parse(CHILD_SOURCE_PATH.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add((node.module or "").split(".")[0])
    assert names and names <= set(sys.stdlib_module_names), names - set(
        sys.stdlib_module_names)


def test_child_one_line() -> None:
    assert child.one_line(KeyError("DATABASE_URL")) == "KeyError: 'DATABASE_URL'"
    exc = Exception("(psycopg2.errors.ReadOnlySqlTransaction) cannot execute INSERT in a "
                    "read-only transaction\n[SQL: INSERT ...]\n(Background on this error)")
    assert child.one_line(exc) == ("ReadOnlySqlTransaction: cannot execute INSERT in a "
                                   "read-only transaction")
    assert child.one_line(SystemExit()) == "SystemExit"
    assert child.one_line(SyntaxError("invalid syntax", ("f.py", 3, 1, "x"))) == \
        "SyntaxError: invalid syntax"


@pytest.mark.parametrize("expr, parsed", [
    ("app", ("app", (), {}, False)),
    ("create_app()", ("create_app", (), {}, True)),
    ("create_app('prod', debug=False)", ("create_app", ("prod",), {"debug": False}, True)),
])
def test_child_literal_call(expr: str, parsed: tuple[object, ...]) -> None:
    assert child._literal_call(expr) == parsed


@pytest.mark.parametrize("expr", ["a.b", "f(x)", "1 +", "lambda: 1"])
def test_child_literal_call_rejects(expr: str) -> None:
    with pytest.raises(ValueError):
        child._literal_call(expr)


def test_child_describe_diff_shapes() -> None:
    import sqlalchemy as sa

    md = sa.MetaData()
    users = sa.Table("users", md, sa.Column("id", sa.Integer, primary_key=True),
                     sa.Column("email", sa.String(120), nullable=False))
    posts = sa.Table("posts", md, sa.Column("id", sa.Integer, primary_key=True),
                     sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id")))
    fk = next(iter(posts.foreign_key_constraints))
    uq = sa.UniqueConstraint(users.c.email, name="users_email_key")
    users.append_constraint(uq)
    ix = sa.Index("ix_posts_user", posts.c.user_id)
    got = [d for item in [
        ("add_table", users),
        ("remove_column", None, "users", sa.Column("legacy", sa.Boolean())),
        ("add_fk", fk), ("remove_constraint", uq), ("add_index", ix),
        [("modify_type", None, "users", "email", {}, sa.String(80), sa.String(120)),
         ("modify_nullable", None, "users", "email", {}, True, False)],
        ("modify_default", None, "users", "email", {},
         sa.schema.DefaultClause(sa.text("'x'::character varying")),
         sa.schema.DefaultClause("it's")),
        ("modify_default", None, "users", "id", {}, None, sa.schema.DefaultClause(sa.text("1"))),
        ("add_table_comment", sa.Table("posts", sa.MetaData(), comment="all posts"), None),
        ("remove_table_comment", sa.Table("posts", sa.MetaData(), schema="blog")),
    ] for d in child.describe_diff(item)]
    assert got == [
        {"kind": "add_table", "table": "users", "name": "users", "detail": "id, email"},
        {"kind": "remove_column", "table": "users", "name": "legacy",
         "detail": "BOOLEAN NULL"},
        {"kind": "add_fk", "table": "posts", "name": "", "detail": "(user_id) -> users(id)"},
        {"kind": "remove_unique", "table": "users", "name": "users_email_key",
         "detail": "(email)"},
        {"kind": "add_index", "table": "posts", "name": "ix_posts_user", "detail": "(user_id)"},
        {"kind": "modify_type", "table": "users", "name": "email",
         "detail": "database VARCHAR(80), models VARCHAR(120)"},
        {"kind": "modify_nullable", "table": "users", "name": "email",
         "detail": "database NULL, models NOT NULL"},
        # SQL text, never an object's repr with its address
        {"kind": "modify_default", "table": "users", "name": "email",
         "detail": "database 'x'::character varying, models 'it''s'"},
        {"kind": "modify_default", "table": "users", "name": "id",
         "detail": "database none, models 1"},
        # with its table, so a later check can reuse it with that table's fingerprint
        {"kind": "add_table_comment", "table": "posts", "name": "posts",
         "detail": "database None, models all posts"},
        {"kind": "remove_table_comment", "table": "blog.posts", "name": "blog.posts",
         "detail": "models have no comment"},
    ]


def test_parse_report_carries_the_plain_alembic_flag_only_when_true() -> None:
    assert parse(report()).plain_alembic is False  # type: ignore[attr-defined]
    assert parse(report(plain_alembic=True)).plain_alembic is True  # type: ignore[attr-defined]
    assert parse(report(plain_alembic="yes")).plain_alembic is False  # type: ignore[attr-defined]
