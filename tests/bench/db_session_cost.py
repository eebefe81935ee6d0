"""CPU of the agent's own database session per steady inspection, by component. No assertions.

    .venv/bin/python -m tests.bench.db_session_cost [--runs 30]

Boots a sandbox systemd running one real gunicorn unit (as www-data, against a throwaway
PostgreSQL, r3 pending), then inside the sandbox one Inspector: three inspections to reach
the steady state, then RUNS more, each measured: the agent process (time.process_time()),
the session child (its transient unit's cgroup cpu.stat usage_usec), PID 1 (init.scope's),
statements and round trips of the kept session. PostgreSQL: the kept session's backend
(pg_backend_pid(), asked before the runs) read from the host in /proc/PID/schedstat (ns)
before and after the runs. Needs root and PostgreSQL 15.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import textwrap

INSIDE = textwrap.dedent(r"""
    import glob, json, sys, tempfile, time
    from agent.privileged.inspector import Inspector, InspectorSettings
    units = json.loads(sys.argv[1]); runs = int(sys.argv[2])
    insp = Inspector(InspectorSettings(units=tuple(units), discover_gunicorn=False,
                                       state_path=tempfile.mkdtemp() + "/state.db"))
    for _ in range(3):
        insp.inspect(units)
    def usage(pattern):
        total = 0
        for path in glob.glob(pattern):
            for line in open(path + "/cpu.stat"):
                if line.startswith("usage_usec"):
                    total += int(line.split()[1])
        return total
    sessions = "/sys/fs/cgroup/unified/system.slice/driftwatch-session-*"
    init = "/sys/fs/cgroup/unified/init.scope"
    conn = next(iter(insp._sessions.held.values())).conn
    def counters():
        return getattr(conn, "statements", 0), getattr(conn, "round_trips", 0)
    print("PID", conn.execute("SELECT pg_backend_pid()").scalar(), flush=True)
    sys.stdin.readline()
    out = {k: [] for k in ("own", "session", "init", "statements", "round_trips")}
    for _ in range(runs):
        s0, i0, c0, p0 = usage(sessions), usage(init), counters(), time.process_time()
        snap = insp.inspect(units)
        out["own"].append((time.process_time() - p0) * 1000)
        out["session"].append((usage(sessions) - s0) / 1000)
        out["init"].append((usage(init) - i0) / 1000)
        c1 = counters()
        out["statements"].append(c1[0] - c0[0])
        out["round_trips"].append(c1[1] - c0[1])
    out["same_session"] = next(iter(insp._sessions.held.values())).conn is conn
    out["checks"] = {c.name: c.success for c in snap.units[0].checks}
    print("DONE", flush=True)
    sys.stdin.readline()
    print(json.dumps(out))
""")


def schedstat_ns(pid: int) -> int:
    """CPU time of a process in ns (precise, unlike /proc/PID/stat's ticks)."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0])


def main(argv: list[str] | None = None) -> int:
    from tests.harness.agent import PYTHON
    from tests.harness.apps import (
        AppSpec,
        app_venv,
        db_upgrade,
        env_file_text,
        gunicorn_pids,
        gunicorn_unit,
        http_get,
        new_workspace,
        write_app,
    )
    from tests.harness.postgres import PostgresCluster, free_port
    from tests.harness.sandbox import Sandbox

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args(argv)
    cluster = PostgresCluster().start()
    workspace = new_workspace()
    sb = Sandbox()
    try:
        venv = app_venv()
        db = cluster.new_database()
        app = write_app(workspace / "site", AppSpec(models_at=3))
        db_upgrade(app, venv, db.url, "r2")
        sb.add_file("/etc/site0/env", env_file_text({"DATABASE_URL": db.url}))
        port = free_port()
        sb.add_unit("gunicorn.service", gunicorn_unit(
            venv=venv, app_dir=app, port=port, environment={"FLASK_APP": "wsgi.py"},
            environment_files=["/etc/site0/env"]))
        sb.boot()
        sb.systemctl("start", "gunicorn.service")
        http_get(f"http://127.0.0.1:{port}/healthz")
        http_get(f"http://127.0.0.1:{port}/db")
        gunicorn_pids(sb, "gunicorn.service")
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
        proc = subprocess.Popen(
            sb.nsenter_argv([PYTHON, "-c", INSIDE, json.dumps(["gunicorn.service"]),
                             str(args.runs)]),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        assert proc.stdin is not None and proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("PID"):
            print(line, proc.stdout.read())
            return 1
        backend = int(line.split()[1])
        before = schedstat_ns(backend)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        proc.stdout.readline()
        after = schedstat_ns(backend)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out = json.loads(proc.stdout.read().strip().splitlines()[-1])
        proc.wait()
        med = statistics.median
        print(f"{args.runs} steady inspections, same session throughout: "
              f"{out['same_session']}; checks {out['checks']}")
        print(f"agent process CPU   median {med(out['own']):.2f} ms")
        print(f"session child CPU   median {med(out['session']):.2f} ms")
        print(f"PID 1 CPU           median {med(out['init']):.2f} ms")
        print(f"PostgreSQL backend  mean {(after - before) / 1e6 / args.runs:.2f} ms")
        print(f"statements / round trips per inspection: {med(out['statements']):g} / "
              f"{med(out['round_trips']):g}")
        return 0
    finally:
        sb.destroy()
        cluster.stop()
        shutil.rmtree(workspace, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
