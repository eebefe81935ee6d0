"""agent.daemon.main's pure helpers: STATUS line, watchdog interval, log format, sd_notify."""

from __future__ import annotations

import logging
import os
import socket

import pytest

from agent.config import Config
from agent.daemon.main import (_Formatter, _socket_notify, candidate_predicate, sd_notify,
                          status_line, watchdog_interval)
from agent.model import Finding
from agent.snapshot import MigrationState, Snapshot, UnitSnapshot


def test_status_line() -> None:
    ok = UnitSnapshot("a.service", 0, True, migrations=MigrationState(True, ("x",), ("x",)))
    pending = UnitSnapshot("b.service", 0, True,
                           migrations=MigrationState(True, ("x",), ("y",), ("y",)),
                           findings=(Finding("migrations", "critical", "1 pending"),))
    assert status_line(Snapshot(units=(ok, pending)), ":9410") == \
        "watching 2 units; 1 with pending migrations; 1 with problems"
    assert status_line(Snapshot(units=(ok,)), ":9410") == "watching 1 unit; no problems"
    assert status_line(None, ":9410") == "serving on :9410; no inspection yet (runs on first scrape)"
    assert "last inspection failed" in status_line(None, ":9410", "boom")
    assert "\n" not in status_line(Snapshot(units=(ok,)), ":9410", "x\ny")


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", "1")      # meant for another process
    assert watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 15.0


def _record(msg: str, level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord("driftwatch", level, __file__, 1, msg, None, None)


def test_log_format_masks_secrets_and_suits_journald() -> None:
    text = _Formatter(journald=True).format(
        _record("connect postgresql://app:s3cret@db/app failed; PGPASSWORD=s3cret"))
    assert text.startswith("<3>driftwatch: ") and "s3cret" not in text
    plain = _Formatter(journald=False).format(_record("hello", logging.INFO))
    assert plain.endswith("INFO driftwatch: hello") and plain[:4].isdigit()


def test_candidate_predicate() -> None:
    assert candidate_predicate(Config())("new.service")
    assert not candidate_predicate(Config())("session-1.scope")
    strict = Config(discover_gunicorn=False, unit_patterns=("web-*.service",))
    assert candidate_predicate(strict)("web-1.service")
    assert not candidate_predicate(strict)("new.service")


def test_notify_abstract_socket_both_ways(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"driftwatch-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sd_notify("READY=1", "STATUS=ok")
        assert sock.recv(100) == b"READY=1\nSTATUS=ok"
        assert _socket_notify("WATCHDOG=1")
        assert sock.recv(100) == b"WATCHDOG=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert sd_notify("READY=1") is False
