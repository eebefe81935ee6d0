"""CPU of a steady-state inspection of real gunicorn units, with a cProfile of one. No assertions.

    .venv/bin/python -m tests.bench.profile_inspection [--units 1] [--runs 20] [--profile]

Boots a sandbox systemd running UNITS real gunicorn units of one Flask-Migrate app (as
www-data, against a throwaway PostgreSQL, r3 pending), then inside the sandbox, as the agent
would: one Inspector, a first inspection (probe, journal baseline), then RUNS more inspections
of the unchanged units, each timed with time.process_time() (the agent process: user + system)
and getrusage(RUSAGE_CHILDREN) (subprocesses it reaped), and, precisely (cgroup v2 usage_usec,
exited processes included: tests/bench/cpu.py), what the rest of the sandbox spent but the
gunicorn units and journald (PID 1, session children, dbus, other) and PostgreSQL (in a cgroup
of its own). --profile prints the cProfile of one steady inspection (timer: process_time),
sorted by cumulative CPU. Needs root and PostgreSQL 15.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import socket
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

INSIDE = textwrap.dedent("""
    import cProfile, ctypes, gc, io, json, pstats, resource, statistics, sys, tempfile, time
    from tests.bench.cpu import snapshot, split, unified_root, usage_from_fd
    def rss_kib():
        return int([l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1])
    rss = {"start": rss_kib()}
    from agent.privileged.inspector import Inspector, InspectorSettings
    rss["imported"] = rss_kib()
    before = set(sys.modules)
    units = json.loads(sys.argv[1]); runs = int(sys.argv[2]); profile = sys.argv[3] == "1"
    pg_fds = [int(fd) for fd in sys.argv[4].split(",")]; root = unified_root()
    pg = lambda: [usage_from_fd(fd) for fd in pg_fds]
    exclude = [*units, "systemd-journald.service"]
    state = tempfile.mkdtemp()
    insp = Inspector(InspectorSettings(units=tuple(units), discover_gunicorn=False,
                                       state_path=state + "/state.db"))
    first = insp.inspect(units)
    rss["first inspection"] = rss_kib()
    new_modules = sorted({m.split(".")[0] for m in set(sys.modules) - before})
    insp.inspect(units)
    def children():
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime
    own, kids, parts = [], [], []
    for _ in range(runs):
        tree0, pg0 = snapshot(root), pg()
        c0, p0 = children(), time.process_time()
        snap = insp.inspect(units)
        own.append(time.process_time() - p0); kids.append(children() - c0)
        pg1, tree1 = pg(), snapshot(root)
        parts.append({**split(tree0, tree1, exclude), "pg_backends": pg1[0] - pg0[0] - pg1[1]
                      + pg0[1], "pg_background": pg1[1] - pg0[1]})
    checks = {c.name: c.success for c in snap.units[0].checks}
    out = {"own_ms": [round(x * 1000, 2) for x in own],
           "children_ms": [round(x * 1000, 2) for x in kids],
           "parts_ms": {k: round(sum(p[k] for p in parts) / runs * 1000, 2) for k in parts[0]},
           "probe_runs": insp.probe_runs, "checks": checks,
           "findings": sorted(f.check for f in snap.units[0].findings),
           "pending": list(snap.units[0].migrations.pending) if snap.units[0].migrations else None,
           "connections": snap.units[0].database_connections,
           "rss_kib": rss, "imported_by_the_first_inspection": new_modules}
    rss["steady"] = rss_kib()
    gc.collect(); ctypes.CDLL(None).malloc_trim(0)
    rss["after gc + malloc_trim"] = rss_kib()
    if profile:
        pr = cProfile.Profile(time.process_time); pr.enable(); insp.inspect(units); pr.disable()
        s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(45)
        out["profile"] = s.getvalue()
        s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25)
        out["profile_tottime"] = s.getvalue()
    print(json.dumps(out))
""")


def hold_idle_sockets(count: int) -> list[socket.socket]:
    """count loopback TCP sockets (both ends of count/2 connections), idle."""
    if count <= 0:
        return []
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    listener = socket.create_server(("127.0.0.1", 0), backlog=count)
    held = []
    for _ in range(count // 2):
        held.append(socket.create_connection(listener.getsockname()))
        held.append(listener.accept()[0])
    listener.close()
    return held


def main(argv: list[str] | None = None) -> int:
    import json
    import statistics

    import os
    import subprocess

    from tests.bench.cpu import OwnCgroup, descendants
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
    parser.add_argument("--units", type=int, default=1)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--idle-sockets", type=int, default=0,
                        help="idle loopback TCP connections held open on the host meanwhile "
                             "(pairs: N/2 connections; the sandbox shares the network)")
    args = parser.parse_args(argv)
    idle = hold_idle_sockets(args.idle_sockets)
    cluster = PostgresCluster().start()
    postmaster = cluster._postmaster_pid()   # noqa: SLF001 - the harness's own
    assert postmaster is not None
    pg_group = OwnCgroup(f"driftwatch-bench-pg-{postmaster}", postmaster)
    background = pg_group.split_off("background", descendants(postmaster))  # not backends
    pg_fds = (os.open(pg_group.path / "cpu.stat", os.O_RDONLY),
              os.open(background / "cpu.stat", os.O_RDONLY))
    workspace = new_workspace()
    sb = Sandbox()
    try:
        venv = app_venv()
        db = cluster.new_database()
        app = write_app(workspace / "site", AppSpec(models_at=3))
        db_upgrade(app, venv, db.url, "r2")
        names, ports = [], []
        for i in range(args.units):
            name = "gunicorn.service" if i == 0 else f"gunicorn{i}.service"
            env_file = f"/etc/site{i}/env"
            sb.add_file(env_file, env_file_text({"DATABASE_URL": db.url}))
            port = free_port()
            sb.add_unit(name, gunicorn_unit(venv=venv, app_dir=app, port=port,
                                            environment={"FLASK_APP": "wsgi.py"},
                                            environment_files=[env_file]))
            names.append(name)
            ports.append(port)
        sb.boot()
        for name, port in zip(names, ports):
            sb.systemctl("start", name)
            http_get(f"http://127.0.0.1:{port}/healthz")
            http_get(f"http://127.0.0.1:{port}/db")  # a worker connection to the database
            gunicorn_pids(sb, name)
        # PostgreSQL's cpu.stat is passed open: its cgroup is outside the sandbox's namespace.
        proc = subprocess.run(sb.nsenter_argv(
            ["/usr/bin/env", f"PYTHONPATH={REPO_ROOT}", PYTHON, "-c", INSIDE, json.dumps(names),
             str(args.runs), "1" if args.profile else "0", "%d,%d" % pg_fds]),
            capture_output=True, text=True, timeout=900, pass_fds=pg_fds,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"})
        if proc.returncode != 0:
            print(proc.stdout, proc.stderr)
            return 1
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        own, kids = out.pop("own_ms"), out.pop("children_ms")
        parts = out.pop("parts_ms")
        prof, prof_t = out.pop("profile", ""), out.pop("profile_tottime", "")
        print(f"{args.units} unit(s), {args.runs} steady inspections")
        print(f"agent process CPU per inspection: median {statistics.median(own):.1f} ms "
              f"(min {min(own):.1f}, max {max(own):.1f}); per unit "
              f"{statistics.median(own) / args.units:.1f} ms")
        if idle:
            print(f"with {len(idle)} idle TCP sockets held open on the host")
        print(f"reaped children CPU per inspection: median {statistics.median(kids):.1f} ms")
        print(f"agent process CPU per inspection, total / runs: {sum(own) / len(own):.2f} ms; "
              "the rest per inspection, total / runs (cgroup v2 usage_usec; 'total': the "
              "sandbox but the gunicorn units and journald): "
              + ", ".join(f"{k} {v:.2f} ms" for k, v in parts.items()))
        print(json.dumps(out, indent=1))
        if prof:
            print(prof)
            print(prof_t)
        return 0
    finally:
        for sock in idle:
            sock.close()
        sb.destroy()
        for fd in pg_fds:
            os.close(fd)
        cluster.stop()
        pg_group.close()
        shutil.rmtree(workspace, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
