"""Per-table catalog fingerprints at scale: what a re-check after one ALTER costs. No assertions.

    .venv/bin/python -m tests.bench.bench_table_fingerprints [--models 1000] [--rounds 5]

The 1,000-model app (tests/harness/bigapp.py) is migrated on a throwaway PostgreSQL, clean and
with 100 drifted models. The probe's own comparison code (the bundled probe program, as
www-data in the app's venv) checks once; then one table is altered (a clean one, then a
drifted one) and, in one process with the app loaded once, the comparison runs alternately
in full (bulk reads, unchanged tables left out) and incrementally (given the previous
check's fingerprints, through root's validation); Alembic's own per-table comparison once
for scale. CPU is the probe process's own (time.process_time), medians and ranges;
PostgreSQL's CPU is not included (the incremental check sends the same bulk queries).
Needs root (the app runs as www-data) and PostgreSQL 15.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from typing import Any

from agent.privileged import table_fingerprints as tablefp
from agent.privileged.launch import bundle
from agent.privileged.probe_runner import CHILD_SOURCE_PATH, probe_source
from tests.harness import bigapp
from tests.harness.apps import APP_USER, AppDir, app_venv, db_upgrade, new_workspace, run_in_app
from tests.harness.postgres import PostgresCluster

DRIVER = r'''
import gc, json, sys, time
started = time.process_time()
namespace = {"__name__": "probe_child"}
exec(compile(open(sys.argv[1]).read(), "probe", "exec"), namespace)
namespace["install_readonly_guard"]({})
gc.set_threshold(namespace["GC_THRESHOLD"], *gc.get_threshold()[1:])
app, _, _ = namespace["load_app"]({"app_spec": "wsgi:app"})
out = {"import": time.process_time() - started, "runs": []}
previous = json.loads(open(sys.argv[2]).read()) if len(sys.argv) > 2 else None
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 1
with app.app_context():
    found, _ = namespace["engines"](app)
    config, _ = namespace["migrations_config"](app, {})
    plan = [("full", None, True), ("incremental", previous, True)]
    for i in range(rounds):
        for name, given, shortcut in plan + ([("alembic", None, False)] if i == 0 else []):
            if name == "incremental" and given is None:
                continue
            report = {}
            t = time.process_time()
            namespace["compare_with_env_py"](config, found, report, shortcut=shortcut,
                                             previous=given)
            cpu = time.process_time() - t
            bind = (report.get("alembic_env") or {}).get("binds") or [{}]
            out["runs"].append({"name": name, "cpu": cpu,
                                "error": report.get("schema_diff_error", ""),
                                "ops": len(report.get("schema_diff") or ()),
                                "reused": bind[0].get("reused_tables", 0),
                                "clean": bind[0].get("unchanged_tables", 0)})
            if name == "full" and i == 0:
                out["last"] = {"diff": report.get("schema_diff"),
                               "fingerprints": report.get("table_fingerprints")}
print("RESULT " + json.dumps(out))
'''


def run_driver(app: AppDir, venv: Any, url: str, *extra: str) -> dict[str, Any]:
    """The driver as www-data in the app's venv; its RESULT line."""
    argv = [str(venv / "bin" / "python"), "-B", "_driver.py", "_bundle.py", *extra]
    proc = run_in_app(app, venv, url, argv, "bench driver", user=APP_USER, timeout=900)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return dict(json.loads(line[len("RESULT "):]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=bigapp.DEFAULT_MODELS)
    parser.add_argument("--drifted", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    venv = app_venv()
    workspace = new_workspace()
    try:
        with PostgresCluster() as pg:
            for drift in (0, args.drifted):
                db = pg.new_database()
                app = bigapp.write_bigapp(workspace / f"big{drift}", args.models, drift)
                db_upgrade(app, venv, db.url)
                app.write("_bundle.py", bundle(CHILD_SOURCE_PATH, probe_source()))
                app.write("_driver.py", DRIVER)
                last = run_driver(app, venv, db.url)["last"]
                steps = [("a clean table", "ALTER TABLE %s ADD COLUMN extra int"
                          % bigapp.table_name(args.models // 2))]
                if drift:
                    steps.append(("a drifted table", "ALTER TABLE %s ALTER COLUMN amount TYPE "
                                  "bigint" % bigapp.table_name(drift // 2)))
                for what, sql in steps:
                    previous = tablefp.previous_check(
                        tablefp.from_report(last["fingerprints"]), last["diff"])
                    db.execute(sql)
                    app.write("_previous.json", json.dumps(previous))
                    result = run_driver(app, venv, db.url, "_previous.json", str(args.rounds))
                    last = result["last"]
                    print(f"{args.models} models, {drift} drifted, one ALTER on {what} "
                          f"(previous check handed back: {len(json.dumps(previous))} bytes); "
                          f"app import {result['import']:.2f} s CPU")
                    by: dict[str, list[dict[str, Any]]] = {}
                    for run in result["runs"]:
                        by.setdefault(run["name"], []).append(run)
                    for name, runs in by.items():
                        cpus = [r["cpu"] for r in runs]
                        print(f"  {name:<12} comparison {statistics.median(cpus):.3f} s "
                              f"[{min(cpus):.3f}-{max(cpus):.3f}] x{len(cpus)}  "
                              f"ops {runs[0]['ops']}, reused {runs[0]['reused']}, "
                              f"left out as clean {runs[0]['clean']}"
                              + (f"  ERROR {runs[0]['error']}" if runs[0]["error"] else ""))
                    sys.stdout.flush()
                pg.drop(db)
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
