"""Running the agent's own commands inside a sandbox, with the checkout's venv."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.harness.sandbox import REPO_ROOT, Sandbox

VENV_BIN = Path(sys.executable).parent
AGENTCTL = str(VENV_BIN / "agentctl")
PYTHON = sys.executable
AGENT_UNIT_SOURCE = REPO_ROOT / "systemd" / "driftwatch-agent.service"


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


def agentctl(sb: Sandbox, *args: str, user: str | None = None, group: str | None = None,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run agentctl inside the sandbox (as root, or as USER through setpriv)."""
    argv = [AGENTCTL, *args]
    if user:
        argv = ["setpriv", f"--reuid={user}", f"--regid={group or user}", "--clear-groups", *argv]
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
