"""The demo's agent port: 9410 when free, else a free one and one line saying which is taken."""

from __future__ import annotations

import socket

from tests.harness.demo import pick_listen_address


def test_taken_port_is_named_in_one_line_and_a_free_one_picked() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        listen, note = pick_listen_address(port)
        other = int(listen.rsplit(":", 1)[1])
        assert other != port and listen.startswith("127.0.0.1:")
        assert note == (f"port {port} on 127.0.0.1 is taken (Address already in use); the "
                        f"demo's agent uses {other} instead")
        with socket.socket() as check:               # the one picked is really free
            check.bind(("127.0.0.1", other))


def test_free_port_is_kept_silently() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert pick_listen_address(port) == (f"127.0.0.1:{port}", "")
