"""Pure unit checks with literal inputs."""

from __future__ import annotations

from agent.checks.unit import UnitFacts, stale_variables, unit_findings
from agent.context import ContextInputs, build_context
from agent.model import ExecCommand, ProcessInfo, UnitProperties

VENV = "/srv/app/venv"


def props(**overrides: object) -> UnitProperties:
    base: dict[str, object] = dict(
        name="gunicorn.service", load_state="loaded", active_state="active",
        sub_state="running", environment=("FLASK_APP=wsgi.py",),
        environment_files=(("/etc/app.env", False),), working_directory="/srv/app",
        exec_start=(ExecCommand(f"{VENV}/bin/gunicorn",
                                (f"{VENV}/bin/gunicorn", "wsgi:app")),),
        user="www-data", group="www-data", main_pid=10, exec_main_start_timestamp=1000.0)
    base.update(overrides)
    return UnitProperties(**base)  # type: ignore[arg-type]


def proc(pid: int, role: str, **overrides: object) -> ProcessInfo:
    base: dict[str, object] = dict(
        pid=pid, ppid=1 if role == "master" else 10, role=role,
        argv=(f"{VENV}/bin/python3", f"{VENV}/bin/gunicorn", "wsgi:app"), exe="/usr/bin/python3.11",
        cwd="/srv/app", create_time=1000.0, username="www-data",
        environ={"FLASK_APP": "wsgi.py", "DATABASE_URL": "postgresql://a@b/c", "PATH": "/bin",
                 "INVOCATION_ID": "x"}, venv=VENV, venv_evidence="argv[0]")
    base.update(overrides)
    return ProcessInfo(**base)  # type: ignore[arg-type]


INPUTS = ContextInputs(env_files={"/etc/app.env": b"DATABASE_URL=postgresql://a@b/c\n"},
                       venvs={VENV: True})
FACTS = UnitFacts(realpaths={"/srv/app": "/srv/app", VENV: VENV},
                  newest_code=("/srv/app/app/models.py", 900.0), now=2000.0)


def checks_of(p: UnitProperties, procs: list[ProcessInfo], facts: UnitFacts = FACTS,
              inputs: ContextInputs = INPUTS) -> list[str]:
    ctx = build_context(p, inputs)
    return [f.check for f in unit_findings(p, ctx, procs, facts)]


def test_healthy_unit_has_no_findings() -> None:
    assert checks_of(props(), [proc(10, "master"), proc(11, "worker")]) == []


def test_needs_daemon_reload() -> None:
    assert checks_of(props(need_daemon_reload=True), [proc(10, "master")]) == \
        ["needs_daemon_reload"]


def test_failed_and_inactive() -> None:
    assert checks_of(props(active_state="failed", sub_state="failed", main_pid=0), []) == \
        ["unit_failed"]
    assert checks_of(props(active_state="inactive", sub_state="dead", main_pid=0), []) == \
        ["unit_not_active"]


def test_missing_required_env_file_but_not_optional_one() -> None:
    missing = ContextInputs(env_files={}, venvs={VENV: True})
    assert "env_file_missing" in checks_of(props(), [proc(10, "master")], inputs=missing)
    optional = props(environment_files=(("/etc/app.env", True),))
    assert "env_file_missing" not in checks_of(optional, [proc(10, "master")], inputs=missing)


def test_stale_environment_names_only() -> None:
    changed, added, removed = stale_variables(
        {"A": "1", "B": "2", "C": "3"}, {"A": "1", "B": "old", "D": "4", "PATH": "/bin"})
    assert (changed, added, removed) == (["B"], ["C"], ["D"])
    master = proc(10, "master", environ={"FLASK_APP": "wsgi.py",
                                         "DATABASE_URL": "postgresql://old@b/c"})
    ctx = build_context(props(), INPUTS)
    findings = unit_findings(props(), ctx, [master], FACTS)
    assert [f.check for f in findings] == ["environment_stale"]
    assert "DATABASE_URL" in findings[0].message
    assert "old@b" not in findings[0].message  # never a value


def test_venv_mismatch_for_a_worker() -> None:
    procs = [proc(10, "master"), proc(11, "worker", venv="/srv/app/venv-old")]
    assert checks_of(props(), procs) == ["venv_mismatch"]


def test_cwd_of_a_switched_current_symlink() -> None:
    p = props(working_directory="/srv/current")
    facts = UnitFacts(realpaths={"/srv/current": "/srv/releases/2", VENV: VENV},
                      newest_code=None, now=2000.0)
    procs = [proc(10, "master", cwd="/srv/releases/1")]
    assert checks_of(p, procs, facts) == ["cwd_stale"]


def test_code_newer_than_the_process() -> None:
    facts = UnitFacts(realpaths=FACTS.realpaths, newest_code=("/srv/app/migrations/x.py", 1500.0),
                      now=2000.0)
    assert checks_of(props(), [proc(10, "master")], facts) == ["code_newer_than_process"]


def test_env_file_systemd_refuses_as_a_whole() -> None:
    bad = ContextInputs(env_files={"/etc/app.env": b"A=1\nB=\xff\n"}, venvs={VENV: True})
    ctx = build_context(props(), bad)
    assert "A" not in ctx.environment  # the lines before the bad one are not applied either
    found = unit_findings(props(), ctx, [], FACTS)
    assert [f.check for f in found] == ["env_file_invalid"]
    assert found[0].severity == "critical" and "invalid UTF-8" in found[0].message
    optional = props(environment_files=(("/etc/app.env", True),))
    found = unit_findings(optional, build_context(optional, bad), [], FACTS)
    assert [(f.check, f.severity) for f in found] == [("env_file_invalid", "warning")]


def test_a_shell_wrappers_own_variables_are_not_stale() -> None:
    wrapped = props(exec_start=(ExecCommand("/bin/sh", (
        "/bin/sh", "-c", f". {VENV}/bin/activate && exec gunicorn wsgi:app")),))
    env = {"FLASK_APP": "wsgi.py", "DATABASE_URL": "postgresql://a@b/c", "PWD": "/srv/app",
           "SHLVL": "1", "VIRTUAL_ENV": VENV, "PS1": "(venv) "}
    assert checks_of(wrapped, [proc(10, "master", environ=env)]) == []
    # Without a shell wrapper the same names are really left over from an older unit.
    assert checks_of(props(), [proc(10, "master", environ=env)]) == ["environment_stale"]
