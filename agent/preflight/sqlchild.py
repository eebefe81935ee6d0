"""The parser child: pglast on the app's SQL, unprivileged, confined and bounded.

Started by parse.py as root (``python -I -B -m agent.preflight.sqlchild CONFIG``), it loads
pglast and the rules from the agent's own installation first, while it can still read them
(the agent's venv may sit in a directory only root enters), then confines itself before it
reads a byte of SQL: chroot into an empty directory, no supplementary groups, the target
uid/gid (the unit's user, else nobody), no_new_privs, not dumpable, only fds 0-2, and
rlimits on memory (RLIMIT_AS), CPU per revision, files, processes and core dumps. As
OpenSSH's pre-auth child does. It then says "ready", reads the SQL texts (one JSON document
on stdin) and writes one JSON line per revision on fd 3 (stdout, moved there): the analysis,
as plain data (wire.py).
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import sys
from typing import Any

from agent.preflight.analysis import Analysis
from agent.preflight.rules import analyze
from agent.preflight.wire import MAX_ERROR, to_wire

PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 4, 38
# One statement per branch of the rules, and a syntax error: everything the parse and the
# reply need is imported (and lazily set up) before the chroot, where nothing can be loaded.
WARM_UP = """BEGIN; CREATE TABLE w (id INT PRIMARY KEY REFERENCES o (id));
CREATE INDEX CONCURRENTLY ix ON t (a); CREATE INDEX ix2 ON t (a); DROP INDEX ix3;
ALTER TABLE t ADD COLUMN c UUID NOT NULL DEFAULT gen_random_uuid(), ADD COLUMN d SERIAL,
  ALTER COLUMN e TYPE VARCHAR(20), ALTER COLUMN e SET NOT NULL, DROP COLUMN f,
  ADD CONSTRAINT k FOREIGN KEY (a) REFERENCES o (id) NOT VALID, ADD CHECK (a > 0),
  ADD UNIQUE (a), ADD PRIMARY KEY USING INDEX ix, VALIDATE CONSTRAINT k, SET LOGGED;
ALTER TABLE t RENAME COLUMN a TO b; ALTER TABLE t RENAME TO u; DROP TABLE v;
UPDATE alembic_version SET version_num = 'x'; DELETE FROM t; INSERT INTO t VALUES (1);
TRUNCATE t; SET lock_timeout = '1s'; SELECT 1; CREATE SEQUENCE s; COMMIT;"""


REPLY_FD = 3  # the reply channel: stdout moved here, so a C library's printf can't reach it


def _write(doc: dict[str, Any], fd: int = REPLY_FD) -> None:
    """One JSON line to root, unbuffered (root reads line by line, under a deadline)."""
    data = (json.dumps(doc) + "\n").encode()
    while data:
        data = data[os.write(fd, data):]


def warm_up() -> None:
    """Run every code path once, so nothing is imported after the chroot."""
    for sql in (WARM_UP, "SELEC 1"):
        json.dumps(to_wire(analyze(sql)))
    try:
        raise MemoryError
    except MemoryError:
        pass


def confine(config: dict[str, Any]) -> None:
    """Drop everything this process does not need to parse text; raises OSError if it can't."""
    libc = ctypes.CDLL(None, use_errno=True)
    if os.geteuid() == 0:
        os.chroot(config["root"])
        os.chdir("/")
        os.setgroups([])
        os.setresgid(config["gid"], config["gid"], config["gid"])
        os.setresuid(config["uid"], config["uid"], config["uid"])
        if 0 in os.getresuid() or 0 in os.getresgid():
            raise OSError("still root after setresuid")
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:
            raise OSError("could become root again")
    for option, value in ((PR_SET_NO_NEW_PRIVS, 1), (PR_SET_DUMPABLE, 0)):
        if libc.prctl(option, value, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl failed")
    os.closerange(3, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    # libpg_query writes "Terminating process due to FATAL error" to stdout before exit(1):
    # the replies get a descriptor of their own, and stdout goes where stderr goes.
    os.dup2(1, REPLY_FD)
    os.dup2(2, 1)
    for limit, value in ((resource.RLIMIT_AS, config["memory_bytes"]),
                         (resource.RLIMIT_CORE, 0), (resource.RLIMIT_FSIZE, 0),
                         (resource.RLIMIT_NOFILE, REPLY_FD + 1), (resource.RLIMIT_NPROC, 0)):
        value = _within_hard(limit, value)
        resource.setrlimit(limit, (value, value))


def _within_hard(limit: int, value: int) -> int:
    """value, or the hard limit already set when that is lower (a limit can only go down)."""
    hard = resource.getrlimit(limit)[1]
    return value if hard == resource.RLIM_INFINITY else min(value, hard)


def cpu_budget(seconds: int) -> None:
    """Let this revision use `seconds` more CPU, then SIGXCPU (default action: die)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    used = int(usage.ru_utime + usage.ru_stime) + 1
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    resource.setrlimit(resource.RLIMIT_CPU, (_within_hard(resource.RLIMIT_CPU, used + seconds),
                                             hard))


def parse_one(sql: str, memory_bytes: int) -> Analysis:
    """analyze(), with the failures Python can still report turned into the analysis' error."""
    try:
        return analyze(sql)
    except MemoryError:
        return Analysis(error="the SQL parser ran out of memory (its limit is "
                              f"{memory_bytes // 2**20} MiB)")
    except RecursionError:
        return Analysis(error="the SQL is nested too deeply for the parser")
    except Exception as exc:  # pglast's own errors; the reply must still be one line
        return Analysis(error=f"the SQL parser failed: {type(exc).__name__}: {exc}"[:MAX_ERROR])


def main(argv: list[str]) -> int:
    """Confine, say ready, parse each SQL text from stdin, one JSON line per revision."""
    config = json.loads(argv[1])
    try:
        warm_up()
        confine(config)
    except (OSError, ValueError) as exc:
        _write({"error": f"cannot confine the parser: {exc}"[:MAX_ERROR]}, fd=1)
        return 1
    _write({"ready": True})
    request = json.loads(sys.stdin.buffer.read(config["max_input"] + 1))
    for i, sql in enumerate(request["sql"]):
        cpu_budget(config["cpu_seconds"])
        analysis = parse_one(sql, config["memory_bytes"])
        if analysis.error:
            analysis = Analysis(analysis.statements, analysis.hazards,
                                analysis.created_tables, analysis.error[:MAX_ERROR])
        try:
            _write({"i": i, "analysis": to_wire(analysis)})
        except MemoryError:  # the reply itself did not fit: say so in a small one
            _write({"i": i, "analysis": to_wire(Analysis(
                error=f"the SQL parser ran out of memory (its limit is "
                      f"{config['memory_bytes'] // 2**20} MiB)"))})
    _write({"done": True})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
