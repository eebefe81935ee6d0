"""Root's side of the SQL parse: each revision's SQL to an Analysis, parsed in a confined child.

The SQL is rendered from the app's code: hostile input. pglast (libpg_query, C) never reads
it in root's process: sqlchild.py does, as the unit's user (nobody for a unit without User=),
chrooted into an empty directory and bounded in memory and CPU. Root checks the child's
uids in /proc before it sends any SQL, bounds every read by size and deadline, and accepts
only what wire.py validates. A child that crashes, runs out of time or replies badly costs
that one revision an analysis (its error says why, and the risk is high), never the agent;
the revisions after it are parsed by a fresh child.
"""

from __future__ import annotations

import json
import os
import pwd
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.preflight.analysis import Analysis
from agent.preflight.wire import WireError, from_wire

NOBODY = 65534              # the overflow uid/gid, when there is no `nobody` entry
MAX_LINE = 16 * 2**20       # one revision's analysis
MAX_STDERR = 4096           # kept of the child's stderr, for a setup failure's message
TIMED_OUT = "the SQL parser timed out"
CRASHED = "PostgreSQL's parser (pglast) crashed on this revision's SQL"
UNCHECKED = "this revision's SQL was not analysed; review it by hand"
NOT_PARSED = "not parsed"
SETUP = "cannot start the SQL parser"
# Errors that may be the host's state (load, a full /tmp), not the SQL: worth another try.
TRANSIENT = (TIMED_OUT, NOT_PARSED, SETUP)


@dataclass(frozen=True)
class ParseLimits:
    """Bounds on the parser child."""

    memory_bytes: int = 512 * 2**20   # RLIMIT_AS: Python + pglast need about 40 MiB
    cpu_seconds: int = 10             # per revision (RLIMIT_CPU, then SIGXCPU)
    revision_seconds: float = 20.0    # wall clock per revision (a stopped child, a loaded host)
    start_seconds: float = 20.0       # to start, import pglast and confine itself
    total_seconds: float = 120.0      # every revision together


class _Failed(Exception):
    """The child could not analyse the current revision (the message says why)."""

    def __init__(self, message: str, setup: bool = False) -> None:
        super().__init__(message)
        self.setup = setup  # the child never got ready: later revisions would fail alike


def parser_identity(user: str, euid: int | None = None) -> tuple[int, int] | None:
    """(uid, gid) the parser runs as: the unit's User= when it is an account other than root,
    else nobody; None when the agent is not root (it cannot change user, nor needs to)."""
    if (os.geteuid() if euid is None else euid) != 0:
        return None
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user) if user \
            else None
    except KeyError:
        entry = None  # e.g. a DynamicUser= name that is not allocated right now
    if entry is not None and entry.pw_uid != 0 and entry.pw_gid != 0:
        return entry.pw_uid, entry.pw_gid
    try:
        nobody = pwd.getpwnam("nobody")
        return nobody.pw_uid, nobody.pw_gid
    except KeyError:
        return NOBODY, NOBODY


def proc_ids(pid: int, proc: Path = Path("/proc")) -> tuple[list[int], list[int]]:
    """(real, effective, saved, fs uids), (the same gids) of a process, from /proc."""
    ids: dict[str, list[int]] = {}
    for line in (proc / str(pid) / "status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid"):
            ids[key] = [int(v) for v in value.split()]
    return ids.get("Uid", []), ids.get("Gid", [])


def describe_exit(returncode: int | None, limits: ParseLimits, said: str = "") -> str:
    """Why the child stopped, for a revision's error (said: its last line on stderr)."""
    if returncode is not None and returncode < 0:
        sig = -returncode
        if sig == signal.SIGXCPU:
            return f"{TIMED_OUT} (more than {limits.cpu_seconds} s of CPU)"
        name = signal.Signals(sig).name if sig in signal.valid_signals() else str(sig)
        return f"{CRASHED} (killed by {name})"
    return f"{CRASHED} (it exited with status {returncode}" + (f": {said})" if said else ")")


class _Child:
    """One parser child: started, confined and checked, fed, read under deadlines."""

    def __init__(self, identity: tuple[int, int] | None, limits: ParseLimits, root: str,
                 max_input: int) -> None:
        config = {"root": root, "uid": identity[0] if identity else -1,
                  "gid": identity[1] if identity else -1, "memory_bytes": limits.memory_bytes,
                  "cpu_seconds": limits.cpu_seconds, "max_input": max_input}
        self.identity, self.limits = identity, limits
        # -I: no PYTHON* variables, no user site, no cwd on sys.path; a new session, so the
        # child never shares root's terminal; an environment of its own (no secrets of root's).
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-B", "-m", "agent.preflight.sqlchild", json.dumps(config)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd="/", env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"},
            start_new_session=True, close_fds=True)
        assert self.proc.stdin and self.proc.stdout and self.proc.stderr
        self.stdin, self.stdout, self.stderr = self.proc.stdin, self.proc.stdout, \
            self.proc.stderr
        for f in (self.stdin, self.stdout, self.stderr):
            os.set_blocking(f.fileno(), False)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.stdout, selectors.EVENT_READ)
        self.sel.register(self.stderr, selectors.EVENT_READ)
        # A bytearray, searched from where the last search stopped: a hostile 16 MB line
        # costs linear time, not quadratic.
        self.out, self.scanned, self.err, self.eof = bytearray(), 0, b"", False
        self.pending = b""

    def line(self, deadline: float) -> dict[str, Any] | None:
        """The child's next JSON line (None at its end), feeding stdin meanwhile."""
        while (end := self.out.find(b"\n", self.scanned)) < 0:
            self.scanned = len(self.out)
            if len(self.out) > MAX_LINE:
                raise _Failed(f"the SQL parser's reply is larger than {MAX_LINE} bytes")
            if self.eof:
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Failed(TIMED_OUT)
            for key, events in self.sel.select(left):
                if key.fileobj is self.stdin:
                    self._feed()
                else:
                    self._read(key.fileobj)
        raw = bytes(self.out[:end])
        del self.out[:end + 1]
        self.scanned = 0
        try:
            doc = json.loads(raw)
        except ValueError:
            raise _Failed("the SQL parser's reply is not JSON") from None
        if not isinstance(doc, dict):
            raise _Failed("the SQL parser's reply is not a JSON object")
        return doc

    def _read(self, f: Any) -> None:
        try:
            data = os.read(f.fileno(), 1 << 16)
        except BlockingIOError:
            return
        if f is self.stderr:
            self.err = (self.err + data)[-MAX_STDERR:]
            if not data:
                self.sel.unregister(f)
        elif data:
            self.out += data
        else:
            self.eof = True

    def _feed(self) -> None:
        try:
            sent = os.write(self.stdin.fileno(), self.pending[:1 << 16])
        except BlockingIOError:
            return
        except BrokenPipeError:
            sent = len(self.pending)  # the child died: its exit status says why
        self.pending = self.pending[sent:]
        if not self.pending:
            self.sel.unregister(self.stdin)
            self.stdin.close()

    def send(self, texts: Sequence[str]) -> None:
        """Queue the request; it is written as the child reads it (never blocking root)."""
        self.pending = json.dumps({"sql": list(texts)}).encode()
        self.sel.register(self.stdin, selectors.EVENT_WRITE)

    def check_identity(self) -> None:
        """Refuse a child still root (by /proc, not by its word), before it sees any SQL."""
        if self.identity is None:
            return
        try:
            uids, gids = proc_ids(self.proc.pid)
        except (OSError, ValueError):
            raise _Failed("cannot read the SQL parser's uids", setup=True) from None
        if not uids or not gids or 0 in uids or 0 in gids:
            raise _Failed(f"the SQL parser still runs as root (uids {uids}, gids {gids}): "
                          "not sending it the SQL", setup=True)

    def close(self) -> int | None:
        """Kill the child if it still runs, reap it, return its exit status."""
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL is not ignorable
            pass
        for f in (self.stdin, self.stdout, self.stderr):
            if not f.closed:
                f.close()
        self.sel.close()
        return self.proc.returncode

    def stderr_tail(self) -> str:
        text = self.err.decode("utf-8", "replace").strip().splitlines()
        return text[-1][:200] if text else ""


def _batch(texts: Sequence[str], identity: tuple[int, int] | None, limits: ParseLimits,
           deadline: float, on_ready: Callable[[int], None] | None,
           ) -> tuple[list[Analysis], _Failed | None]:
    """Parse texts in one child: the analyses of a prefix, and why the next one failed."""
    done: list[Analysis] = []
    root = tempfile.mkdtemp(prefix="driftwatch-parse-")  # empty, root's, 0700: the chroot
    child = None
    try:
        child = _Child(identity, limits, root, len(json.dumps({"sql": list(texts)})))
        hello = child.line(min(deadline, time.monotonic() + limits.start_seconds))
        if hello is None or hello.get("ready") is not True:
            reason = str(hello.get("error", ""))[:300] if hello else child.stderr_tail()
            raise _Failed(f"{SETUP} confined: {reason or 'no reply'}", setup=True)
        child.check_identity()
        if on_ready is not None:
            on_ready(child.proc.pid)
        child.send(texts)
        while len(done) < len(texts):
            doc = child.line(min(deadline, time.monotonic() + limits.revision_seconds))
            if doc is None:
                raise _Failed(describe_exit(child.close(), limits, child.stderr_tail()))
            if doc.get("i") != len(done):
                raise _Failed("the SQL parser's reply is out of order")
            try:
                done.append(from_wire(doc.get("analysis")))
            except WireError as exc:
                raise _Failed(f"the SQL parser's reply is not valid: {exc}") from None
        return done, None
    except _Failed as exc:
        return done, exc
    except OSError as exc:
        return done, _Failed(f"{SETUP}: {exc}", setup=True)
    finally:
        if child is not None:
            child.close()
        os.rmdir(root)


def settled(analyses: Sequence[Analysis]) -> bool:
    """True when no analysis failed for a reason that may pass (worth memoising)."""
    return not any(a.error.startswith(TRANSIENT) for a in analyses)


def analyze_all(texts: Sequence[str], user: str = "", limits: ParseLimits = ParseLimits(),
                on_ready: Callable[[int], None] | None = None) -> list[Analysis]:
    """One Analysis per SQL text, parsed outside root's process (see the module docstring).
    on_ready(pid) is called once per child, after it is confined and before it gets SQL."""
    identity = parser_identity(user)
    results: list[Analysis] = []
    deadline = time.monotonic() + limits.total_seconds
    while len(results) < len(texts):
        done, failed = _batch(texts[len(results):], identity, limits, deadline, on_ready)
        results += done
        if failed is None:
            break
        results.append(Analysis(error=f"{failed}: {UNCHECKED}"))
        if failed.setup or time.monotonic() >= deadline:
            rest = f"{NOT_PARSED} ({failed})" if failed.setup else \
                f"{NOT_PARSED}: the parse ran out of its {limits.total_seconds:.0f} s"
            results += [Analysis(error=f"{rest}: {UNCHECKED}")] * (len(texts) - len(results))
    return results
