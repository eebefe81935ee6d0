"""Root's side of the agent's own database session: the session itself is held by a child
running as the unit's user (agent/asuser/dbsession.py); root only sends SQL and parses
bounded JSON rows.

``user_session(ctx, url, timeouts)`` is a drop-in for ``agent.privileged.sources.database.session``:
it yields an object with the small part of SQLAlchemy's Connection API the query functions
use (execute -> scalar/scalars/first/one/iteration) and raises DatabaseProblem with a masked
one-line reason when the session cannot be had.
"""

from __future__ import annotations

import contextvars
import json
import os
import selectors
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO

from agent.dbsql import DBAPIError

from agent.context import AppContext
from agent.privileged import transient
from agent.privileged.launch import DBSESSION, bundle
from agent.privileged.probe_runner import (
    SYSTEMD_DEFAULT_PATH,
    ProbeSetupError,
    build_unit_env,
    interpreter,
    privilege_plan,
    unit_identity,
    scrub,
    secret_values,
)
from agent.privileged.sources.database import DatabaseProblem, Timeouts, db_label, describe_error
from agent.privileged.sources.systemd import SystemdSource

DB_REQUEST_ENV = "DRIFTWATCH_DB_REQUEST"
APPLICATION_NAME = "driftwatch"
# One answer line larger than this is not an answer (5000 rows of short text fit easily).
MAX_LINE_BYTES = 8 * 1024 * 1024
# The child gets this long to start its interpreter and connect, beyond connect_s.
START_GRACE_S = 10.0
# What a kept session is asked first in a run, to know it still answers.
PING_SQL = "SELECT 1"
# At most this many statements of one run are remembered for the next run's batch.
MAX_LEARNED = 200
# While set (by the Inspector, for one inspection run), user_session borrows long-lived
# sessions from this pool (agent/privileged/sessionpool.py) instead of starting one each time.
CURRENT_POOL: contextvars.ContextVar[Any] = contextvars.ContextVar("driftwatch_session_pool",
                                                                   default=None)


class RemoteError(Exception):
    """The server's (or driver's) error for one statement, as the child reported it."""

    def __init__(self, message: str, sqlstate: str = "") -> None:
        super().__init__(message)
        self.pgcode = sqlstate


@dataclass(frozen=True)
class SessionSettings:
    """How long root waits, and what the child's guard enforces."""

    timeouts: Timeouts
    # Root gives up on one statement after this (the server's statement_timeout is shorter).
    answer_s: float = 10.0
    allow_root: bool = False
    probe_user: str = ""

    def guard(self) -> dict[str, Any]:
        """The settings of the child's read-only guard."""
        t = self.timeouts
        return {"statement_timeout_ms": t.statement_ms, "lock_timeout_ms": t.lock_ms,
                "idle_in_transaction_timeout_ms": t.idle_in_transaction_ms,
                "application_name": APPLICATION_NAME, "connect_timeout_s": t.connect_s}


class _Result:
    """Rows of one statement, with the Result methods the query functions use."""

    def __init__(self, rows: list[tuple[Any, ...]]) -> None:
        self._rows = rows

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return iter(self._rows)

    def scalar(self) -> Any:
        return self._rows[0][0] if self._rows and self._rows[0] else None

    def scalars(self) -> "_Result":
        return _Result([(r[0],) for r in self._rows if r])

    def all(self) -> list[Any]:
        return [r[0] if len(r) == 1 else r for r in self._rows]

    def first(self) -> tuple[Any, ...] | None:
        return self._rows[0] if self._rows else None

    def one(self) -> tuple[Any, ...]:
        if len(self._rows) != 1:
            raise RemoteError(f"expected one row, got {len(self._rows)}")
        return self._rows[0]


def statement_key(sql: str, params: Mapping[str, Any]) -> str:
    """Pure: what makes two statements the same (text and parameters)."""
    return json.dumps([sql, params], sort_keys=True, default=str)


def parse_answer(line: bytes) -> dict[str, Any]:
    """One bounded JSON line from the child -> a dict (ValueError when it is not one)."""
    if len(line) > MAX_LINE_BYTES:
        raise ValueError("answer too large")
    doc = json.loads(line)
    if not isinstance(doc, dict):
        raise ValueError("answer is not a JSON object")
    return doc


def rows_of(doc: Mapping[str, Any]) -> list[tuple[Any, ...]]:
    """Pure: the rows of an answer, each cell a JSON scalar (anything else becomes text)."""
    rows = doc.get("rows")
    if not isinstance(rows, list):
        raise ValueError("answer has no rows")
    out = []
    for row in rows:
        if not isinstance(row, list):
            raise ValueError("a row is not a list")
        out.append(tuple(v if v is None or isinstance(v, (bool, int, float, str)) else str(v)
                         for v in row))
    return out


class _Channel:
    """The pipes to one session child, and whether the child is still trusted."""

    def __init__(self, writer: BinaryIO, fd_out: int) -> None:
        self.writer = writer
        self.fd = fd_out
        self.buf = b""
        # A lost, late or garbled answer: the next answer could belong to that request, so
        # nothing on this child may be used again.
        self.broken = False


class RemoteConnection:
    """Sends statements to the child (one at a time, or a prefetched batch) and waits
    (bounded) for their rows. conn_id: the connection it is on a shared child
    (SharedSession), named in every request and checked in every answer."""

    def __init__(self, writer: BinaryIO | None, fd_out: int, settings: SessionSettings,
                 secrets: list[str], channel: _Channel | None = None,
                 conn_id: str | None = None) -> None:
        assert writer is not None or channel is not None
        self._chan = channel if channel is not None else _Channel(writer, fd_out)  # type: ignore[arg-type]
        self.conn_id = conn_id
        self._settings = settings
        self._secrets = secrets
        self.statements = 0     # statements the child ran
        self.round_trips = 0    # requests written (a batch is one)
        # Answers prefetch() got, by statement_key, consumed by execute() in order.
        self._ready: dict[str, list[dict[str, Any]]] = {}
        # The statements answered (not failed) since new_run(): the next run's prefetch.
        self._log: list[tuple[str, dict[str, Any]]] = []
        # Values that cannot change during one session (its server's identity), by name.
        self.session_memo: dict[str, Any] = {}

    @property
    def broken(self) -> bool:
        """The child is in doubt (a lost, late, garbled or misaddressed answer)."""
        return self._chan.broken

    @broken.setter
    def broken(self, value: bool) -> None:
        self._chan.broken = self._chan.broken or value

    def _ask(self, doc: dict[str, Any]) -> bytes:
        """A request line, naming this connection on a shared child."""
        if self.conn_id is not None:
            doc = {"conn": self.conn_id, **doc}
        return json.dumps(doc).encode() + b"\n"

    def read_line(self, timeout: float) -> dict[str, Any]:
        """The child's next answer line; RemoteError on timeout, EOF or garbage, or (on a
        shared child) an answer that is not this connection's."""
        doc = self._read_line(timeout)
        if self.conn_id is not None and doc.get("conn") != self.conn_id:
            raise RemoteError("the session answered for another connection")
        return doc

    def _read_line(self, timeout: float) -> dict[str, Any]:
        chan = self._chan
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(chan.fd, selectors.EVENT_READ)
            while b"\n" not in chan.buf:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RemoteError(f"no answer from the session within {timeout:g} s "
                                      "(timed out)")
                if not sel.select(remaining):
                    continue
                chunk = os.read(chan.fd, 65536)
                if not chunk:
                    raise RemoteError("the session ended before answering")
                chan.buf += chunk
                if len(chan.buf) > MAX_LINE_BYTES:
                    raise RemoteError("the session's answer is too large")
        line, chan.buf = chan.buf.split(b"\n", 1)
        try:
            return parse_answer(line)
        except ValueError as exc:
            raise RemoteError(f"the session's answer is not valid JSON ({exc})") from None

    def execute(self, clause: Any, params: Mapping[str, Any] | None = None,
                timeout: float | None = None) -> _Result:
        """Run one statement (a TextClause or SQL text) as the unit's user (timeout: how
        long to wait for its answer, default the settings' answer_s); the answer prefetch()
        already has for the same statement and parameters, if any."""
        sql = str(getattr(clause, "text", clause))
        params = dict(params or {})
        ready = self._ready.get(statement_key(sql, params))
        if ready:
            doc = ready.pop(0)
        else:
            request = self._ask({"sql": sql, "params": params})
            try:
                self._send(request)
                doc = self.read_line(timeout or self._settings.answer_s)
            except (OSError, RemoteError) as exc:
                self.broken = True
                raise DBAPIError(sql, params, RemoteError(scrub(str(exc), self._secrets))
                                 ) from None
            self.statements += 1
        if "error" in doc:
            message = scrub(str(doc.get("error") or "error"), self._secrets)[:500]
            raise DBAPIError(sql, params, RemoteError(message, str(doc.get("sqlstate") or "")))
        try:
            result = _Result(rows_of(doc))
        except ValueError as exc:
            raise DBAPIError(sql, params, RemoteError(str(exc))) from None
        if len(self._log) < MAX_LEARNED:
            self._log.append((sql, params))
        return result

    def _send(self, request: bytes) -> None:
        if self._chan.broken:
            raise RemoteError("the session is no longer trusted")
        self._chan.writer.write(request)
        self._chan.writer.flush()
        self.round_trips += 1

    def prefetch(self, statements: Sequence[tuple[str, Mapping[str, Any]]],
                 ping_timeout: float | None = None) -> None:
        """Send statements as one batch (one read-only transaction in the child, one round
        trip) and keep their answers for execute(); with ping_timeout, a "SELECT 1" first
        whose answer must come within it (DBAPIError when it does not, or is an error).

        A statement's answer is kept even when it is an error; the first error ends the
        batch, and the statements after it are sent one by one when executed.
        """
        asks: list[dict[str, Any]] = [{"sql": PING_SQL, "params": {}, "flush": True}] \
            if ping_timeout is not None else []
        asks += [{"sql": sql, "params": dict(params)} for sql, params in statements]
        if not asks:
            return
        got = 0
        try:
            self._send(self._ask({"batch": asks}))
            while got < len(asks):
                first = got == 0 and ping_timeout is not None
                doc = self.read_line(ping_timeout if first else self._settings.answer_s)
                results = doc.get("results")
                if not isinstance(results, list) or not results or \
                        len(results) > len(asks) - got:
                    raise RemoteError("the session's answer to a batch is not one")
                for answer in results:
                    if not isinstance(answer, dict):
                        raise RemoteError("the session's answer to a batch is not one")
                    ask, got = asks[got], got + 1
                    self.statements += 1
                    if ask.get("flush") and got == 1 and ping_timeout is not None:
                        if "error" in answer:
                            message = scrub(str(answer.get("error")), self._secrets)[:500]
                            raise DBAPIError(PING_SQL, {}, RemoteError(message))
                        continue
                    self._ready.setdefault(statement_key(ask["sql"], ask["params"]),
                                           []).append(answer)
                if "error" in results[-1]:
                    break   # the child ended the batch there
        except (OSError, RemoteError) as exc:
            self.broken = True
            raise DBAPIError(PING_SQL if got == 0 else "batch", {},
                             RemoteError(scrub(str(exc), self._secrets))) from None

    def new_run(self) -> list[tuple[str, dict[str, Any]]]:
        """A new inspection run: forget unused prefetched answers; the statements the last
        run had answered (in order), for the next prefetch."""
        learned, self._log = self._log, []
        self._ready = {}
        return learned


class Unshareable(Exception):
    """The app's interpreter cannot hold a shared session (no psycopg2/psycopg)."""


class SharedSession:
    """One kept session child holding a connection per URL (sessionpool's, PostgreSQL):
    each RemoteConnection names its connection in every request and accepts only its own
    answers; every answer is scrubbed of the secrets of every URL the child was given."""

    def __init__(self, greeter: RemoteConnection, settings: SessionSettings,
                 secrets: list[str]) -> None:
        self._chan = greeter._chan
        self._settings = settings
        self.secrets = secrets   # one list, shared by every connection: extended per URL
        self._next = 0
        self.open_ids: set[str] = set()

    @property
    def broken(self) -> bool:
        """The child is in doubt: nothing on it may be used."""
        return self._chan.broken

    def open(self, url: str, secrets: Sequence[str]) -> RemoteConnection:
        """A new connection on url in this child (DatabaseProblem; Unshareable)."""
        label = db_label(url)
        self.secrets[:] = sorted(set(self.secrets) | set(secrets), key=len, reverse=True)
        self._next += 1
        conn = RemoteConnection(None, -1, self._settings, self.secrets, channel=self._chan,
                                conn_id=f"c{self._next}")
        try:
            conn._send(conn._ask({"open": url}))
            hello = conn.read_line(START_GRACE_S + self._settings.timeouts.connect_s)
        except (OSError, RemoteError) as exc:
            conn.broken = True
            raise DatabaseProblem(f"database {label} error: "
                                  f"{scrub(str(exc), self.secrets)}") from None
        if not hello.get("ok"):
            if hello.get("unshared"):
                raise Unshareable(label)
            reason = scrub(str(hello.get("error") or "no session"), self.secrets)[:500]
            raise DatabaseProblem(describe_error(label, RemoteError(
                reason, str(hello.get("sqlstate") or ""))))
        assert conn.conn_id is not None
        self.open_ids.add(conn.conn_id)
        return conn

    def close(self, conn: RemoteConnection) -> None:
        """End one connection (its backend disconnects); the child stays."""
        if conn.conn_id in self.open_ids:
            self.open_ids.discard(conn.conn_id)
            try:
                conn._send(conn._ask({"close": True}))
            except (OSError, RemoteError):
                conn.broken = True


@contextmanager
def _greeted(conn: RemoteConnection, label: str, secrets: list[str],
             grace_s: float) -> Iterator[RemoteConnection]:
    """The child's hello first (its connect error, masked, if it has none); then the
    connection, with driver errors raised as DatabaseProblem."""
    try:
        hello = conn.read_line(grace_s)
    except RemoteError as exc:
        raise DatabaseProblem(f"database {label} error: {exc}") from None
    if not hello.get("ok"):
        reason = scrub(str(hello.get("error") or "no session"), secrets)
        raise DatabaseProblem(describe_error(label, RemoteError(reason)))
    try:
        yield conn
    except DBAPIError as exc:
        raise DatabaseProblem(describe_error(label, exc)) from None


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """End the child's whole process group (it leads its own session) and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def child_request(url: str, settings: SessionSettings, mode: str,
                  shared: Sequence[str] | None, allow_root: bool) -> str:
    """Pure: the child's request; shared: a child for many URLs, these variables dropped."""
    doc: dict[str, Any] = {"url": url, "guard": settings.guard(), "allow_root": allow_root,
                           "mode": mode}
    if shared is not None:
        doc.update(url="", shared=True, unset=list(shared))
    return json.dumps(doc)


def session_env(ctx: AppContext, identity: Any, settings: SessionSettings, url: str,
                mode: str = "", shared: Sequence[str] | None = None) -> dict[str, str]:
    """The unit's environment plus the session request (and a connect timeout default)."""
    env = build_unit_env(ctx, identity, gunicorn_env=False)
    env.setdefault("PGCONNECT_TIMEOUT", str(int(settings.timeouts.connect_s)))
    env.setdefault("PGAPPNAME", APPLICATION_NAME)
    env[DB_REQUEST_ENV] = child_request(url, settings, mode, shared, settings.allow_root)
    return env


@contextmanager
def user_session(ctx: AppContext, url: str, timeouts: Timeouts,
                 allow_root: bool = False, probe_user: str = "", mode: str = "",
                 ) -> Iterator[RemoteConnection]:
    """The agent's read-only session on url, held as the unit's user (DatabaseProblem).

    mode "pgbouncer_admin": PgBouncer's admin console instead, fixed SHOW commands only.

    Where systemd runs the machine, the child is a transient unit with the app unit's own
    execution settings (units without User= get a dynamic user, or probe_user); elsewhere
    a child process dropped to the unit's User=/Group=. During an inspection run
    (CURRENT_POOL set) a PostgreSQL session is borrowed from the pool and kept afterwards.
    """
    pool = CURRENT_POOL.get()
    if pool is not None and not mode and pool.pooled(url):   # the console is never kept
        with pool.borrow(ctx, url, timeouts, allow_root, probe_user) as conn:
            yield conn
        return
    with open_session(ctx, url, timeouts, allow_root, probe_user, mode=mode) as conn:
        yield conn


@contextmanager
def open_shared(ctx: AppContext, unset: Sequence[str], timeouts: Timeouts,
                allow_root: bool = False, probe_user: str = "",
                lifetime_s: float = 0.0) -> Iterator[SharedSession]:
    """A new session child that holds a connection per URL it is asked to open (the
    unit's identity and environment, the variables unset dropped), for the with block."""
    with open_session(ctx, "", timeouts, allow_root, probe_user, lifetime_s,
                      shared=tuple(unset)) as child:
        yield child


@contextmanager
def open_session(ctx: AppContext, url: str, timeouts: Timeouts, allow_root: bool = False,
                 probe_user: str = "", lifetime_s: float = 0.0,
                 mode: str = "", shared: Sequence[str] | None = None) -> Iterator[Any]:
    """A new session child for as long as the with block (user_session without the pool);
    lifetime_s: how long beyond one inspection's statements it may be kept; shared (the
    variables to drop): a SharedSession instead, connections opened on it per URL."""
    label = db_label(url) if url else "(shared session)"
    settings = SessionSettings(timeouts, answer_s=max(5.0, timeouts.statement_ms / 1000 + 5),
                               allow_root=allow_root, probe_user=probe_user)
    secrets = secret_values(ctx.environment, [url])
    if transient.available(ctx.exec_settings):
        with _transient_session(ctx, url, settings, secrets, label, mode,
                                lifetime_s, shared) as conn:
            yield conn
        return
    try:
        identity = unit_identity(ctx, probe_user)
        drop = privilege_plan(identity, os.geteuid(), allow_root)
        env = session_env(ctx, identity, settings, url, mode, shared)
        python = interpreter(ctx, env)
    except ProbeSetupError as exc:
        raise DatabaseProblem(f"database {label}: no session as the unit's user: "
                              f"{scrub(str(exc), secrets)}") from None
    read_fd, write_fd = os.pipe()
    try:
        try:
            proc = subprocess.Popen(
                [python, "-B", "-c", bundle(DBSESSION), "0", str(write_fd)],
                cwd="/", env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, pass_fds=(write_fd,), start_new_session=True,
                **drop)
        except OSError as exc:
            raise DatabaseProblem(f"database {label}: cannot start {python} as "
                                  f"{identity.name}: {exc.strerror or exc}") from None
        os.close(write_fd)
        write_fd = -1
        assert proc.stdin is not None
        conn = RemoteConnection(proc.stdin, read_fd, settings, secrets)
        try:
            with _greeted(conn, label, secrets, START_GRACE_S + timeouts.connect_s):
                yield conn if shared is None else SharedSession(conn, settings, secrets)
        finally:
            if proc.stdin is not None:
                try:
                    proc.stdin.close()
                except OSError:
                    pass
            _kill(proc)
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)


@contextmanager
def _transient_session(ctx: AppContext, url: str, settings: SessionSettings,
                       secrets: list[str], label: str, mode: str = "",
                       lifetime_s: float = 0.0,
                       shared: Sequence[str] | None = None) -> Iterator[Any]:
    """The session child as a transient unit with the app unit's execution settings
    (credentials, DynamicUser=, sandboxing as for the app); stdin/stdout are root's pipes."""
    try:
        python = interpreter(ctx, {"PATH": ctx.environment.get("PATH", SYSTEMD_DEFAULT_PATH)})
    except ProbeSetupError as exc:
        raise DatabaseProblem(f"database {label}: {scrub(str(exc), secrets)}") from None
    defaults = {"PGAPPNAME": APPLICATION_NAME,
                "PGCONNECT_TIMEOUT": str(int(settings.timeouts.connect_s))}
    limits = transient.Limits(runtime_max_s=START_GRACE_S + settings.timeouts.connect_s
                              + lifetime_s + 30 * settings.answer_s,
                              memory_max_bytes=256 * 1024 * 1024)
    props = transient.transient_properties(
        ctx.exec_settings, description=f"driftwatch database session for {ctx.unit}"
        + (" (shared by the units of the same identity)" if shared is not None else ""),
        extra_env={k: v for k, v in defaults.items() if k not in ctx.environment},
        limits=limits, probe_user=settings.probe_user)
    request = child_request(url, settings, mode, shared, False)
    bus = SystemdSource()
    fds: list[int] = []
    unit = None
    try:
        req_r, req_w = os.pipe()
        ans_r, ans_w = os.pipe()
        null = os.open(os.devnull, os.O_WRONLY)
        fds += [req_r, req_w, ans_r, ans_w, null]
        try:
            unit = transient.start(bus, transient.unit_name(ctx.unit, "session"),
                                   [python, "-B", "-c", bundle(DBSESSION), "stdio"], props,
                                   req_r, ans_w, null)
        except transient.TransientError as exc:
            raise DatabaseProblem(f"database {label}: cannot start the session unit: "
                                  f"{scrub(str(exc), secrets)}") from None
        for fd in (req_r, ans_w, null):
            os.close(fd)
            fds.remove(fd)
        fds.remove(req_w)
        with os.fdopen(req_w, "wb", buffering=0) as writer:
            writer.write(request.encode() + b"\n")
            conn = RemoteConnection(writer, ans_r, settings, secrets)
            with _greeted(conn, label, secrets, START_GRACE_S + settings.timeouts.connect_s):
                yield conn if shared is None else SharedSession(conn, settings, secrets)
    finally:
        if unit is not None:
            # stdin is closed by now (EOF): the child ends by itself; then nothing is left.
            unit.wait_gone(timeout=1.0)
            unit.kill()
        for fd in fds:
            os.close(fd)
        bus.close()
