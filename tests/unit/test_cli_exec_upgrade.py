"""Pure parts of agentctl exec and upgrade: parsing, the exec environment, plan and refusals."""

from __future__ import annotations

import io
from dataclasses import replace
from typing import Any

import pytest

from agent.cli.main import build_parser
from agent.context import AppContext
from agent.errors import AccessDenied
from agent.execstart import LaunchSpec
from agent.model import UnitProperties
from agent.snapshot import CheckRun, MigrationState, UnitSnapshot
from agent.cli.unitexec import (
    ExecError,
    GunicornConfigError,
    apply_gunicorn_config,
    plan_exec,
    prepend_path,
    unit_environment,
)
from agent.privileged.probe_runner import Identity, ResolvedConfig
from agent.cli.upgrade import (
    Decision,
    Upgrader,
    UpgradeError,
    UpgradeOptions,
    decide,
    flask_app_value,
    render_plan,
)

WWW = Identity("www-data", 33, 33, (33,), "/var/www", "/usr/sbin/nologin")
OK_CHECKS = tuple(CheckRun(n, True, 0.01) for n in ("unit", "app_load", "database",
                                                    "migrations"))


def make_ctx(env: dict[str, str] | None = None, **kw: Any) -> AppContext:
    """An AppContext with plain defaults."""
    launch = LaunchSpec(argv=("/srv/venv/bin/gunicorn", "wsgi:app"), runs_gunicorn=True,
                        app_spec=kw.pop("app_spec", "wsgi:app"), chdir=kw.pop("chdir", ""),
                        gunicorn_env=tuple(kw.pop("gunicorn_env", ())))
    fields: dict[str, Any] = dict(
        unit="gunicorn.service", user="www-data", group="www-data", supplementary_groups=(),
        working_directory="/srv/app", working_directory_optional=False, exec_start=(),
        launch=launch, venv="/srv/venv", venv_source="", python="/srv/venv/bin/python3",
        environment=env or {}, environment_sources={}, environment_files=(), main_pid=0)
    fields.update(kw)
    return AppContext(**fields)


def snap(migrations: MigrationState | None, **kw: Any) -> UnitSnapshot:
    """A UnitSnapshot of gunicorn.service with all essential checks passed."""
    fields: dict[str, Any] = dict(unit="gunicorn.service", timestamp=0.0, unit_up=True,
                                  database="db:5432/app", migrations=migrations,
                                  checks=OK_CHECKS, main_pid=100)
    fields.update(kw)
    return UnitSnapshot(**fields)


def no_config(ctx: AppContext, allow_root: bool) -> None:
    """A resolver for units without gunicorn's own configuration (today's behaviour)."""
    return None


AT_R2 = MigrationState(True, current=("r2",), heads=("r3",), pending=("r3",))
AT_HEAD = MigrationState(True, current=("r3",), heads=("r3",))


# -- parsing -------------------------------------------------------------------------------

def test_exec_takes_everything_after_the_double_dash() -> None:
    args = build_parser().parse_args(["exec", "gunicorn", "--", "flask", "db", "upgrade",
                                      "--sql"])
    assert (args.command, args.unit, args.cmd) == ("exec", "gunicorn",
                                                   ["flask", "db", "upgrade", "--sql"])


def test_upgrade_and_status_flags() -> None:
    args = build_parser().parse_args(["upgrade", "gunicorn", "--restart", "-y"])
    assert (args.restart, args.yes, args.restart_timeout) == (True, True, 60.0)
    args = build_parser().parse_args(["status", "--web.listen-address", ":9999", "--json"])
    assert (args.unit, args.listen_address, args.json, args.timeout) == (None, ":9999", True,
                                                                          6.0)


# -- exec environment and privileges ------------------------------------------------------

def test_exec_env_has_venv_first_and_no_read_only_session() -> None:
    env = unit_environment(make_ctx({"DATABASE_URL": "postgresql://a:pw@db/app",
                                     "PATH": "/usr/bin:/bin"}), WWW)
    assert env["PATH"] == "/srv/venv/bin:/usr/bin:/bin"
    assert env["DATABASE_URL"] == "postgresql://a:pw@db/app"
    assert env["USER"] == "www-data" and env["HOME"] == "/var/www"
    for probe_only in ("PGOPTIONS", "PGAPPNAME", "PGCONNECT_TIMEOUT"):
        assert probe_only not in env


def test_exec_env_keeps_the_units_own_pgoptions() -> None:
    env = unit_environment(make_ctx({"PGOPTIONS": "-c search_path=app"},
                                    gunicorn_env=("PGAPPNAME=site",)), WWW)
    assert env["PGOPTIONS"] == "-c search_path=app" and env["PGAPPNAME"] == "site"


def test_exec_plan_uses_gunicorn_chdir_and_drops_to_the_unit_user() -> None:
    plan = plan_exec(make_ctx(chdir="/srv/app/src"), ["id"], euid=0, resolve=no_config)
    assert plan.cwd == "/srv/app/src"
    assert plan.drop["user"] == 33 and plan.drop["group"] == 33
    # already the unit's user
    assert plan_exec(make_ctx(), ["id"], euid=33, resolve=no_config).drop == {}


def test_exec_as_another_user_is_refused_clearly() -> None:
    with pytest.raises(AccessDenied, match=r"runs as User=www-data \(uid 33\) and you are "
                                           r"uid 1000: run agentctl as root"):
        plan_exec(make_ctx(), ["id"], euid=1000)


def test_exec_without_command_and_with_missing_user() -> None:
    with pytest.raises(ExecError, match="no command given"):
        plan_exec(make_ctx(), [], euid=0)
    with pytest.raises(ExecError, match="User=nosuchuser-dw does not exist"):
        plan_exec(make_ctx(user="nosuchuser-dw"), ["id"], euid=0)


def test_exec_plan_scrubs_secrets() -> None:
    plan = plan_exec(make_ctx({"SECRET_KEY": "sekrit-value",
                               "DATABASE_URL": "postgresql://a:hunter22@db/app"}), ["x"], 0,
                     resolve=no_config)
    text = plan.scrub("boom postgresql://a:hunter22@db/app sekrit-value hunter22")
    assert "hunter22" not in text and "sekrit-value" not in text


# -- gunicorn's own configuration (config file raw_env, chdir, pythonpath) -------------------

def test_raw_env_goes_over_the_unit_env_and_execstart_e() -> None:
    base = {"PATH": "/srv/venv/bin:/usr/bin", "DATABASE_URL": "postgresql://old@db/a",
            "KEEP": "1"}
    resolved = ResolvedConfig(config_source="gunicorn config", chdir="/srv/app/src",
                              raw_env={"DATABASE_URL": "postgresql://u:pw12@db/b", "NEW": "2"})
    env, cwd = apply_gunicorn_config(base, "/srv/app", resolved)
    assert env == {"PATH": "/srv/venv/bin:/usr/bin", "DATABASE_URL": "postgresql://u:pw12@db/b",
                   "KEEP": "1", "NEW": "2"}
    assert cwd == "/srv/app/src"
    assert base["DATABASE_URL"] == "postgresql://old@db/a"  # the input is not changed


def test_pythonpath_entries_go_first_on_pythonpath_in_gunicorns_order() -> None:
    resolved = ResolvedConfig(config_source="gunicorn config", chdir="/srv/app",
                              pythonpath=("/srv/lib", "/srv/app/src"))
    env, _ = apply_gunicorn_config({"PYTHONPATH": "/opt/x:/srv/lib"}, "/", resolved)
    assert env["PYTHONPATH"] == "/srv/lib:/srv/app/src:/opt/x"
    env, _ = apply_gunicorn_config({}, "/", resolved)
    assert env["PYTHONPATH"] == "/srv/lib:/srv/app/src"
    assert prepend_path("", ()) == "" and prepend_path("/a::/b", ("/b",)) == "/b:/a"


@pytest.mark.parametrize("resolved", [
    None,  # not gunicorn, or no interpreter known
    ResolvedConfig(config_source="ExecStart", chdir="/elsewhere"),  # gunicorn not importable
])
def test_without_gunicorns_own_resolution_env_and_cwd_stand(
        resolved: ResolvedConfig | None) -> None:
    env, cwd = apply_gunicorn_config({"A": "1"}, "/srv/app", resolved)
    assert (env, cwd) == ({"A": "1"}, "/srv/app")
    plan = plan_exec(make_ctx({"A": "1"}, chdir="/srv/app/src"), ["id"], 0,
                     resolve=lambda ctx, root: resolved)
    assert (plan.cwd, plan.env["A"], plan.config_source, plan.app_uri) == (
        "/srv/app/src", "1", "ExecStart", "wsgi:app")
    assert "PYTHONPATH" not in plan.env


def test_exec_plan_applies_the_config_file_and_masks_its_secrets() -> None:
    asked: list[bool] = []
    resolved = ResolvedConfig(config_source="gunicorn config", chdir="/srv/site",
                              pythonpath=("/srv/lib",), app_uri="site:app",
                              raw_env={"DATABASE_URL": "postgresql://u:hunter22@db/app",
                                       "API_TOKEN": "tok-123456"})
    plan = plan_exec(make_ctx({"DATABASE_URL": "postgresql://unit@db/old"}), ["x"], 0,
                     resolve=lambda ctx, root: asked.append(root) or resolved)
    assert asked == [False]  # www-data: the config file runs as www-data, not root
    assert (plan.cwd, plan.app_uri, plan.config_source) == ("/srv/site", "site:app",
                                                            "gunicorn config")
    assert plan.env["DATABASE_URL"] == "postgresql://u:hunter22@db/app"
    assert plan.env["PYTHONPATH"] == "/srv/lib" and plan.env["PATH"].startswith("/srv/venv/bin")
    text = plan.scrub("hunter22 tok-123456")
    assert "hunter22" not in text and "tok-123456" not in text
    assert "hunter22" not in repr(plan) and "hunter22" not in repr(resolved)
    assert "tok-123456" not in str(resolved.as_dict())
    assert resolved.as_dict()["raw_env_names"] == ["API_TOKEN", "DATABASE_URL"]
    root = plan_exec(make_ctx(user=""), ["x"], 0,
                     resolve=lambda ctx, allow_root: asked.append(allow_root) or None)
    assert asked[-1] is True and root.user == "root"  # a root unit's config runs as root


def test_broken_config_is_one_line_exec_error_125() -> None:
    broken = ResolvedConfig(error="gunicorn config /etc/g.py failed: NameError: name 'x' is "
                                  "not defined (at /etc/g.py line 2)")
    with pytest.raises(GunicornConfigError) as err:
        plan_exec(make_ctx(), ["x"], 0, resolve=lambda ctx, root: broken)
    assert err.value.exit_code == 125 and "\n" not in str(err.value)
    assert str(err.value) == f"gunicorn.service: {broken.error}"


def test_broken_config_stops_upgrade_with_exit_2(monkeypatch: pytest.MonkeyPatch) -> None:
    import agent.cli.upgrade as upgrade_mod

    monkeypatch.setattr(upgrade_mod, "inspect_unit",
                        lambda systemd, name: type("I", (), {"context": make_ctx()})())
    up, systemd, _ = upgrader(snap(AT_R2), assume_yes=True, restart=True,
                              resolve=lambda ctx, root: ResolvedConfig(error="gunicorn config "
                                                                       "/etc/g.py failed: boom"))
    with pytest.raises(UpgradeError) as err:
        up.run()
    assert err.value.exit_code == 2 and systemd.restarts == []
    assert str(err.value) == ("gunicorn.service: gunicorn config /etc/g.py failed: boom; "
                              "nothing changed")


# -- FLASK_APP --------------------------------------------------------------------------------

def test_flask_app_from_unit_env_else_gunicorn_spec() -> None:
    assert flask_app_value(make_ctx({"FLASK_APP": "site.py"})) == "site.py"
    assert flask_app_value(make_ctx(gunicorn_env=("FLASK_APP=g.py",))) == "g.py"
    assert flask_app_value(make_ctx(app_spec="app:create_app()")) == "app:create_app()"
    with pytest.raises(UpgradeError, match="FLASK_APP is unset"):
        flask_app_value(make_ctx(app_spec=""))


def test_flask_app_from_the_plan_env_then_gunicorns_app() -> None:
    ctx = make_ctx({"FLASK_APP": "unit.py"}, app_spec="")
    # raw_env's FLASK_APP is already over the unit's in the plan's environment.
    assert flask_app_value(ctx, {"FLASK_APP": "conf.py"}, "site:app") == "conf.py"
    assert flask_app_value(make_ctx(app_spec=""), {}, "site:app") == "site:app"  # wsgi_app
    with pytest.raises(UpgradeError, match="FLASK_APP is unset"):
        flask_app_value(make_ctx(), {}, "")  # gunicorn resolved no app at all


# -- decision ----------------------------------------------------------------------------------

def test_one_pending_is_an_upgrade() -> None:
    assert decide(snap(AT_R2)) == Decision("upgrade", pending=("r3",), target="r3")


def test_at_head_is_nothing_to_do() -> None:
    d = decide(snap(AT_HEAD))
    assert (d.action, d.exit_code) == ("nothing", 0)
    assert d.reason == "db:5432/app is at head r3; nothing to upgrade"


@pytest.mark.parametrize("state,code,words", [
    (replace(AT_R2, heads=("r3", "r3b"), multiple_heads=True), 1, "2 migration heads (r3, r3b)"),
    (replace(AT_R2, current=("r9",), unknown=("r9",), pending=()), 1,
     "at revision r9, which the deployed code does not know"),
    (replace(AT_R2, in_progress=True), 1, "a migration is already running on db:5432/app"),
    (MigrationState(True), 1, "has no migration revisions"),
    (None, 2, "migration state of gunicorn.service is unknown"),
])
def test_refusals(state: MigrationState | None, code: int, words: str) -> None:
    d = decide(snap(state))
    assert (d.action, d.exit_code) == ("refuse", code)
    assert words in d.reason


def test_failed_essential_check_refuses_with_its_error() -> None:
    checks = (CheckRun("unit", True, 0), CheckRun("database", False, 0, "connection refused"))
    d = decide(snap(AT_R2, checks=checks))
    assert (d.action, d.exit_code) == ("refuse", 2)
    assert d.reason == "cannot inspect gunicorn.service (database): connection refused"


def test_missing_version_table_upgrades_with_a_warning() -> None:
    d = decide(snap(MigrationState(False, heads=("r2",), pending=("r1", "r2"))))
    assert d.action == "upgrade" and "no alembic_version table" in d.warnings[0]


def test_plan_lists_revisions_in_order() -> None:
    state = MigrationState(True, current=("r1",), heads=("r3",), pending=("r2", "r3"))
    text = render_plan(snap(state), decide(snap(state)), restart=True)
    assert text == ("Upgrade plan for gunicorn.service:\n"
                    "  database:  db:5432/app\n"
                    "  current:   r1\n"
                    "  head:      r3\n"
                    "  pending:   2 revision(s), applied in this order:\n"
                    "    1. r2\n"
                    "    2. r3\n"
                    "  target:    r3 (pinned: flask db upgrade r3; refused if the revisions "
                    "change before it runs)\n"
                    "  then:      restart gunicorn.service\n")


# -- the sequence, with fakes -------------------------------------------------------------

class FakeSystemd:
    """Restarts give a new MainPID at once."""

    def __init__(self) -> None:
        self.restarts: list[str] = []

    def restart_unit(self, name: str) -> str:
        self.restarts.append(name)
        return "/job/1"

    def read_unit(self, name: str) -> UnitProperties:
        return UnitProperties(name, "loaded", "active", "running",
                              main_pid=200 if self.restarts else 100)


def upgrader(unit: UnitSnapshot, confirm: Any = None, resolve: Any = None,
             **opts: Any) -> tuple[Upgrader, FakeSystemd, io.StringIO]:
    systemd, out = FakeSystemd(), io.StringIO()
    return Upgrader(UpgradeOptions("gunicorn.service", **opts), systemd,  # type: ignore[arg-type]
                    lambda name: unit, confirm, out, euid=0, resolve=resolve,
                    tool="flask db upgrade"), systemd, out


def test_without_terminal_and_yes_nothing_runs() -> None:
    up, systemd, out = upgrader(snap(AT_R2), restart=True)
    with pytest.raises(UpgradeError, match="no terminal to ask on; pass --yes") as err:
        up.run()
    assert err.value.exit_code == 2 and systemd.restarts == []
    assert "1. r3" in out.getvalue()


def test_answering_no_changes_nothing() -> None:
    asked: list[str] = []
    up, systemd, _ = upgrader(snap(AT_R2), confirm=lambda p: asked.append(p) or False)
    with pytest.raises(UpgradeError, match="not confirmed; nothing changed"):
        up.run()
    assert asked == ["Apply these migrations to the database of gunicorn.service? [y/N] "]


def test_refusal_is_one_line_with_its_exit_code() -> None:
    up, _, _ = upgrader(snap(replace(AT_R2, in_progress=True)), assume_yes=True)
    with pytest.raises(UpgradeError) as err:
        up.run()
    assert err.value.exit_code == 1 and "\n" not in str(err.value)


def test_nothing_pending_restarts_only_when_needed() -> None:
    up, systemd, out = upgrader(snap(AT_HEAD), restart=True)
    assert up.run() == 0 and systemd.restarts == []
    up, systemd, out = upgrader(snap(AT_HEAD, needs_restart=True), restart=True)
    assert up.run() == 0 and systemd.restarts == ["gunicorn.service"]
    assert "restarted, active with MainPID 200 (was 100)" in out.getvalue()


# -- pinned target, re-check, lock and timeouts ---------------------------------------------

AT_R1 = MigrationState(True, current=("r1",), heads=("r3",), pending=("r2", "r3"))


def test_target_is_the_head_shown_or_a_pending_revision() -> None:
    assert decide(snap(AT_R1)).target == "r3"  # never "head" or "heads"
    d = decide(snap(AT_R1), "r2")
    assert (d.action, d.pending, d.target) == ("upgrade", ("r2",), "r2")
    assert decide(snap(AT_R1), "r1").action == "nothing"  # already there
    d = decide(snap(AT_R1), "r9")
    assert (d.action, d.exit_code) == ("refuse", 1)
    assert d.reason == "r9 is not a pending revision of gunicorn.service (pending: r2, r3; head r3)"


def test_revisions_changed_after_the_plan_was_shown_refuses() -> None:
    # A deploy added r4 while the admin read the plan: r3 was confirmed, not r4.
    shown, later = snap(AT_R2), snap(replace(AT_R2, heads=("r4",), pending=("r3", "r4")))
    seen = iter([shown, later])
    systemd, out = FakeSystemd(), io.StringIO()
    up = Upgrader(UpgradeOptions("gunicorn.service", assume_yes=True, restart=True),
                  systemd, lambda name: next(seen), None, out, euid=0,  # type: ignore[arg-type]
                  tool="flask db upgrade")
    with pytest.raises(UpgradeError) as err:
        up.run()
    assert err.value.exit_code == 1 and systemd.restarts == []
    assert str(err.value) == (
        "refusing to upgrade gunicorn.service: its migrations changed since the plan was "
        "shown (then heads r3, current r2; now heads r4, current r2); nothing changed: run "
        "agentctl upgrade again")


def test_upgrade_cli_options() -> None:
    args = build_parser().parse_args(["upgrade", "gunicorn", "r3", "--lock-timeout", "0.5",
                                      "--lock-retries", "2", "--timeout", "30"])
    assert (args.rev, args.lock_timeout, args.lock_retries, args.timeout) == ("r3", 0.5, 2, 30)
    defaults = build_parser().parse_args(["upgrade", "gunicorn"])
    assert defaults.rev == "" and (defaults.lock_timeout, defaults.lock_retries,
                                   defaults.timeout) == (None, None, None)  # -> agent.toml
    for bad in (["--lock-timeout", "nan"], ["--timeout", "inf"], ["--timeout", "0"],
                ["--lock-retries", "1000"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["upgrade", "gunicorn", *bad])


def test_child_reports_and_pgoptions() -> None:
    from agent.cli.upgrade import child_event, describe_holders, with_lock_timeout

    assert with_lock_timeout("", 5000) == "-c lock_timeout=5000"
    assert with_lock_timeout("-c search_path=app ", 250) == \
        "-c search_path=app -c lock_timeout=250"
    assert child_event('driftwatch-upgrade:{"kind": "locked", "holders": []}') == {
        "kind": "locked", "holders": []}
    assert child_event("driftwatch-upgrade:not json") is None
    assert child_event("INFO  [alembic] Running upgrade r2 -> r3") is None
    assert describe_holders([{"pid": 42, "application_name": "deploy", "user": "app",
                              "since": "2026-11-29T20:00:00+00:00"}]) == (
        "held by pid 42 (application_name 'deploy', user app, since 2026-11-29T20:00:00+00:00)")


def test_child_helpers_are_pure() -> None:
    from agent.asuser import upgrade_child as child

    assert [child.to_ms(v) for v in ("5s", "250ms", "1min", "0", "2h")] == [
        5000, 250, 60000, 0, 7200000]

    class PgError(Exception):
        pgcode = "55P03"

    wrapped = RuntimeError("sqlalchemy said")
    wrapped.__cause__ = PgError()
    assert child.sqlstate(wrapped) == "55P03"
    assert child.sqlstate(ValueError("x")) == ""


def test_upgrade_bounds_from_agent_toml() -> None:
    from agent.cli.main import pick
    from agent.config import Config, parse_config
    from agent.errors import ConfigError

    config = parse_config("[agent]\nupgrade_lock_timeout_seconds = 0.25\n"
                          "upgrade_lock_retries = 0\nupgrade_timeout_seconds = 90\n")
    assert (config.upgrade_lock_timeout_seconds, config.upgrade_lock_retries,
            config.upgrade_timeout_seconds) == (0.25, 0, 90)
    assert (Config().upgrade_lock_timeout_seconds, Config().upgrade_lock_retries,
            Config().upgrade_timeout_seconds) == (5.0, 3, 600.0)
    assert pick(None, 0.25) == 0.25 and pick(2.0, 0.25) == 2.0
    for bad, words in (("upgrade_lock_timeout_seconds = nan", "finite number above 0"),
                       ("upgrade_timeout_seconds = inf", "finite number above 0"),
                       ("upgrade_timeout_seconds = 0", "finite number above 0"),
                       ("upgrade_lock_retries = 101", "between 0 and 100"),
                       ("upgrade_lock_retries = 1.5", "must be a whole number")):
        with pytest.raises(ConfigError, match=words):
            parse_config(f"[agent]\n{bad}\n", "agent.toml")
