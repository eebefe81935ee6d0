"""RSS of the agent's real unit watching N gunicorn units, per process, and which heavy
libraries each process has mapped (issue #9's "agent RSS, 20 units").

    .venv/bin/python -m tests.bench.agent_rss [--units 20] [--inspections 3]   # as root

One sandboxed systemd runs N units of the standard test app (each on its own database, cloned
from one migrated template) and `driftwatch-agent.service`; after the first inspection of all
units and a few steady ones (forced by `min_interval_seconds = 0` and repeated scrapes), it
prints VmRSS of every process of the agent's unit and the heavy libraries mapped in each.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import types
from collections.abc import Sequence

from tests.bench import bench9
from tests.bench.bench9 import AGENT_UNIT, ENV_DIR, Postgres, fetch, wait_for
from tests.harness.sandbox import REPO_ROOT

#: Libraries whose compiled parts show in /proc/PID/maps once imported.
HEAVY = ("sqlalchemy", "psycopg2", "lxml", "pystemd", "psutil", "prometheus_client", "yaml",
         "systemd", "pglast", "alembic")

_PROBE = """
import json, re
from pathlib import Path
from tests.bench.cpu import _unit_of
HEAVY = {heavy!r}
DETAIL = {detail!r}
out = []
for p in Path('/proc').iterdir():
    if not (p.name.isdigit() and _unit_of(int(p.name), Path('/proc')) == {unit!r}):
        continue
    st = dict(l.split(':', 1) for l in (p / 'status').read_text().splitlines())
    libs = set()
    for line in (p / 'maps').read_text().splitlines():
        m = re.search(r'/(?:site|dist)-packages/([A-Za-z0-9_]+)', line)
        if m and m.group(1) in HEAVY:
            libs.add(m.group(1))
        elif '/libcrypto.so' in line:
            libs.add('libcrypto')
    top = {{}}
    if DETAIL:
        current = None
        for line in (p / 'smaps').read_text().splitlines():
            head = line.split()
            if head and '-' in head[0] and not head[0].endswith(':'):
                current = head[5] if len(head) > 5 else '[anon]'
            elif head and head[0] == 'Rss:':
                top[current] = top.get(current, 0) + int(head[1])
        top = dict(sorted(top.items(), key=lambda kv: -kv[1])[:12])
    cmd = (p / 'cmdline').read_bytes().replace(b'\\0', b' ').decode(errors='replace').strip()
    out.append((int(p.name), cmd[-60:], int(st.get('VmRSS', '0 kB').split()[0]), sorted(libs), top))
print(json.dumps(out))
"""


def agent_processes(sb: object, detail: bool = False) -> list[tuple[int, str, float, list[str]]]:
    """(pid, command tail, VmRSS MiB, heavy libraries mapped) of every agent process; DETAIL
    prints the mappings holding most of each one's RSS."""
    code = _PROBE.format(heavy=HEAVY, unit=AGENT_UNIT, detail=detail)
    proc = sb.run(["/usr/bin/env", f"PYTHONPATH={REPO_ROOT}", sys.executable,  # type: ignore
                   "-c", code])
    out = []
    for pid, cmd, kib, libs, top in json.loads(proc.stdout):
        for mapping, rss in top.items():
            print(f"    {pid} {rss / 1024:6.1f} MiB  {mapping}")
        out.append((pid, cmd, kib / 1024, libs))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Boot, inspect, print RSS per process."""
    from tests.harness.agent import agent_config, agent_unit_dropins, agent_unit_text
    from tests.harness.apps import app_venv, db_upgrade, env_file_text, gunicorn_unit, \
        new_workspace, write_app
    from tests.harness.postgres import free_port
    from tests.harness.sandbox import Sandbox

    parser = argparse.ArgumentParser(prog="agent_rss")
    parser.add_argument("--units", type=int, default=20)
    parser.add_argument("--inspections", type=int, default=3)
    parser.add_argument("--detail", action="store_true", help="the largest mappings")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra Environment= for the agent's unit (a drop-in)")
    args = parser.parse_args(argv)
    venv = app_venv()
    pg = Postgres()
    workspace = new_workspace()
    sb = None
    try:
        app = write_app(workspace / "site")
        template = pg.cluster.new_database()
        db_upgrade(app, venv, template.url)
        dbs = [pg.clone(template, f"{template.name}_r{i:02d}") for i in range(args.units)]
        sb = Sandbox()
        units = [f"app{i:02d}.service" for i in range(args.units)]
        ports = {name: free_port() for name in (*units, AGENT_UNIT)}
        for unit, db in zip(units, dbs):
            env = f"{ENV_DIR}/{unit}.env"
            sb.add_file(env, env_file_text({"DATABASE_URL": db.url}), mode=0o640)
            sb.add_unit(unit, gunicorn_unit(venv=venv, app_dir=app, port=ports[unit], workers=1,
                                            environment={"FLASK_APP": "wsgi.py"},
                                            environment_files=[env]))
        sb.add_file("/etc/driftwatch/agent.toml", agent_config(
            f"127.0.0.1:{ports[AGENT_UNIT]}", units=units, discover_gunicorn=False,
            min_interval_seconds=0))
        dropins = agent_unit_dropins()
        if args.env:
            dropins["zz-env.conf"] = "[Service]\n" + "".join(f"Environment={e}\n" for e in args.env)
        sb.add_unit(AGENT_UNIT, agent_unit_text(), dropins)
        sb.boot()
        sb.systemctl("start", *units)
        for unit in units:
            wait_for(lambda u=unit: bool(fetch(ports[u], "/healthz")), 120,  # type: ignore
                     f"{unit} to answer")
        if sb.systemctl("start", AGENT_UNIT, check=False).returncode:
            print(sb.run(["journalctl", "-u", AGENT_UNIT, "--no-pager"], check=False).stdout)
            return 1
        port = ports[AGENT_UNIT]
        watched = f"driftwatch_units_watched {float(len(units))}".encode()
        wait_for(lambda: watched in fetch(port), 300, "the agent's first full inspection")
        peak: dict[int, float] = {}
        last: list[tuple[int, str, float, list[str]]] = []
        for _ in range(args.inspections):
            body = fetch(port)
            time.sleep(0.5)
            last = agent_processes(sb, args.detail and _ == args.inspections - 1)
            for pid, _cmd, mib, _libs in last:
                peak[pid] = max(peak.get(pid, 0.0), mib)
        print(f"agent RSS, {len(units)} units, after {args.inspections} scrapes ({len(body)} bytes):")
        for pid, cmd, mib, libs in last:
            print(f"  pid {pid:>6}  {mib:6.1f} MiB (peak {peak[pid]:.1f})  {cmd}")
            print(f"          heavy libraries mapped: {', '.join(libs) or '-'}")
        print(f"  total {sum(m for _, _, m, _ in last):.1f} MiB "
              f"(peak sum {sum(peak.values()):.1f} MiB)")
        # The kept read-only sessions, outside the agent's unit (as the apps' users).
        sessions = bench9.agent_rss(types.SimpleNamespace(sb=sb))[1]  # type: ignore[arg-type]
        print(f"session children: {len(sessions)} processes, VmRSS "
              f"{sum(m for _, m, _ in sessions):.1f} MiB, Pss {sum(p for _, _, p in sessions):.1f} MiB")
        return 0
    finally:
        if sb is not None:
            sb.destroy()
        pg.stop()
        shutil.rmtree(workspace, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
