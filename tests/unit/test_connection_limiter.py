"""agent.daemon.server.ConnectionLimiter with an injected clock: cap, eviction, refusal, deadlines."""

from __future__ import annotations

import socket

from agent.daemon.server import ConnectionLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair()


def is_shut(peer: socket.socket) -> bool:
    """True when the limiter shut the other end down (the peer reads EOF)."""
    peer.setblocking(False)
    try:
        return peer.recv(1) == b""
    except BlockingIOError:
        return False


def test_cap_evicts_the_longest_waiting_then_refuses_when_all_are_busy() -> None:
    clock = Clock()
    limiter = ConnectionLimiter(2, request_timeout_seconds=10, clock=clock)
    (a, pa), (b, pb), (c, _pc), (d, _pd) = pair(), pair(), pair(), pair()
    assert limiter.admit(a)
    clock.now += 1
    assert limiter.admit(b)
    clock.now += 1
    assert limiter.admit(c)                  # full: a (waiting longest) makes room
    assert is_shut(pa) and not is_shut(pb) and limiter.evicted == 1
    limiter.mark(b, waiting=False)           # b and c are being served: nothing to evict
    limiter.mark(c, waiting=False)
    assert not limiter.admit(d) and limiter.refused == 1
    limiter.release(b)
    assert limiter.admit(d) and limiter.open_connections() == 2 and limiter.peak == 2


def test_a_burst_of_fresh_connections_does_not_evict_itself() -> None:
    clock = Clock()
    limiter = ConnectionLimiter(2, request_timeout_seconds=10, clock=clock)
    (a, pa), (b, _pb), (c, _pc) = pair(), pair(), pair()
    assert limiter.admit(a) and limiter.admit(b)
    clock.now += 0.5                          # both still within evict_after_seconds (1 s)
    assert not limiter.admit(c) and not is_shut(pa)
    clock.now += 0.5                          # now a counts as slow
    assert limiter.admit(c) and is_shut(pa)


def test_deadline_is_total_not_per_read() -> None:
    clock = Clock()
    limiter = ConnectionLimiter(8, request_timeout_seconds=10, clock=clock)
    (a, pa), (b, pb) = pair(), pair()
    limiter.admit(a)
    clock.now += 5
    limiter.admit(b)
    clock.now += 5                            # a's wait began 10 s ago
    assert limiter.expire() == 1 and is_shut(pa) and not is_shut(pb)
    limiter.mark(b, waiting=False)            # a request starts: a fresh 10 s for it
    clock.now += 9
    assert limiter.expire() == 0
    clock.now += 1
    assert limiter.expire() == 1 and is_shut(pb) and limiter.expired == 2
    assert limiter.open_connections() == 0


def test_an_idle_keepalive_connection_goes_first_whatever_its_age() -> None:
    clock = Clock()
    limiter = ConnectionLimiter(2, request_timeout_seconds=10, clock=clock)
    (a, pa), (b, pb), (c, _pc) = pair(), pair(), pair()
    limiter.admit(a)                          # a fresh client, not yet sent its request
    limiter.admit(b)
    limiter.mark(b, waiting=False)            # b's request ...
    limiter.mark(b, waiting=True)             # ... answered: b idles on keep-alive
    clock.now += 0.1
    assert limiter.admit(c) and is_shut(pb) and not is_shut(pa)
