"""agent.cli.statusclient: who owns the TCP listener agentctl would ask, from literal /proc/net."""

from __future__ import annotations

from pathlib import Path

from agent.cli.statusclient import listener_uids, untrusted_listener

HEADER = ("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  "
          "timeout inode\n")
TCP = HEADER + (
    # 127.0.0.1:9410 LISTEN by uid 33; 0.0.0.0:9411 LISTEN by root; 127.0.0.1:9410 ESTABLISHED
    "   0: 0100007F:24C2 00000000:0000 0A 00000000:00000000 00:00000000 00000000    33        0 1\n"
    "   1: 00000000:24C3 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2\n"
    "   2: 0100007F:24C2 0100007F:D0DB 01 00000000:00000000 00:00000000 00000000  1000        0 3\n")
TCP6 = HEADER + (
    # [::]:9412 LISTEN by uid 1000 (takes IPv4 too when dual-stack)
    "   0: 00000000000000000000000000000000:24C4 00000000000000000000000000000000:0000 0A "
    "00000000:00000000 00:00000000 00000000  1000        0 4\n"
    # [::1]:9413 LISTEN by root
    "   1: 00000000000000000000000001000000:24C5 00000000000000000000000000000000:0000 0A "
    "00000000:00000000 00:00000000 00000000     0        0 5\n")


def fake_proc(tmp_path: Path) -> str:
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "tcp").write_text(TCP)
    (tmp_path / "net" / "tcp6").write_text(TCP6)
    return str(tmp_path)


def test_listener_uids(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path)
    assert listener_uids("127.0.0.1", 9410, proc) == {33}       # listening only, not connected
    assert listener_uids("127.0.0.1", 9411, proc) == {0}        # via 0.0.0.0
    assert listener_uids("127.0.0.1", 9412, proc) == {1000}     # via [::]
    assert listener_uids("::1", 9413, proc) == {0}
    assert listener_uids("127.0.0.1", 9999, proc) == set()


def test_untrusted_listener_names_the_user(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path)
    assert untrusted_listener("127.0.0.1", 9410, proc) == (
        "the process listening on 127.0.0.1:9410 runs as uid 33 (www-data), not as root: "
        "not the agent, not asked")
    assert untrusted_listener("127.0.0.1", 9411, proc) == ""
    assert untrusted_listener("127.0.0.1", 9999, proc) == ""    # nobody: the connect says so
    assert untrusted_listener("localhost", 9410, proc) == ""    # not an address: unknown
