"""What the agent's caching buys, measured against a baseline without it. No assertions.

    .venv/bin/python -m tests.bench.bench_scrape          # from the repository root

(a) scrape storm: a real agent HTTP server (AgentHTTPServer + DriftwatchCollector) in its own
    process, scraped N times one after another and N times from C concurrent clients. The
    inspection is a fake costing --inspect-ms. Baseline: an uncached collector (every scrape
    inspects, the naive "collect on scrape"); driftwatch: SnapshotCache(min_interval_seconds=30).
    SnapshotCache(min_interval_seconds=0), single-flight only, is printed below the table.
(b) probe memo: the app-context probe (agent.privileged.probe_runner.run_probe: a real Flask-Migrate app
    loaded in its own venv as www-data against a throwaway PostgreSQL) plus the agent's own
    database session, as an inspection without the memo does it, against the memo-hit path of
    agent.privileged.inspector (fingerprint() + database.inspect()). Needs root and PostgreSQL 15.
(c) memory: peak RSS of the agent process (VmHWM; ru_maxrss where /proc is missing) after 1
    scrape and after 1000 cached ones.

ratio = baseline / driftwatch: above 1 means driftwatch does less (fewer inspections, less
time, less memory). The fake inspection only sleeps: a real one also loads the database and
the CPU, so the baseline's real cost under a storm is higher than shown here.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]

MODES = {
    "uncached": "uncached collector (inspects on every scrape)",
    "single-flight": "SnapshotCache(min_interval_seconds=0)",
    "cached": "SnapshotCache(min_interval_seconds=30)",
}


# -- the agent side (child process) -----------------------------------------------------------

def bench_snapshot(inspect_seconds: float) -> Any:
    """A snapshot shaped like a real host's: three units, checks, drift, findings."""
    from agent.model import Finding
    from agent.snapshot import CheckRun, DriftItem, MigrationState, Snapshot, UnitSnapshot

    checks = tuple(CheckRun(name, True, 0.01) for name in
                   ("unit", "app_load", "connections", "database", "migrations", "journal"))
    units = []
    for i, name in enumerate(("gunicorn.service", "shop.service", "admin.service")):
        pending = ("r3",) if i == 0 else ()
        units.append(UnitSnapshot(
            unit=name, timestamp=time.time(), unit_up=True, active_state="active",
            main_pid=1000 + i, started_at=time.time() - 3600,
            database=f"127.0.0.1:5432/app{i}", app_loaded=True, db_up=True,
            migrations=MigrationState(True, ("r2" if pending else "r3",), ("r3",), pending),
            schema_drift=(DriftItem("missing_table", "posts", "posts"),) if pending else (),
            database_mismatch=False, migration_privileges_ok=True,
            journal_schema_errors={"UndefinedTable": 3} if pending else {},
            checks=checks,
            findings=(Finding("pending_migrations", "critical", f"{name}: 1 pending"),)
            if pending else ()))
    return Snapshot(units=tuple(units), duration_seconds=inspect_seconds)


class FakeInspect:
    """Sleeps like an inspection, returns a literal snapshot, counts its calls."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, units: Sequence[str] | None = None) -> Any:
        with self._lock:
            self.calls += 1
        time.sleep(self.seconds)
        return bench_snapshot(self.seconds)


def peak_rss_kib() -> int:
    """Peak resident set of this process image (KiB).

    VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across execve, so a child
    started by a big parent would report the parent's peak, not its own.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def serve(mode: str, inspect_ms: float) -> None:
    """Child: an agent HTTP server in MODE; prints its port, serves until stdin closes.

    /status answers the inspection count and this process's memory (never inspects).
    """
    from prometheus_client.registry import CollectorRegistry

    from agent.daemon.collector_cache import SnapshotCache
    from agent.daemon.metrics import CollectorStats, DriftwatchCollector
    from agent.daemon.server import AgentHTTPServer

    inspect = FakeInspect(inspect_ms / 1000)
    if mode == "uncached":
        collector = DriftwatchCollector(lambda: inspect(None),
                                        lambda: CollectorStats(inspect.calls, 0, True))
    else:
        cache = SnapshotCache(inspect, min_interval_seconds=30.0 if mode == "cached" else 0.0)
        collector = DriftwatchCollector(cache.get, cache.stats)
    registry = CollectorRegistry()
    registry.register(collector)

    def status(unit: str | None) -> tuple[int, dict[str, Any]]:
        return 200, {"inspections": inspect.calls, "peak_rss_kib": peak_rss_kib()}

    server = AgentHTTPServer("127.0.0.1:0", registry, status, lambda: (True, ""))
    server.start()
    print(server.port, flush=True)
    sys.stdin.read()   # the parent closes our stdin to stop us
    server.stop()


# -- the client side --------------------------------------------------------------------------

class Agent:
    """An agent child process in one mode, started and ended by this benchmark (by PID)."""

    def __init__(self, mode: str, inspect_ms: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.bench.bench_scrape", "--serve", mode,
             "--inspect-ms", str(inspect_ms)],
            cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.strip().isdigit():
            self.close()
            raise RuntimeError(f"agent child ({mode}) did not start")
        self.port = int(line)

    def get(self, path: str) -> bytes:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200:
                raise RuntimeError(f"GET {path}: HTTP {resp.status}")
            return body
        finally:
            conn.close()

    def scrape(self) -> float:
        start = time.perf_counter()
        self.get("/metrics")
        return time.perf_counter() - start

    def status(self) -> dict[str, Any]:
        return json.loads(self.get("/status"))

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()   # our own child, by its PID
            self.proc.wait(5)

    def __enter__(self) -> "Agent":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def scrape_many(agent: Agent, total: int, concurrency: int) -> list[float]:
    """TOTAL scrapes from CONCURRENCY clients released at once (1: one after another)."""
    if concurrency <= 1:
        return [agent.scrape() for _ in range(total)]
    latencies: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(concurrency)
    share = [total // concurrency + (1 if i < total % concurrency else 0)
             for i in range(concurrency)]

    def client(n: int) -> None:
        barrier.wait()
        mine = [agent.scrape() for _ in range(n)]
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(n,)) for n in share]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


@dataclass
class Storm:
    inspections_per_100: float
    p50_ms: float
    p99_ms: float
    wall_ms: float


def storm(mode: str, args: argparse.Namespace, concurrency: int) -> Storm:
    """A fresh agent (cold cache) in MODE, scraped args.scrapes times."""
    with Agent(mode, args.inspect_ms) as agent:
        start = time.perf_counter()
        latencies = scrape_many(agent, args.scrapes, concurrency)
        wall = time.perf_counter() - start
        inspections = agent.status()["inspections"]
    return Storm(100 * inspections / len(latencies), percentile(latencies, 50) * 1000,
                 percentile(latencies, 99) * 1000, wall * 1000)


def memory(args: argparse.Namespace) -> tuple[float, float]:
    """Peak RSS (MiB) of a cached agent after 1 scrape and after args.memory_scrapes more."""
    with Agent("cached", args.inspect_ms) as agent:
        agent.scrape()
        after_one = agent.status()["peak_rss_kib"] / 1024
        scrape_many(agent, args.memory_scrapes, args.concurrency)
        after_many = agent.status()["peak_rss_kib"] / 1024
    return after_one, after_many


# -- (b) the probe memo -----------------------------------------------------------------------

@dataclass
class ProbeBench:
    probe_ms: float          # run_probe + database.inspect: an inspection without the memo
    memo_ms: float           # fingerprint + database.inspect: the memo-hit path
    probe_only_ms: float
    fingerprint_ms: float
    probe_statements: int    # SQL statements the server ran for one path (pg_stat_statements)
    memo_statements: int


def probe_unavailable_reason() -> str | None:
    from tests.harness.apps import BASE_PYTHON
    from tests.harness.postgres import postgres_unavailable_reason

    if os.geteuid() != 0:
        return "not root: the probe drops to the app's user (www-data)"
    if not os.access(BASE_PYTHON, os.X_OK):
        return f"{BASE_PYTHON} missing: the test app venv is built from it"
    return postgres_unavailable_reason()


def make_ctx(app_root: Path, venv: Path, env: dict[str, str]) -> Any:
    """The context of a gunicorn.service running the app from venv as www-data."""
    from agent.context import ContextInputs, build_context
    from agent.model import ExecCommand, UnitProperties
    from tests.harness.apps import APP_USER

    gunicorn = f"{venv}/bin/gunicorn"
    props = UnitProperties(
        name="gunicorn.service", load_state="loaded", active_state="active",
        sub_state="running", working_directory=str(app_root),
        environment=tuple(f"{k}={v}" for k, v in env.items()),
        exec_start=(ExecCommand(gunicorn, (gunicorn, "--workers", "2", "--bind",
                                           "127.0.0.1:8000", "wsgi:app")),),
        user=APP_USER, group=APP_USER)
    return build_context(props, ContextInputs(venvs={str(venv): True}))


def timed(fn: Callable[[], Any], runs: int) -> tuple[float, Any]:
    """Median milliseconds of RUNS calls, and the last result."""
    samples, result = [], None
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples), result


def probe_memo(args: argparse.Namespace) -> ProbeBench:
    from agent.privileged.probe_runner import ProbeRequest, run_probe
    from agent.privileged.probe_runner import fingerprint
    from agent.privileged.sources import database
    from tests.harness.apps import app_venv, db_upgrade, new_workspace, write_app
    from tests.harness.postgres import PostgresCluster

    venv = app_venv()   # cached under /var/cache/driftwatch-tests/venvs after the first build
    cluster = PostgresCluster().start()
    workspace = new_workspace()
    try:
        db = cluster.new_database()
        app = write_app(workspace / "site")
        db_upgrade(app, venv, db.url, "r2")   # r3 pending, as in the demo
        ctx = make_ctx(app.root, venv, {"DATABASE_URL": db.url})
        request = ProbeRequest()

        def probe() -> Any:
            result = run_probe(ctx, request, 60.0)
            if not result.ok:
                raise RuntimeError(f"probe failed: {result.error}")
            return result

        first = probe()   # warm-up: page cache, bytecode of the venv
        url = first.urls.get("default") or next(iter(first.urls.values()))

        def db_session() -> None:
            inspection = database.inspect(url)
            if not inspection.reachable:
                raise RuntimeError(f"database unreachable: {inspection.error}")

        def without_memo() -> None:
            probe()
            db_session()

        def memo_hit() -> None:
            fingerprint(ctx, first.migrations_dir)
            db_session()

        db_session()
        probe_only_ms, _ = timed(probe, args.probe_runs)
        probe_ms, _ = timed(without_memo, args.probe_runs)
        fingerprint_ms, _ = timed(lambda: fingerprint(ctx, first.migrations_dir),
                                  args.memo_runs)
        memo_ms, _ = timed(memo_hit, args.memo_runs)

        def statements(fn: Callable[[], Any]) -> int:
            cluster.reset_statements()
            fn()
            return sum(calls for _, calls in cluster.statements(db=db.name))

        return ProbeBench(probe_ms, memo_ms, probe_only_ms, fingerprint_ms,
                          statements(without_memo), statements(memo_hit))
    finally:
        cluster.stop()
        shutil.rmtree(workspace, ignore_errors=True)


# -- the report -------------------------------------------------------------------------------

def ratio(baseline: float, ours: float) -> str:
    if ours == 0:
        return "inf" if baseline else "-"
    return f"{baseline / ours:.1f}x"


def fmt(value: float, decimals: int) -> str:
    return f"{value:.{decimals}f}"


def print_table(rows: list[tuple[str, float, float, int]]) -> None:
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  {'baseline':>10}  {'driftwatch':>10}  {'ratio':>8}")
    print(f"{'-' * width}  {'-' * 10}  {'-' * 10}  {'-' * 8}")
    for name, base, ours, decimals in rows:
        print(f"{name:<{width}}  {fmt(base, decimals):>10}  {fmt(ours, decimals):>10}  "
              f"{ratio(base, ours):>8}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.bench_scrape",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--scrapes", type=int, default=100, help="scrapes per storm")
    parser.add_argument("--concurrency", type=int, default=20, help="concurrent clients")
    parser.add_argument("--inspect-ms", type=float, default=50.0,
                        help="cost of the fake inspection")
    parser.add_argument("--memory-scrapes", type=int, default=1000)
    parser.add_argument("--probe-runs", type=int, default=3, help="timed run_probe calls")
    parser.add_argument("--memo-runs", type=int, default=20, help="timed memo-hit calls")
    parser.add_argument("--no-probe", action="store_true", help="skip (b)")
    parser.add_argument("--serve", choices=sorted(MODES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.inspect_ms)
        return 0

    started = time.perf_counter()
    n, c = args.scrapes, args.concurrency
    print(f"(a) scrape storm: {n} scrapes of a real agent HTTP server, fake inspection "
          f"{args.inspect_ms:g} ms")
    print(f"    baseline: {MODES['uncached']}; driftwatch: {MODES['cached']}")
    rows: list[tuple[str, float, float, int]] = []
    single: dict[str, Storm] = {}
    for label, concurrency in (("sequential", 1), (f"{c} concurrent clients", c)):
        base = storm("uncached", args, concurrency)
        ours = storm("cached", args, concurrency)
        single[label] = storm("single-flight", args, concurrency)
        rows += [(f"{label}: inspections per 100 scrapes", base.inspections_per_100,
                  ours.inspections_per_100, 0),
                 (f"{label}: scrape latency p50 (ms)", base.p50_ms, ours.p50_ms, 1),
                 (f"{label}: scrape latency p99 (ms)", base.p99_ms, ours.p99_ms, 1),
                 (f"{label}: whole storm, wall time (ms)", base.wall_ms, ours.wall_ms, 0)]

    reason = None if args.no_probe else probe_unavailable_reason()
    if args.no_probe:
        print("(b) probe memo: skipped (--no-probe)")
    elif reason:
        print(f"(b) probe memo: skipped: {reason}")
    else:
        print("(b) probe memo: a real Flask-Migrate app (r3 pending) on a throwaway "
              "PostgreSQL, loaded as www-data")
        print("    baseline: run_probe + database.inspect (an inspection without the memo); "
              "driftwatch: fingerprint + database.inspect (memo hit)")
        try:
            pb = probe_memo(args)
        except Exception as exc:   # a benchmark reports, it does not crash half-way
            print(f"    skipped: {type(exc).__name__}: {exc}")
        else:
            rows += [("probe path per inspection, median (ms)", pb.probe_ms, pb.memo_ms, 1),
                     ("  of which run_probe vs fingerprint (ms)", pb.probe_only_ms,
                      pb.fingerprint_ms, 1),
                     ("SQL statements per inspection (pg_stat_statements)",
                      pb.probe_statements, pb.memo_statements, 0)]
    print(f"(c) memory: peak RSS (VmHWM) of the cached agent process; baseline: after 1 "
          f"scrape, driftwatch: after {args.memory_scrapes} more")
    after_one, after_many = memory(args)
    rows.append((f"peak RSS after {args.memory_scrapes} cached scrapes (MiB)",
                 after_one, after_many, 1))

    print()
    print_table(rows)
    print()
    print(f"single-flight only, {MODES['single-flight']}: " + "; ".join(
        f"{label}: {s.inspections_per_100:.0f} inspections per 100 scrapes, p50 "
        f"{s.p50_ms:.1f} ms" for label, s in single.items()))
    print("ratio = baseline / driftwatch (above 1: driftwatch does less). "
          f"Total {time.perf_counter() - started:.1f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
