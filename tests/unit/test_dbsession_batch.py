"""The session child's one statement loop (agent/asuser/dbsession.py answer_requests): single
statements and batches, a refusal inside a batch, the one-statement rule in a batch."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from agent.asuser import dbsession


class GuardError(Exception):
    """Stands in for readonly.py's ReadOnlyGuardError."""


def serve(requests: list[Any], refuse: str = "") -> tuple[list[Any], list[str]]:
    """Run answer_requests over request lines; (answer lines, what happened in order)."""
    happened: list[str] = []

    def run(sql: str, params: dict[str, Any]) -> list[list[Any]]:
        happened.append(f"guard {sql}")
        if sql == refuse:
            raise GuardError("driftwatch read-only guard: refusing")
        happened.append(f"run {sql}")
        return [[sql, params.get("x")]]

    r, w = os.pipe()
    try:
        lines = [json.dumps(q).encode() for q in requests]
        dbsession.answer_requests(iter(lines), w, run,
                                  lambda exc: {"error": str(exc), "sqlstate": ""},
                                  lambda: happened.append("rollback"))
        os.close(w)
        w = -1
        with os.fdopen(r, "rb") as out:
            r = -1
            return [json.loads(line) for line in out.read().splitlines()], happened
    finally:
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)


def test_single_statements_each_in_their_own_transaction() -> None:
    answers, happened = serve([{"sql": "A", "params": {"x": 1}}, {"sql": "B"}])
    assert answers == [{"rows": [["A", 1]]}, {"rows": [["B", None]]}]
    assert happened == ["guard A", "run A", "rollback", "guard B", "run B", "rollback"]


def test_a_batch_is_one_transaction_guarded_before_every_statement_and_one_line() -> None:
    answers, happened = serve([{"batch": [{"sql": "A", "params": {"x": 1}}, {"sql": "B"},
                                          {"sql": "C"}]}])
    assert answers == [{"results": [{"rows": [["A", 1]]}, {"rows": [["B", None]]},
                                    {"rows": [["C", None]]}]}]
    assert happened == ["guard A", "run A", "guard B", "run B", "guard C", "run C",
                        "rollback"]


def test_a_flushed_statement_is_answered_before_the_rest() -> None:
    answers, _ = serve([{"batch": [{"sql": "SELECT 1", "flush": True}, {"sql": "B"}]}])
    assert answers == [{"results": [{"rows": [["SELECT 1", None]]}]},
                       {"results": [{"rows": [["B", None]]}]}]


def test_a_guard_refusal_inside_a_batch_ends_it_cleanly() -> None:
    """The refused statement's answer is the batch's last; nothing after it runs; the
    transaction is rolled back; the next request is served as usual."""
    answers, happened = serve([{"batch": [{"sql": "A"}, {"sql": "B"}, {"sql": "C"}]},
                               {"sql": "D"}], refuse="B")
    assert answers == [{"results": [{"rows": [["A", None]]},
                                    {"error": "driftwatch read-only guard: refusing",
                                     "sqlstate": ""}]},
                       {"rows": [["D", None]]}]
    assert happened == ["guard A", "run A", "guard B", "rollback", "guard D", "run D",
                        "rollback"]


def test_two_statements_in_one_string_are_refused_inside_a_batch_too() -> None:
    answers, happened = serve([{"batch": [{"sql": "A"}, {"sql": "COMMIT; BEGIN READ WRITE"},
                                          {"sql": "C"}]}])
    assert [list(a) for a in answers[0]["results"]] == [["rows"], ["error", "sqlstate"]]
    assert "one statement at a time" in answers[0]["results"][1]["error"]
    assert happened == ["guard A", "run A", "rollback"]


def test_a_malformed_request_is_an_error_answer() -> None:
    answers, _ = serve([{"batch": "SELECT 1"}, [1]])
    assert [a["error"] for a in answers] == ["a batch is a list of statements",
                                             "a request is a JSON object"]


def test_a_batch_of_large_answers_is_split_into_lines_of_bounded_size(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Root bounds every line it reads: a batch never packs more than FLUSH_BYTES of
    answers (plus the one that crossed it) into one line."""
    monkeypatch.setattr(dbsession, "FLUSH_BYTES", 100)
    answers, _ = serve([{"batch": [{"sql": "x" * 60} for _ in range(5)]}])
    assert [len(a["results"]) for a in answers] == [2, 2, 1]
    assert all(len(json.dumps(a)) < 300 for a in answers)
