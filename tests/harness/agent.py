"""Running the agent's own commands inside a sandbox, with the checkout's venv."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from functools import cache
from pathlib import Path
from typing import Any

from tests.harness.sandbox import REPO_ROOT, Sandbox

VENV_BIN = Path(sys.executable).parent
AGENTCTL = str(VENV_BIN / "agentctl")
PYTHON = sys.executable
AGENT_UNIT = "driftwatch-agent.service"
AGENT_UNIT_SOURCE = REPO_ROOT / "systemd" / AGENT_UNIT


def agent_unit_text() -> str:
    """The agent's own unit from systemd/, running this checkout's driftwatch-agent."""
    return AGENT_UNIT_SOURCE.read_text().replace("/usr/bin/driftwatch-agent",
                                                 str(VENV_BIN / "driftwatch-agent"))


def agent_unit_dropins() -> dict[str, str]:
    """Drop-ins for the agent's unit in tests: the checkout (with the venv) stays visible even
    when it lives under /tmp, which the unit's PrivateTmp=yes would otherwise hide."""
    return {"checkout.conf": f"[Service]\nBindReadOnlyPaths={REPO_ROOT}\n"}


def agent_config(listen: str, **settings: object) -> str:
    """An /etc/driftwatch/agent.toml body."""
    lines = ["[agent]", f'listen_address = "{listen}"']
    for key, value in settings.items():
        lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


# Where agentctl is installed for other users: the checkout may be in a directory only root
# can enter (root's home is 0700), so nothing run as another user may read it.
READABLE_ROOT = Path("/var/cache/driftwatch-tests/agentctl")


def _source_digest() -> str:
    """What the readable install is made of: the agent's files and the venv's packages."""
    h = hashlib.sha256()
    for path in sorted((REPO_ROOT / "agent").rglob("*.py")):
        h.update(str(path.relative_to(REPO_ROOT)).encode() + b"\0" + path.read_bytes())
    site = Path(sysconfig.get_paths()["purelib"])
    h.update("\n".join(sorted(p.name for p in site.iterdir())).encode())
    return h.hexdigest()[:16]


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # same filesystem: instant, and the files stay as they are
    except OSError:
        shutil.copy2(src, dst)


@cache
def readable_agentctl() -> str:
    """agentctl installed outside the checkout, world-readable, for runs as other users.

    A venv of /usr/bin/python3 under /var/cache (made once per content of agent/ and of the
    test venv's packages) holding a copy of the venv's packages and of agent/ itself, not
    the editable install that points back into the checkout.
    """
    target = READABLE_ROOT / _source_digest()
    script = target / "bin" / "agentctl"
    if script.exists():
        return str(script)
    READABLE_ROOT.mkdir(parents=True, exist_ok=True)
    for old in READABLE_ROOT.iterdir():  # versions of the code nobody used for a day
        if time.time() - old.stat().st_mtime > 86400:
            shutil.rmtree(old, ignore_errors=True)
    tmp = READABLE_ROOT / f".{target.name}.{os.getpid()}"
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(tmp)], check=True)
    site = Path(sysconfig.get_paths()["purelib"])
    dest = tmp / site.relative_to(sys.prefix)
    shutil.rmtree(dest)
    shutil.copytree(site, dest, copy_function=_link_or_copy, symlinks=True,
                    ignore=shutil.ignore_patterns("__editable__*", "__pycache__", "pip",
                                                  "pip-*", "ruff", "ruff-*"))
    shutil.copytree(REPO_ROOT / "agent", dest / "agent", copy_function=shutil.copy2,
                    ignore=shutil.ignore_patterns("__pycache__"))
    (tmp / "bin" / "agentctl").write_text(
        f"#!{target}/bin/python\nimport sys\nfrom agent.cli.main import main\nsys.exit(main())\n")
    (tmp / "bin" / "agentctl").chmod(0o755)
    for path in (READABLE_ROOT.parent, READABLE_ROOT, tmp):
        path.chmod(0o755)
    try:
        os.replace(tmp, target)
    except OSError:  # another test session made the same one meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return str(script)


def agentctl(sb: Sandbox, *args: str, user: str | None = None, group: str | None = None,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run agentctl inside the sandbox (as root, or as USER through setpriv, from a copy
    other users can read: never from the checkout)."""
    argv = [AGENTCTL, *args]
    if user:
        argv = ["setpriv", f"--reuid={user}", f"--regid={group or user}", "--clear-groups",
                readable_agentctl(), *args]
    return sb.run(argv, check=False, env=env)


def agentctl_json(sb: Sandbox, *args: str) -> Any:
    """agentctl ... --json inside the sandbox, parsed; fails loudly on a crash."""
    proc = agentctl(sb, *args, "--json")
    assert proc.returncode in (0, 1), f"agentctl {args} exited {proc.returncode}: {proc.stderr}"
    return json.loads(proc.stdout)


def agent_python(sb: Sandbox, code: str) -> Any:
    """Run Python with the agent's venv inside the sandbox; the code prints one JSON value."""
    proc = sb.run([PYTHON, "-c", code], check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def deploy_app_and_agent(sb: Sandbox, *, app: Path | Any, venv: Path, env: dict[str, str],
                         app_unit: str, agent_settings: dict[str, object],
                         env_file: str = "/etc/site/env",
                         extra_args: tuple[str, ...] = ()) -> tuple[int, int]:
    """Boot sb with the app's gunicorn unit (its env file holding env) and the agent's own
    unit; start both and wait until the app answers and the agent said READY=1.

    Returns (app_port, agent_port). The e2e and fault tests that need "a host running the
    app and driftwatch-agent" all start here, so they all test the same deployment.
    """
    from tests.harness.apps import env_file_text, gunicorn_pids, gunicorn_unit, http_get
    from tests.harness.apps import unit_diagnostics
    from tests.harness.postgres import free_port

    app_port, agent_port = free_port(), free_port()
    sb.add_file(env_file, env_file_text(env), mode=0o640)
    sb.add_unit(app_unit, gunicorn_unit(venv=venv, app_dir=app, port=app_port,
                                        environment={"FLASK_APP": "wsgi.py"},
                                        environment_files=[env_file], extra_args=extra_args))
    sb.add_file("/etc/driftwatch/agent.toml",
                agent_config(f"127.0.0.1:{agent_port}", **agent_settings))
    sb.add_unit(AGENT_UNIT, agent_unit_text(), agent_unit_dropins())
    sb.boot()
    sb.systemctl("start", app_unit)
    http_get(f"http://127.0.0.1:{app_port}/healthz",
             describe=lambda: unit_diagnostics(sb, app_unit))
    gunicorn_pids(sb, app_unit)
    sb.systemctl("start", AGENT_UNIT)  # Type=notify: returns once the agent said READY=1
    sb.wait_active(AGENT_UNIT)
    wait_first_snapshot(agent_port, app_unit)
    return app_port, agent_port


def wait_first_snapshot(agent_port: int, unit: str, timeout: float = 120.0) -> None:
    """Scrape until /metrics carries the unit's first snapshot. A scrape waits at most
    scrape_wait_seconds for an inspection, and a first inspection (probe, preflight) can take
    longer on a loaded machine: tests start from a snapshot instead of racing the first one."""
    import urllib.request

    url = f"http://127.0.0.1:{agent_port}/metrics"
    marker = f'driftwatch_unit_up{{unit="{unit}"}}'
    deadline = time.monotonic() + timeout
    body = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=30) as resp:
                body = resp.read().decode()
        except OSError:
            body = ""
        if marker in body:
            return
        time.sleep(0.5)
    raise AssertionError(f"no snapshot of {unit} on {url} within {timeout:g}s:\n{body[-2000:]}")
