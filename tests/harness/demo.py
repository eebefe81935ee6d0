"""The self-contained demo: a real PostgreSQL, a real Flask app under gunicorn in a real
systemd sandbox with one migration not applied, and driftwatch watching it.

Run as root: `python -m tests.harness.demo [--keep]`. Everything is torn down on exit.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import socket
import sys
import time
import urllib.request
from pathlib import Path

from tests.harness.agent import AGENTCTL, PYTHON, agent_config, agent_unit_dropins, agent_unit_text
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
from tests.harness.postgres import PostgresCluster, free_port, postgres_unavailable_reason
from tests.harness.sandbox import Sandbox, sandbox_unavailable_reason

ENV_FILE = "/etc/demo-site/env"
DEFAULT_PORT = 9410


def pick_listen_address(preferred: int = DEFAULT_PORT, host: str = "127.0.0.1"
                        ) -> tuple[str, str]:
    """(HOST:PORT for the demo's agent, a one-line note when PREFERRED is taken, else "")."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, preferred))
            return f"{host}:{preferred}", ""
        except OSError as exc:
            why = exc.strerror or str(exc)
    port = free_port()
    return (f"{host}:{port}",
            f"port {preferred} on {host} is taken ({why}); the demo's agent uses {port} instead")


def say(text: str) -> None:
    """A section heading on the terminal."""
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def show(sb: Sandbox, argv: list[str]) -> None:
    """Run a command inside the sandbox and print it with its output, like a terminal."""
    print(f"$ {' '.join(Path(a).name if a in (AGENTCTL, PYTHON) else a for a in argv)}",
          flush=True)
    proc = sb.run(argv, check=False)
    sys.stdout.write(proc.stdout)
    if proc.stderr.strip():
        sys.stdout.write(proc.stderr)
    print(f"(exit code {proc.returncode})", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Build the demo, show what driftwatch sees, clean up."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", action="store_true",
                        help="keep the demo running until Ctrl-C (metrics on 127.0.0.1:9410, "
                             "or a free port when 9410 is taken)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"the agent's port (default {DEFAULT_PORT}; a free one if taken)")
    args = parser.parse_args(argv)
    for reason in (sandbox_unavailable_reason(), postgres_unavailable_reason()):
        if reason:
            print(f"demo: cannot run: {reason}", file=sys.stderr)
            return 2
    listen, note = pick_listen_address(args.port)
    if note:
        print(f"demo: {note}", flush=True)
    try:
        return run_demo(args, listen)
    except Exception as exc:  # a demo ends in one line, never a traceback
        first_line = (str(exc).splitlines() or [""])[0]
        print(f"demo: failed: {type(exc).__name__}: {first_line}", file=sys.stderr)
        return 2


def run_demo(args: argparse.Namespace, listen: str) -> int:
    """The demo itself, its agent on listen."""
    cluster = PostgresCluster()
    workspace = new_workspace()
    sb = Sandbox()
    try:
        say("PostgreSQL: a throwaway cluster on 127.0.0.1")
        cluster.start()
        db = cluster.new_database("demo")
        print(f"database {db.name} on 127.0.0.1:{cluster.port}, owner {db.owner}")

        say("The app: Flask + Flask-Migrate, models at r3, migrations r1 -> r2 -> r3")
        venv = app_venv()
        app = write_app(workspace / "site", AppSpec(models_at=3))
        db_upgrade(app, venv, db.url, "r2")
        print(f"app in {app.root}, venv {venv}; `flask db upgrade r2` ran: r3 is NOT applied")

        say("A real systemd in a throwaway sandbox, running gunicorn.service as www-data")
        port = free_port()
        sb.add_file(ENV_FILE, env_file_text({"DATABASE_URL": db.url, "SECRET_KEY": "demo-secret"}),
                    mode=0o640)
        sb.add_unit("gunicorn.service", gunicorn_unit(
            venv=venv, app_dir=app, port=port, environment={"FLASK_APP": "wsgi.py"},
            environment_files=[ENV_FILE]))
        sb.add_file("/etc/driftwatch/agent.toml", agent_config(listen, min_interval_seconds=5))
        sb.add_unit("driftwatch-agent.service", agent_unit_text(), agent_unit_dropins())
        sb.boot()
        sb.systemctl("start", "gunicorn.service")
        http_get(f"http://127.0.0.1:{port}/healthz")
        gunicorn_pids(sb, "gunicorn.service")
        status, _ = http_get(f"http://127.0.0.1:{port}/db")
        print(f"GET http://127.0.0.1:{port}/db -> HTTP {status} (the code queries table "
              "posts, which migration r3 creates)")

        say("What systemd says the unit runs, and what really runs")
        show(sb, [AGENTCTL, "context", "gunicorn"])
        say("The environment a new process would get (secrets masked)")
        show(sb, [AGENTCTL, "env", "gunicorn"])
        say("Every check once: the deploy gate (exit 0 ok, 1 problems, 2 cannot inspect)")
        show(sb, [AGENTCTL, "check", "gunicorn"])
        say(f"The agent as a systemd service (systemd/driftwatch-agent.service) on {listen}")
        sb.systemctl("start", "driftwatch-agent.service")
        sb.wait_active("driftwatch-agent.service")
        show_metrics(f"http://{listen}/metrics")
        show(sb, [AGENTCTL, "status"])

        say("The fix, in the runbook's order: upgrade in the unit's exact context, verify, restart")
        show(sb, [AGENTCTL, "upgrade", "gunicorn", "--restart", "--yes"])
        status, _ = http_get(f"http://127.0.0.1:{port}/db")
        print(f"GET http://127.0.0.1:{port}/db -> HTTP {status}")
        show(sb, [AGENTCTL, "status"])
        show_metrics(f"http://{listen}/metrics")
        if args.keep:
            say("Running; Ctrl-C to tear everything down")
            print(f"try: curl -s http://{listen}/metrics | grep ^driftwatch_")
            print(f"     nsenter -t {sb.pid} -m -p -u -i -C -r -w -- {AGENTCTL} status")
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
        return 0
    finally:
        say("Cleaning up: sandbox, PostgreSQL, app files")
        sb.destroy()
        cluster.stop()
        shutil.rmtree(workspace, ignore_errors=True)
        print("done")


def show_metrics(url: str) -> None:
    """Print the headline series of the agent's /metrics, as a curl | grep would."""
    wanted = ("driftwatch_pending_revisions", "driftwatch_revision_info",
              "driftwatch_schema_drift_objects{kind=\"missing_table\"",
              "driftwatch_unit_up", "driftwatch_needs_restart")
    print(f"$ curl -s {url} | grep -E '^driftwatch_(pending_revisions|revision_info|unit_up|"
          "needs_restart)|missing_table'")
    for line in _fetch(url).splitlines():
        if line.startswith(wanted):
            print(line)


def _fetch(url: str) -> str:
    """GET url, retrying for a few seconds while the agent starts."""
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(url, timeout=30) as resp:
                return resp.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


if __name__ == "__main__":
    sys.exit(main())

