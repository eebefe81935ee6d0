"""Crash loops and missing ExecStart programs are named for what they are (#8 point 8)."""

from __future__ import annotations

from agent.checks.unit import UnitFacts, unit_findings
from agent.context import ContextInputs, build_context
from agent.model import ExecCommand, Finding, UnitProperties

UNIT = "gunicorn.service"
VENV = "/srv/venv"
GUNICORN = f"{VENV}/bin/gunicorn"


def props(**overrides: object) -> UnitProperties:
    base: dict[str, object] = dict(
        name=UNIT, load_state="loaded", active_state="active", sub_state="running",
        exec_start=(ExecCommand(GUNICORN, (GUNICORN, "wsgi:app")),), main_pid=10)
    base.update(overrides)
    return UnitProperties(**base)  # type: ignore[arg-type]


EXISTING = {GUNICORN: True, f"{VENV}/bin/python3": True}


def found(p: UnitProperties, facts: UnitFacts | None = None,
          shebangs: dict[str, str] | None = None) -> list[Finding]:
    inputs = ContextInputs(venvs={VENV: True}, shebangs=shebangs or {})
    facts = facts or UnitFacts(exists=EXISTING, now=0.0)
    return unit_findings(p, build_context(p, inputs), [], facts)


def names(findings: list[Finding]) -> list[str]:
    return [f.check for f in findings]


def test_auto_restart_is_a_crash_loop_not_just_inactive() -> None:
    (f,) = found(props(active_state="activating", sub_state="auto-restart", result="exit-code",
                       n_restarts=7, main_pid=0))
    assert (f.check, f.severity) == ("unit_crash_loop", "critical")
    assert f.message == (f"{UNIT} is crash-looping: its main process exited (exit-code) and "
                         "systemd restarts it again and again (7 automatic restart(s) so far)")
    assert f.remedy == (f"journalctl -u {UNIT} -n 100 (the same error on every start); fix the "
                        f"cause, then systemctl restart {UNIT}")


def test_start_limit_hit_after_restarts_is_a_crash_loop() -> None:
    (f,) = found(props(active_state="failed", sub_state="failed", result="start-limit-hit",
                       n_restarts=5, main_pid=0))
    assert (f.check, f.severity) == ("unit_crash_loop", "critical")
    assert "gave up after 5 automatic restart(s) (start-limit-hit)" in f.message


def test_rising_restart_count_between_inspections() -> None:
    facts = UnitFacts(exists=EXISTING, previous_restarts=3, now=0.0)
    (f,) = found(props(n_restarts=5), facts)
    assert (f.check, f.severity) == ("unit_crash_loop", "critical")
    assert "restarted 2 time(s) since the last inspection (5 in all)" in f.message
    # Same count as last time, or no previous inspection: a past crash is not a loop.
    assert found(props(n_restarts=5), UnitFacts(exists=EXISTING, previous_restarts=5,
                                                  now=0.0)) == []
    assert found(props(n_restarts=5)) == []


def test_plain_failure_and_stop_keep_their_names() -> None:
    assert names(found(props(active_state="failed", sub_state="failed", result="exit-code",
                             main_pid=0))) == ["unit_failed"]
    assert names(found(props(active_state="inactive", sub_state="dead", main_pid=0))) == \
        ["unit_not_active"]


def test_missing_exec_start_program() -> None:
    facts = UnitFacts(exists={GUNICORN: False}, now=0.0)
    (f,) = found(props(active_state="failed", sub_state="failed", result="exit-code",
                       main_pid=0), facts)[1:]
    assert (f.check, f.severity) == ("exec_start_missing", "critical")
    assert f.message == (f"ExecStart program {GUNICORN} of {UNIT} does not exist: the unit "
                         "cannot start (status=203/EXEC)")
    assert f.remedy == (f"restore {GUNICORN} (was the virtualenv rebuilt or removed?) or fix "
                        f"ExecStart= of {UNIT}")


def test_missing_interpreter_of_the_script() -> None:
    # The venv's python3 is a link to a system Python that was removed.
    facts = UnitFacts(exists={GUNICORN: True, f"{VENV}/bin/python3": False}, now=0.0)
    (f,) = found(props(), facts, shebangs={GUNICORN: f"{VENV}/bin/python3"})
    assert (f.check, f.severity) == ("exec_start_missing", "critical")
    assert f.message == (f"the Python interpreter {VENV}/bin/python3 of {GUNICORN} "
                         f"({UNIT}'s ExecStart) does not exist (a dangling venv link?): the "
                         "unit cannot start (status=203/EXEC)")
    assert f.remedy == f"recreate the virtualenv of {GUNICORN} or fix ExecStart= of {UNIT}"


def test_existing_or_unknown_programs_are_not_missing() -> None:
    assert found(props()) == []
    assert found(props(), UnitFacts(now=0.0)) == []  # nothing known: nothing claimed
    ignored = props(exec_start=(ExecCommand("/no/such", ("/no/such",)),), )
    assert found(ignored, UnitFacts(exists={"/no/such": True}, now=0.0)) == []


# -- a first look (one-shot agentctl) at a unit up between two automatic restarts ----------
def up(n_restarts: int, age: float, restart_sec: float = 4.0, **overrides: object
       ) -> list[Finding]:
    """The unit up (running) for AGE seconds after NRestarts automatic restarts, first look."""
    p = props(n_restarts=n_restarts, restart_sec=restart_sec,
              exec_main_start_timestamp=1000.0, **overrides)
    return found(p, UnitFacts(exists=EXISTING, now=1000.0 + age))


def test_first_look_up_briefly_after_many_automatic_restarts_is_a_loop() -> None:
    (f,) = up(5, 2.4)
    assert (f.check, f.severity) == ("unit_crash_loop", "critical")
    assert f.message == (f"{UNIT} is crash-looping: systemd restarted it 5 time(s) since it "
                         "was last started by hand, the latest 2s ago (up between two "
                         "restarts)")
    assert names(up(3, 11.9)) == ["unit_crash_loop"]            # 3 x RestartSec=4 s
    assert names(up(3, 0.0, active_state="activating", sub_state="start")) == \
        ["unit_crash_loop"]


def test_a_unit_restarted_by_hand_is_no_loop() -> None:
    # A start or restart by hand sets NRestarts to 0 (seen on systemd 252): however young.
    assert up(0, 1.0) == []
    # Fewer than three automatic restarts: a crash or two, not a loop.
    assert up(2, 1.0) == []


def test_a_unit_that_crashed_long_ago_is_no_loop() -> None:
    assert up(9, 3600.0) == []
    assert up(3, 12.0) == []                                     # past 3 x RestartSec
    # The window has a floor (the app's own start-up time) and a ceiling.
    assert names(up(3, 9.0, restart_sec=0.1)) == ["unit_crash_loop"]
    assert up(3, 10.0, restart_sec=0.1) == []
    assert names(up(3, 59.0, restart_sec=3600.0)) == ["unit_crash_loop"]
    assert up(3, 60.0, restart_sec=3600.0) == []


def test_no_start_time_a_stopped_unit_or_a_clock_step_is_no_loop() -> None:
    p = props(n_restarts=5, restart_sec=4.0)                     # start time unknown
    assert found(p, UnitFacts(exists=EXISTING, now=1000.0)) == []
    assert names(up(5, 1.0, active_state="inactive", sub_state="dead")) == ["unit_not_active"]
    assert up(5, -30.0) == [] and up(5, -1.5) == []
    assert names(up(5, -1.0)) == ["unit_crash_loop"]  # a second of slack between clocks


def test_the_daemon_with_a_remembered_count_keeps_its_own_rule() -> None:
    p = props(n_restarts=5, restart_sec=4.0, exec_main_start_timestamp=1000.0)
    # Same count as at the last inspection: no new restart, so no loop, however young.
    assert found(p, UnitFacts(exists=EXISTING, previous_restarts=5, now=1001.0)) == []
