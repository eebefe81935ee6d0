"""Issue #9's table in one run: every row measured against its anchor. Ratios, no pass/fail.

    .venv/bin/python -m tests.bench.bench9            # as root, from the repository root
    .venv/bin/python -m tests.bench.bench9 --quick    # fewer rounds, 5 units (~3 min)

One sandboxed systemd (tests/harness/sandbox.py) runs N gunicorn units of the standard test
app (each on its own database, cloned from one migrated template), one unit of the
1,000-model app (tests/harness/bigapp.py), node_exporter with only the systemd collector and
the agent's own unit; PostgreSQL 15 runs throwaway on the host's loopback. A and B are
alternated round by round; each row prints the median ratio and its range over the rounds.

CPU is precise (tests/bench/cpu.py: cgroup v2 usage_usec and getrusage, microseconds, exited
processes included): for driftwatch, the inspecting process (getrusage) plus the sandbox's
cgroup tree but the apps' units, node_exporter, the agent's unit and journald (PID 1, the
session children's and probes' transient units, dbus); for the anchors the commands' own
processes (getrusage of reaped children); both plus the PostgreSQL cluster's cgroup
meanwhile. A steady round's value is the total over its k inspections divided by k. The inspections are the agent's own Inspector
(agent.privileged.inspector.make_inspector) run inside the sandbox by tests/bench/inspect_in_sandbox.py,
so the benchmark measures whatever code is in the tree.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.bench.cpu import SESSION_PREFIX, OwnCgroup, descendants

REPO_ROOT = Path(__file__).resolve().parents[2]
NODE_EXPORTER = REPO_ROOT / ".tools/usr/bin/prometheus-node-exporter"
# What Prometheus 2.x sends on every scrape.
PROMETHEUS_HEADERS = {
    "Accept": "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
              "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    "Accept-Encoding": "gzip",
    "User-Agent": "Prometheus/2.42.0",
}
AGENT_UNIT = "driftwatch-agent.service"
NODE_UNIT = "node-exporter.service"
BIG_UNIT = "bigapp.service"
ENV_DIR = "/etc/bench"


# -- the table ----------------------------------------------------------------------------------

@dataclass
class Row:
    """One row of #9's table: both sides' medians, the ratio per round, the target."""

    measure: str
    anchor: str
    target: str
    unit: str = ""
    anchor_values: list[float] = field(default_factory=list)
    ours_values: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    note: str = ""
    skipped: str = ""

    def cells(self) -> tuple[str, str, str, str, str]:
        if self.skipped:
            return self.measure, self.anchor, "skipped", self.skipped, self.target
        anchor = f"{_num(statistics.median(self.anchor_values))}{self.unit}" \
            if self.anchor_values else self.anchor
        if self.anchor_values:
            anchor = f"{self.anchor}: {anchor}"
        ours = f"{_num(statistics.median(self.ours_values))}{self.unit}" \
            if self.ours_values else "-"
        ratio = "-"
        if self.ratios:
            ratio = f"{_num(statistics.median(self.ratios))}x"
            if len(self.ratios) > 1:
                ratio += f" [{_num(min(self.ratios))}-{_num(max(self.ratios))}]"
        return self.measure, anchor, ours, ratio, self.target


def _num(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 0.1:
        return f"{value:.2f}"
    return f"{value:.2g}"


def print_table(rows: Sequence[Row]) -> None:
    head = ("measure", "anchor (median)", "driftwatch (median)", "ratio [range]", "target")
    table = [head, *[r.cells() for r in rows]]
    widths = [max(len(line[i]) for line in table) for i in range(len(head))]
    for n, line in enumerate(table):
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))
    for r in rows:
        if r.note:
            print(f"- {r.measure}: {r.note}")


def machine() -> str:
    """The machine in one line: CPU model, cores, memory, kernel, Python."""
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{model}, {os.cpu_count()} cores, {mem:.0f} GiB, Linux {platform.release()}, "
            f"Python {platform.python_version()}")


# -- CPU of the anchors and of PostgreSQL --------------------------------------------------------

def children_cpu() -> float:
    """CPU seconds of this process's reaped children so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Postgres:
    """The throwaway cluster in a cgroup of its own, and the CPU its processes spent."""

    def __init__(self) -> None:
        from tests.harness.postgres import PostgresCluster

        self.cluster = PostgresCluster().start()
        postmaster = self.cluster._postmaster_pid()   # noqa: SLF001 - the harness's own
        assert postmaster is not None
        try:
            # No autovacuum on these static databases: with 20+ of them a worker starts every
            # few seconds and would land in the backends' count at random.
            self.cluster.execute("ALTER SYSTEM SET autovacuum = off")
            self.cluster.execute("SELECT pg_reload_conf()")
            # The postmaster first, so every backend it forks from now on is born inside.
            self.group = OwnCgroup(f"driftwatch-bench-pg-{postmaster}", postmaster)
            # What runs now are the background processes (checkpointer, walwriter, autovacuum
            # launcher...): a child group of their own, so backends are told apart.
            background = self.group.split_off("background", descendants(postmaster))
            self.cpu_fd = os.open(self.group.path / "cpu.stat", os.O_RDONLY)
            self.background_fd = os.open(background / "cpu.stat", os.O_RDONLY)
        except BaseException:
            self.cluster.stop()
            raise

    def cpu(self) -> float:
        return self.group.cpu()

    def clone(self, template: Any, name: str) -> Any:
        """A new database copied from TEMPLATE (same owner and password): no migration run."""
        from dataclasses import replace

        self.cluster.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template.name}" '
                             f'OWNER "{template.owner}"')
        return replace(template, name=name)

    def stop(self) -> None:
        os.close(self.cpu_fd)
        os.close(self.background_fd)
        self.cluster.stop()
        self.group.close()


def timed_cpu(fn: Callable[[], Any], pg: Postgres) -> tuple[float, float]:
    """(CPU of FN's child processes, CPU of PostgreSQL) while FN runs."""
    c0, p0 = children_cpu(), pg.cpu()
    fn()
    return children_cpu() - c0, pg.cpu() - p0


# -- the sandbox and the inspector inside it -----------------------------------------------------

class InSandbox:
    """tests/bench/inspect_in_sandbox.py running inside the sandbox, one command at a time."""

    def __init__(self, sb: Any, exclude: Sequence[str], probe_timeout: float,
                 pg: Postgres) -> None:
        argv = sb.nsenter_argv(["/usr/bin/env", f"PYTHONPATH={REPO_ROOT}", sys.executable,
                                                "-m", "tests.bench.inspect_in_sandbox",
                                "--exclude", ",".join(exclude),
                                "--probe-timeout", str(probe_timeout),
                                "--pg-cpu-fds", f"{pg.cpu_fd},{pg.background_fd}"])
        # PostgreSQL's cpu.stat files are passed open: its cgroup is outside the sandbox's
        # cgroup namespace.
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, pass_fds=(pg.cpu_fd, pg.background_fd),
                                     env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                          "LANG": "C.UTF-8"})

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the in-sandbox inspector died on {command!r}")
        return json.loads(line)

    def inspect(self, units: Sequence[str], count: int) -> tuple[float, dict[str, Any]]:
        """COUNT inspections of UNITS: CPU seconds per inspection incl. PostgreSQL (the total
        over all COUNT divided by COUNT), and the answer (per-part totals: see PARTS)."""
        answer = self.ask(f"inspect {count} {','.join(units)}")
        return sum(answer[part] for part in ("own", "sandbox", "pg")) / count, answer

    def close(self) -> None:
        try:
            self.ask("quit")
        except (RuntimeError, OSError, ValueError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()     # our own child, by its PID
            self.proc.wait(5)


# The parts of one inspection's CPU the in-sandbox inspector reports, as the notes name them.
PARTS = (("own", "the inspecting process"), ("pid1", "PID 1 (init.scope)"),
         ("sessions", "the session children's transient units"),
         ("dbus", "dbus-daemon"), ("probes", "probe units"),
         ("other", "other sandbox processes"),
         ("pg_backends", "PostgreSQL backends (and the postmaster)"),
         ("pg_background", "PostgreSQL background processes"))


# -- HTTP: reused connections, a bare prometheus_client server -----------------------------------

def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def scrape_load(port: int, connections: int, seconds: float) -> tuple[float, float, int]:
    """CONNECTIONS clients, each on its own connection (reused where the server keeps it
    open), scraping /metrics with Prometheus' headers for SECONDS: (p50 s, req/s, errors)."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    barrier = threading.Barrier(connections)
    stop_at = [0.0]

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine: list[float] = []
        barrier.wait()
        while time.perf_counter() < stop_at[0]:
            start = time.perf_counter()
            try:
                conn.request("GET", "/metrics", headers=PROMETHEUS_HEADERS)
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    raise OSError(f"HTTP {resp.status}")
                mine.append(time.perf_counter() - start)
            except (OSError, http.client.HTTPException):
                with lock:
                    errors[0] += 1
                conn.close()
        conn.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(connections)]
    stop_at[0] = time.perf_counter() + 3600
    for t in threads:
        t.start()
    begin = time.perf_counter()
    stop_at[0] = begin + seconds
    for t in threads:
        t.join()
    wall = time.perf_counter() - begin
    if not latencies:
        raise RuntimeError(f"no successful scrape of port {port} ({errors[0]} errors)")
    return statistics.median(latencies), len(latencies) / wall, errors[0]


def serve_static(path: str) -> None:
    """Child: a bare prometheus_client server (start_http_server) exposing the series in PATH
    (an exposition in text format); prints its port, serves until stdin closes."""
    from prometheus_client import start_http_server
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client.registry import CollectorRegistry

    families = list(text_string_to_metric_families(Path(path).read_text()))

    class Static:
        def collect(self) -> Any:
            return families

    registry = CollectorRegistry()
    registry.register(Static())  # type: ignore[arg-type]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    print(port, flush=True)
    sys.stdin.read()
    server.shutdown()


class StaticServer:
    """The bare prometheus_client server in its own process (ended by its PID)."""

    def __init__(self, exposition: bytes, workdir: Path) -> None:
        path = workdir / "same-series.prom"
        path.write_bytes(exposition)
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.bench.bench9",
                                      "--serve-static", str(path)], cwd=REPO_ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.strip().isdigit():
            self.close()
            raise RuntimeError("the prometheus_client server did not start")
        self.port = int(line)

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def fetch(port: int, path: str = "/metrics") -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"GET {path} on {port}: HTTP {resp.status}")
        return body
    finally:
        conn.close()


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (OSError, RuntimeError, http.client.HTTPException):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"timed out waiting for {what}")


# -- 10,000 idle loopback sockets ----------------------------------------------------------------

class IdleSockets:
    """PAIRS established loopback TCP connections (2 x PAIRS sockets), idle until closed."""

    def __init__(self, pairs: int) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = 2 * pairs + 1024
        if soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4096)
        self.socks: list[socket.socket] = []
        address = self.listener.getsockname()
        try:
            for _ in range(pairs):
                client = socket.create_connection(address)
                self.socks.append(client)
                self.socks.append(self.listener.accept()[0])
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        for s in self.socks:
            s.close()
        self.socks.clear()
        self.listener.close()


def tcp_sockets() -> int:
    """TCP sockets on the host (every line of /proc/net/tcp and tcp6 but the headers)."""
    total = 0
    for name in ("tcp", "tcp6"):
        try:
            total += len(Path(f"/proc/net/{name}").read_text().splitlines()) - 1
        except OSError:
            pass
    return total


# -- the run ----------------------------------------------------------------------------------

def say(text: str) -> None:
    print(f"[bench9 {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def unavailable_reason() -> str | None:
    from tests.harness.apps import BASE_PYTHON
    from tests.harness.postgres import postgres_unavailable_reason
    from tests.harness.sandbox import sandbox_unavailable_reason

    if os.geteuid() != 0:
        return "not root (the sandbox and the probe's user switch need root)"
    if not os.access(BASE_PYTHON, os.X_OK):
        return f"{BASE_PYTHON} missing (the test apps' venv is built from it)"
    return sandbox_unavailable_reason() or postgres_unavailable_reason()


@dataclass
class Rig:
    """Everything the rows measure on, built once."""

    pg: Postgres
    venv: Path
    workspace: Path
    app: Any
    dbs: list[Any]
    big: Any
    big_db: Any
    sb: Any
    units: list[str]
    ports: dict[str, int]


def build(args: argparse.Namespace) -> Rig:
    """PostgreSQL, the apps and their databases, the sandbox with every unit started."""
    from tests.harness.agent import agent_config, agent_unit_dropins, agent_unit_text
    from tests.harness.apps import (app_venv, db_upgrade, env_file_text, gunicorn_unit,
                                    new_workspace, write_app)
    from tests.harness.bigapp import write_bigapp
    from tests.harness.postgres import free_port
    from tests.harness.sandbox import Sandbox

    venv = app_venv()
    pg = Postgres()
    workspace = new_workspace()
    sb = None
    try:
        say("migrating the standard app's template database and cloning it per unit")
        app = write_app(workspace / "site")
        template = pg.cluster.new_database()
        db_upgrade(app, venv, template.url)
        dbs = [pg.clone(template, f"{template.name}_u{i:02d}") for i in range(args.units)]
        say(f"writing the {args.models}-model app and migrating its database")
        big = write_bigapp(workspace / "big", models=args.models)
        big_db = pg.cluster.new_database()
        db_upgrade(big, venv, big_db.url, timeout=900)

        sb = Sandbox()
        units = [f"app{i:02d}.service" for i in range(args.units)]
        ports = {name: free_port() for name in (*units, BIG_UNIT, NODE_UNIT, AGENT_UNIT)}
        for unit, db in zip(units, dbs):
            env = f"{ENV_DIR}/{unit}.env"
            sb.add_file(env, env_file_text({"DATABASE_URL": db.url}), mode=0o640)
            sb.add_unit(unit, gunicorn_unit(venv=venv, app_dir=app, port=ports[unit], workers=1,
                                            environment={"FLASK_APP": "wsgi.py"},
                                            environment_files=[env]))
        env = f"{ENV_DIR}/{BIG_UNIT}.env"
        sb.add_file(env, env_file_text({"DATABASE_URL": big_db.url}), mode=0o640)
        sb.add_unit(BIG_UNIT, gunicorn_unit(venv=venv, app_dir=big, port=ports[BIG_UNIT],
                                            workers=1, environment={"FLASK_APP": "wsgi.py"},
                                            environment_files=[env]))
        sb.add_unit(NODE_UNIT, "\n".join([
            "[Unit]", "Description=node_exporter, systemd collector only", "", "[Service]",
            f"ExecStart={NODE_EXPORTER} --collector.disable-defaults --collector.systemd "
            f"--collector.systemd.private --web.listen-address=127.0.0.1:{ports[NODE_UNIT]}",
            ""]))
        sb.add_file("/etc/driftwatch/agent.toml", agent_config(
            f"127.0.0.1:{ports[AGENT_UNIT]}", units=units, discover_gunicorn=False,
            min_interval_seconds=3600))
        sb.add_unit(AGENT_UNIT, agent_unit_text(), agent_unit_dropins())
        say(f"booting the sandbox, starting {len(units)} + 1 gunicorn units")
        sb.boot()
        sb.systemctl("start", *units, BIG_UNIT)
        for unit in (*units, BIG_UNIT):
            wait_for(lambda u=unit: bool(fetch(ports[u], "/healthz")), 120,  # type: ignore[misc]
                     f"{unit} to answer")
        return Rig(pg, venv, workspace, app, dbs, big, big_db, sb, units, ports)
    except BaseException:
        if sb is not None:
            sb.destroy()
        pg.stop()
        shutil.rmtree(workspace, ignore_errors=True)
        raise


def runbook(rig: Rig) -> None:
    """What an admin runs today for one unit: flask db current, heads and check, as its user,
    in its venv and environment."""
    from tests.harness.apps import APP_USER, flask_db

    url = rig.dbs[0].url
    for args in (("current",), ("heads",), ("check",)):
        flask_db(rig.app, rig.venv, url, *args, user=APP_USER, check=args != ("check",))


def big_check(rig: Rig) -> None:
    from tests.harness.apps import flask_db_check

    result = flask_db_check(rig.big, rig.venv, rig.big_db.url)
    if not result.clean:
        raise RuntimeError(f"flask db check of the big app is not clean: {result.output[-500:]}")


def med(values: Sequence[float]) -> float:
    return statistics.median(values)


def inspection_rows(rig: Rig, args: argparse.Namespace, rows: dict[str, Row]) -> None:
    """Rows 1, 2, 3, 4 and 8: the Inspector inside the sandbox against the anchors."""
    exclude = [*rig.units, BIG_UNIT, NODE_UNIT, AGENT_UNIT, "systemd-journald.service"]
    inside = InSandbox(rig.sb, exclude, args.probe_timeout, rig.pg)
    one = rig.units[:1]
    k = args.inspections
    notes: list[str] = []
    try:
        say("first inspection of one unit (fills the memo)")
        _, answer = inside.inspect(one, 1)
        if answer["failed_checks"]:
            notes.append("failed checks: " + "; ".join(answer["failed_checks"]))
        say(f"first inspection of all {len(rig.units)} units")
        _, answer = inside.inspect(rig.units, 1)
        if answer["failed_checks"]:
            notes.append("failed checks (all units): " + "; ".join(answer["failed_checks"][:3]))
        r1, r2, r8 = rows["steady"], rows["units"], rows["sockets"]
        split: list[dict[str, float]] = []
        for n in range(args.rounds):
            say(f"round {n + 1}/{args.rounds}: runbook vs steady inspections, "
                f"{len(rig.units)} units, idle sockets")
            cmd, pg_cmd = timed_cpu(lambda: runbook(rig), rig.pg)
            single, answer = inside.inspect(one, k)
            split.append({part: answer[part] / k for part, _ in PARTS})
            sessions_one = answer["session_units"]
            r1.anchor_values.append((cmd + pg_cmd) * 1000)
            r1.ours_values.append(single * 1000)
            r1.ratios.append((cmd + pg_cmd) / single)
            # One unmeasured run of all units first: the single-unit runs just before left
            # the others out, so this run would re-read their journals one by one (to rejoin
            # the shared read), which the daemon, inspecting every unit each time, never does.
            inside.inspect(rig.units, 1)
            many, answer = inside.inspect(rig.units, max(1, k // 3))
            r2.anchor_values.append(single * 1000)
            r2.ours_values.append(many * 1000)
            r2.ratios.append(many / single)
            sockets = IdleSockets(args.sockets // 2)
            try:
                count = tcp_sockets()
                loaded, _ = inside.inspect(one, k)
            finally:
                sockets.close()
            r8.anchor_values.append(single * 1000)
            r8.ours_values.append(loaded * 1000)
            r8.ratios.append(loaded / single)
            r8.note = f"{count} TCP sockets on the host while measured (/proc/net/tcp{{,6}})"
        r1.note = "per inspection, medians over the rounds: " + ", ".join(
            f"{name} {med([s[part] for s in split]) * 1000:.2f} ms" for part, name in PARTS
            if part != "probes" or any(s["probes"] for s in split)) + (
            f"; {sessions_one} session unit(s) alive; the inspecting process sits in "
            f"cgroup {answer['own_cgroup']} (outside the sandbox's: nsenter keeps the "
            "host's), so it is measured by getrusage")
        r2.note = f"{len(rig.units)} units vs 1; RSS of the inspecting process after: " \
                  f"{answer['rss_kib'] / 1024:.0f} MiB"
        r3, r4 = rows["first"], rows["memo"]
        for n in range(args.rounds):
            say(f"round {n + 1}/{args.rounds}: flask db check vs first and memo drift checks "
                f"at {args.models} models")
            cmd, pg_cmd = timed_cpu(lambda: big_check(rig), rig.pg)
            anchor = cmd + pg_cmd
            inside.ask("reset")
            first, answer = inside.inspect([BIG_UNIT], 1)
            if answer["failed_checks"]:
                r3.note = "failed checks: " + "; ".join(answer["failed_checks"])
            memo, _ = inside.inspect([BIG_UNIT], k)
            for row, value in ((r3, first), (r4, memo)):
                row.anchor_values.append(anchor)
                row.ours_values.append(value)
                row.ratios.append(value / anchor)
        if notes:
            rows["units"].note += " | " + " | ".join(dict.fromkeys(notes))
    finally:
        inside.close()


def agent_rss(rig: Rig) -> tuple[list[tuple[str, float]], list[tuple[str, float, float]]]:
    """(name, VmRSS MiB) of every process of the agent's unit (the daemon, its worker), and
    (name, VmRSS MiB, Pss MiB) of every process of the session children's transient units
    (the kept read-only sessions run as the apps' users outside the agent's unit), as the
    sandbox's /proc shows them. Pss shares the pages the sessions have in common out."""
    code = ("import json; from pathlib import Path; from tests.bench.cpu import _unit_of\n"
            "out = []\n"
            "for p in Path('/proc').iterdir():\n"
            "    unit = _unit_of(int(p.name), Path('/proc')) if p.name.isdigit() else ''\n"
            f"    if unit == {AGENT_UNIT!r} or unit.startswith({SESSION_PREFIX!r}):\n"
            "        try:\n"
            "            text = (p / 'status').read_text()\n"
            "        except OSError:\n"
            "            continue\n"
            "        st = dict(l.split(':', 1) for l in text.splitlines())\n"
            "        try:\n"
            "            pss = int(next(l.split()[1] for l in (p / 'smaps_rollup')\n"
            "                           .read_text().splitlines() if l.startswith('Pss:')))\n"
            "        except (OSError, StopIteration):\n"
            "            pss = 0\n"
            "        out.append((unit, st['Name'].strip(),\n"
            "                    int(st.get('VmRSS', '0 kB').split()[0]), pss))\n"
            "print(json.dumps(out))\n")
    proc = rig.sb.run(["/usr/bin/env", f"PYTHONPATH={REPO_ROOT}", sys.executable, "-c", code])
    found = json.loads(proc.stdout)
    return ([(name, kib / 1024) for unit, name, kib, _ in found if unit == AGENT_UNIT],
            [(name, kib / 1024, pss / 1024) for unit, name, kib, pss in found
             if unit != AGENT_UNIT])


def http_rows(rig: Rig, args: argparse.Namespace, rows: dict[str, Row]) -> None:
    """Rows 5, 6 and 7: the agent's unit serving /metrics for N units."""
    agent, node = rig.ports[AGENT_UNIT], rig.ports[NODE_UNIT]
    say("starting the agent and node_exporter; waiting for the first inspection of all units")
    rig.sb.systemctl("start", AGENT_UNIT, NODE_UNIT)
    watched = f"driftwatch_units_watched {float(len(rig.units))}".encode()
    wait_for(lambda: watched in fetch(agent), 300, "the agent's first full inspection")
    wait_for(lambda: b"node_systemd_unit_state" in fetch(node), 60, "node_exporter")
    time.sleep(1)
    exposition = fetch(agent)
    static = StaticServer(exposition, rig.workspace)
    samples = [agent_rss(rig)]
    r5, r6, r7 = rows["p50"], rows["rps"], rows["rss"]
    try:
        for n in range(args.rounds):
            say(f"round {n + 1}/{args.rounds}: /metrics at {args.connections} connections, "
                f"{args.seconds:g} s each: prometheus_client, driftwatch, node_exporter")
            order = [("static", static.port), ("agent", agent), ("node", node)]
            order = order[n % 3:] + order[:n % 3]
            result = {name: scrape_load(port, args.connections, args.seconds)
                      for name, port in order}
            r5.anchor_values.append(result["static"][0] * 1000)
            r5.ours_values.append(result["agent"][0] * 1000)
            r5.ratios.append(result["agent"][0] / result["static"][0])
            r6.anchor_values.append(result["node"][1])
            r6.ours_values.append(result["agent"][1])
            r6.ratios.append(result["agent"][1] / result["node"][1])
            samples.append(agent_rss(rig))
        rss = [sum(mib for _, mib in sample[0]) for sample in samples]
        r7.ours_values = [max(rss)]
        last = ", ".join(f"{name} {mib:.0f}" for name, mib in sorted(samples[-1][0]))
        sessions = samples[-1][1]
        session_mib = sum(mib for _, mib, _ in sessions)
        session_pss = sum(pss for _, _, pss in sessions)
        series = sum(1 for line in exposition.splitlines() if line and not line.startswith(b"#"))
        r5.note = (f"{series} series, {len(exposition)} bytes (text format); Prometheus' Accept "
                   "and Accept-Encoding headers; the anchor re-renders the same series per "
                   "scrape (prometheus_client.start_http_server)")
        r7.note = (f"peak of the sum over {len(rss)} samples, all processes of {AGENT_UNIT}; "
                   f"after the HTTP load: {rss[-1]:.0f} MiB ({last} MiB); not counted in it, "
                   f"the kept read-only sessions (as the apps' users, each in its own transient "
                   f"unit outside the agent's): {len(sessions)} processes, VmRSS "
                   f"{session_mib:.0f} MiB"
                   + (f" ({min(m for _, m, _ in sessions):.0f}-"
                      f"{max(m for _, m, _ in sessions):.0f} MiB each)" if sessions else "")
                   + f", Pss {session_pss:.0f} MiB (shared pages split among them)")
    finally:
        static.close()


def make_rows(args: argparse.Namespace) -> dict[str, Row]:
    n, m = args.units, args.models
    return {
        "steady": Row("steady-state inspection of an unchanged unit, CPU incl. PostgreSQL",
                      "runbook flask db current+heads+check", ">= 100x cheaper", " ms"),
        "units": Row(f"{n} unchanged units, CPU per inspection", "1 unit (row above)",
                     f"<= {n}x the single-unit cost", " ms"),
        "first": Row(f"first drift check, {m}-model app, CPU incl. PostgreSQL",
                     "flask db check", "<= 0.5x", " s"),
        "memo": Row(f"unchanged {m}-table schema, memo path", "flask db check", "<= 0.01x",
                    " s"),
        "p50": Row(f"/metrics p50 at {args.connections} reused connections",
                   "bare prometheus_client, same series", "<= 1.2x", " ms"),
        "rps": Row(f"/metrics req/s at {args.connections} connections",
                   "node_exporter --collector.systemd", ">= 3x", " req/s"),
        "rss": Row(f"agent RSS, {n} units", "-", "<= 60 MiB", " MiB"),
        "sockets": Row(f"inspection CPU with {args.sockets} idle loopback sockets",
                       "same, without them", "~1x (independent)", " ms"),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.bench9",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="2 rounds, 5 units, 2 s of HTTP load per side (a smoke run)")
    parser.add_argument("--rounds", type=int, help="A/B rounds per row (default 5; quick 2)")
    parser.add_argument("--units", type=int, help="gunicorn units (default 20; quick 5)")
    parser.add_argument("--models", type=int, default=1000, help="models of the big app")
    parser.add_argument("--inspections", type=int, help="steady inspections per round "
                        "(default 9; quick 3)")
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--seconds", type=float, help="HTTP load per side and round "
                        "(default 5; quick 2)")
    parser.add_argument("--sockets", type=int, default=10000)
    parser.add_argument("--probe-timeout", type=float, default=300.0,
                        help="the inspector's probe timeout (a loaded machine needs room)")
    parser.add_argument("--serve-static", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_static:
        serve_static(args.serve_static)
        return 0
    quick = args.quick
    args.rounds = args.rounds or (2 if quick else 5)
    args.units = args.units or (5 if quick else 20)
    args.inspections = args.inspections or (3 if quick else 9)
    args.seconds = args.seconds or (2.0 if quick else 5.0)

    started = time.perf_counter()
    rows = make_rows(args)
    reason = unavailable_reason()
    if reason:
        for row in rows.values():
            row.skipped = reason
    else:
        rig = build(args)
        try:
            for name, phase, names in (
                    ("inspections", inspection_rows, ("steady", "units", "sockets", "first",
                                                      "memo")),
                    ("HTTP", http_rows, ("p50", "rps", "rss"))):
                try:
                    phase(rig, args, rows)
                except Exception as exc:   # a benchmark reports what it could measure
                    say(f"{name} phase failed: {type(exc).__name__}: {exc}")
                    for key in names:
                        if not rows[key].ours_values:
                            rows[key].skipped = f"{type(exc).__name__}: {str(exc)[:80]}"
        finally:
            rig.sb.destroy()
            rig.pg.stop()
            shutil.rmtree(rig.workspace, ignore_errors=True)
    print(f"issue #9 benchmark ({'--quick, ' if quick else ''}{args.rounds} rounds, "
          f"A/B alternated; ratio = driftwatch / anchor unless the target says cheaper)")
    print(f"machine: {machine()}")
    print()
    print_table([rows[k] for k in ("steady", "units", "first", "memo", "p50", "rps", "rss",
                                   "sockets")])
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
