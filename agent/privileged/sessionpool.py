"""Long-lived database sessions: one per unit and database, kept between inspections.

Starting the session child (a transient unit, its interpreter, the driver, the connection)
costs far more than the few statements of a steady inspection. The pool keeps each child
(agent/privileged/dbclient.py) open and idle between inspections; every statement still runs
in its own verified read-only transaction, rolled back at once, so nothing is held open.

A session is used again only while everything that chose it is the same (the unit's user,
groups, environment, execution settings, interpreter; the URL; the guard's timeouts), it
answers a ping (once per run: within a run it answered moments ago), it is younger than LIFETIME_S, and nothing went wrong with it: any error that
leaves a `with` block, or a lost answer, ends it, and the next use starts a new one. Sessions
a run did not use are ended after it (sweep); so are a unit's when it restarted (close).
PostgreSQL only: a held SQLite file would keep answering from a file replaced on disk.

Units whose children would be started identically (agent/privileged/sharedkey.py: same
user, groups, interpreter, execution settings, guard, and environment but for the variable
that carries the URL) share one child, which holds a connection per URL: each connection
follows the rules above on its own (an error ends that connection only); a child in doubt
(a lost, late or misaddressed answer) ends with all its connections, and so does one whose
last connection ended or that is LIFETIME_S old. A child answers one request at a time:
the pool is used by one inspection run at a time (units one after another), as before.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

from agent.dbsql import DBAPIError

from agent.context import AppContext
from agent.privileged import dbclient, sharedkey
from agent.privileged.probe_runner import secret_values
from agent.privileged.sources.database import DatabaseProblem, Timeouts, backend_of, db_label, \
    describe_error

# Shorter than the session unit's own RuntimeMaxSec (which adds this to its usual bound).
LIFETIME_S = 300.0


def session_key(ctx: AppContext, url: str, timeouts: Timeouts, allow_root: bool,
                probe_user: str) -> str:
    """Pure: a digest of everything that decides what session a child opens (the connect
    timeout only bounds the start, so it is not part of it)."""
    chosen = {
        "unit": ctx.unit, "user": ctx.user, "group": ctx.group,
        "groups": list(ctx.supplementary_groups), "cwd": ctx.working_directory,
        "python": ctx.python, "venv": ctx.venv, "dynamic": ctx.dynamic_user,
        "env": sorted(ctx.environment.items()),
        "exec": sorted((str(k), repr(v)) for k, v in ctx.exec_settings.items()),
        "url": url, "guard": [timeouts.statement_ms, timeouts.lock_ms,
                              timeouts.idle_in_transaction_ms],
        "allow_root": allow_root, "probe_user": probe_user,
    }
    return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()


@dataclass
class _Child:
    """A shared session child and the sessions (by session_key) it holds."""

    session: Any
    stack: ExitStack
    started: float
    conns: set[str] = field(default_factory=set)


@dataclass
class _Held:
    unit: str
    label: str
    conn: Any
    stack: ExitStack | None   # its own child; None: a connection on a shared child
    started: float
    child: str = ""           # the shared child's key
    used: bool = True
    # Answered within this run: no ping needed before its next use in the same run.
    answered: bool = False
    # The statements the last run had answered: sent as one batch before this run's first
    # use (with the ping), so a steady inspection costs one round trip.
    learned: list[Any] = field(default_factory=list)


@dataclass
class SessionPool:
    """The sessions kept between inspection runs, by session_key."""

    lifetime_s: float = LIFETIME_S
    opener: Callable[..., Any] = field(default=dbclient.open_session, repr=False)
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    held: dict[str, _Held] = field(default_factory=dict)
    started: int = 0   # sessions started (for tests and the benchmark)
    # One child per launch identity, a connection per URL in it (False: a child per session).
    share: bool = True
    shared_opener: Callable[..., Any] = field(default=dbclient.open_shared, repr=False)
    children: dict[str, _Child] = field(default_factory=dict)
    children_started: int = 0
    # Child keys whose interpreter cannot share (no libpq driver): a child per session.
    unshareable: set[str] = field(default_factory=set)

    @staticmethod
    def pooled(url: str) -> bool:
        """Kept between runs: PostgreSQL sessions only."""
        return backend_of(url) == "postgresql"

    @contextmanager
    def borrow(self, ctx: AppContext, url: str, timeouts: Timeouts, allow_root: bool = False,
               probe_user: str = "") -> Iterator[Any]:
        """The kept session for these settings, or a new one (DatabaseProblem as
        user_session); ended at once when anything goes wrong inside the block."""
        key = session_key(ctx, url, timeouts, allow_root, probe_user)
        held = self.held.get(key)
        learned = held.learned if held is not None else []
        if held is not None and not self._usable(held, timeouts):
            self._end(key)
            held = None
        if held is None:
            held = self._start(key, ctx, url, timeouts, allow_root, probe_user, learned)
            fresh = True
        else:
            fresh = False
        held.used = True
        ok = False
        try:
            try:
                if fresh and held.learned and hasattr(held.conn, "prefetch"):
                    held.conn.prefetch(held.learned)   # just greeted: no ping needed
                yield held.conn
            except DBAPIError as exc:
                raise DatabaseProblem(describe_error(held.label, exc)) from None
            ok = True
        finally:
            if not ok or getattr(held.conn, "broken", False):
                self._end(key)
            else:
                held.answered = True

    def _start(self, key: str, ctx: AppContext, url: str, timeouts: Timeouts,
               allow_root: bool, probe_user: str, learned: list[Any]) -> _Held:
        """A new session: a connection on the shared child of its identity, or (not
        shareable) a child of its own."""
        held = self._start_shared(key, ctx, url, timeouts, allow_root, probe_user, learned) \
            if self.share else None
        if held is None:
            stack = ExitStack()
            conn = stack.enter_context(self.opener(ctx, url, timeouts, allow_root, probe_user,
                                                   lifetime_s=self.lifetime_s))
            held = _Held(ctx.unit, db_label(url), conn, stack, self.clock(), learned=learned)
            self.children_started += 1
        self.held[key] = held
        self.started += 1
        return held

    def _start_shared(self, key: str, ctx: AppContext, url: str, timeouts: Timeouts,
                      allow_root: bool, probe_user: str, learned: list[Any]) -> _Held | None:
        """A connection on the shared child (started if need be); None: not shared."""
        guard = [timeouts.statement_ms, timeouts.lock_ms, timeouts.idle_in_transaction_ms,
                 timeouts.connect_s]
        found = sharedkey.child_key(ctx, url, guard, allow_root, probe_user)
        if not found.shared or found.digest in self.unshareable:
            return None
        child = self.children.get(found.digest)
        if child is not None and (child.session.broken
                                  or self.clock() - child.started >= self.lifetime_s):
            self._end_child(found.digest)
            child = None
        if child is None:
            stack = ExitStack()
            session = stack.enter_context(self.shared_opener(
                ctx, found.unset, timeouts, allow_root, probe_user, lifetime_s=self.lifetime_s))
            child = _Child(session, stack, self.clock())
            self.children[found.digest] = child
            self.children_started += 1
        try:
            conn = child.session.open(url, secret_values(ctx.environment, [url]))
        except dbclient.Unshareable:
            self.unshareable.add(found.digest)
            if not child.conns:
                self._end_child(found.digest)
            return None
        except BaseException:
            if child.session.broken or not child.conns:
                self._end_child(found.digest)
            raise
        child.conns.add(key)
        return _Held(ctx.unit, db_label(url), conn, None, self.clock(), learned=learned,
                     child=found.digest)

    def _usable(self, held: _Held, timeouts: Timeouts) -> bool:
        """Young enough, not broken, and still answering within the connect timeout (a
        server restart, an idle timeout, a killed child or a frozen server all show here,
        before the inspection's statements). The ping goes with the statements the last
        run asked, in one batch."""
        if self.clock() - held.started >= self.lifetime_s or getattr(held.conn, "broken", 0):
            return False
        child = self.children.get(held.child) if held.child else None
        if held.child and (child is None or self.clock() - child.started >= self.lifetime_s):
            return False
        if held.answered:
            return True
        ping_s = float(max(1, timeouts.connect_s))
        try:
            if hasattr(held.conn, "prefetch"):
                held.conn.prefetch(held.learned, ping_timeout=ping_s)
            else:
                held.conn.execute("SELECT 1", timeout=ping_s)
        except DBAPIError:
            return False
        return True

    def begin(self) -> None:
        """A run starts: nothing used yet, nothing answered yet (ping before first use);
        what each session answered in the last run is what it will be asked first."""
        for held in self.held.values():
            held.used = False
            held.answered = False
            new_run = getattr(held.conn, "new_run", None)
            if new_run is not None:
                held.learned = new_run()

    def sweep(self, units: Iterable[str] | None = None) -> None:
        """After a run: end the sessions it did not use (of units, None: of all)."""
        wanted = None if units is None else set(units)
        for key in [k for k, h in self.held.items()
                    if not h.used and (wanted is None or h.unit in wanted)]:
            self._end(key)

    def close(self, unit: str | None = None) -> None:
        """End the sessions of one unit (a restart was seen), or all."""
        for key in [k for k, h in self.held.items() if unit is None or h.unit == unit]:
            self._end(key)

    def _end(self, key: str) -> None:
        """End one session: its own child, or its connection on a shared child (the child
        too when it is in doubt or holds nothing else)."""
        held = self.held.pop(key, None)
        if held is None:
            return
        if held.stack is not None:
            _close(held.stack)
            return
        child = self.children.get(held.child)
        if child is None:
            return
        child.conns.discard(key)
        if not child.session.broken and child.conns:
            child.session.close(held.conn)
        if child.session.broken or not child.conns:
            self._end_child(held.child)

    def _end_child(self, digest: str) -> None:
        """End a shared child and every session on it."""
        child = self.children.pop(digest, None)
        if child is None:
            return
        for key in child.conns:
            self.held.pop(key, None)
        _close(child.stack)


def _close(stack: ExitStack) -> None:
    try:
        stack.close()
    except Exception:  # ending a dead child must never fail an inspection
        pass
