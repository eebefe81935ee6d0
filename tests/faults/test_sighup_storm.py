"""SIGHUP under a scrape storm: the real agent (a subprocess with its inspection worker) is
reloaded again and again, good and bad configs alternating, while clients scrape without
pause. No scrape may fail, the agent never dies, a bad config never replaces a good one."""

from __future__ import annotations

import http.client
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_daemon import (
    INSPECTOR,
    Notify,
    free_port,
    spawn,
    stop,
    write_config,
)

CLIENTS = 8


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[Notify]:
    """A NOTIFY_SOCKET the test owns, as systemd would provide."""
    n = Notify(tmp_path / "notify.sock")
    yield n
    n.close()


@pytest.mark.long(seconds=60, short=6)
def test_sighup_under_a_scrape_storm(tmp_path: Path, notify: Notify,
                                     load_seconds: float) -> None:
    port = free_port()
    config = write_config(tmp_path / "agent.toml", port)
    proc, stderr = spawn(["--config.file", str(config), "--inspector", INSPECTOR], tmp_path,
                         {"NOTIFY_SOCKET": notify.path})
    stop_at = [0.0]
    ok, failed, errors = [0], [0], []
    lock = threading.Lock()

    def scrape() -> None:
        while time.monotonic() < stop_at[0]:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                conn.request("GET", "/metrics")
                resp = conn.getresponse()
                body = resp.read()
                conn.close()
                good = resp.status == 200 and b"driftwatch_pending_revisions" in body
            except OSError as exc:
                good = False
                with lock:
                    errors.append(repr(exc))
            with lock:
                (ok if good else failed)[0] += 1

    try:
        notify.wait_for("READY=1")
        stop_at[0] = time.monotonic() + load_seconds
        threads = [threading.Thread(target=scrape) for _ in range(CLIENTS)]
        for t in threads:
            t.start()
        reloads = 0
        bad = False
        while time.monotonic() < stop_at[0] - 0.5:
            bad = not bad
            if bad:
                config.write_text('[agent]\nlisten_address = "127.0.0.1:%d"\n'
                                  "min_interval_seconds = -1\n" % port)
            else:
                write_config(config, port)
            proc.send_signal(signal.SIGHUP)
            reloads += 1
            time.sleep(0.5)
        for t in threads:
            t.join(30)
        alive = proc.poll() is None
        print(f"\nSIGHUP x{reloads} (good and bad configs alternating) under {CLIENTS} "
              f"scraping clients for {load_seconds:.0f} s: {ok[0]} scrapes ok, {failed[0]} "
              f"failed, agent alive: {alive}")
        assert alive
        assert failed[0] == 0, errors[:5]
        assert ok[0] > CLIENTS and reloads >= 4
    finally:
        stop(proc)
    log = stderr.read_text()
    assert "keeping the running" in log
    assert "Traceback" not in log
