"""What root reads of the app user's files, through a whole `agentctl check` of real units.

Beside a healthy gunicorn.service, two units of a hostile www-data in a sandbox systemd: one
whose ExecStart script (in a bin/ directory www-data owns) is a link into a root-only file
that starts with '#!', one whose ExecStart script and EnvironmentFile= are FIFOs. Root must
neither read the root-only file for www-data nor block on a FIFO: every unit gets its
snapshot, the healthy one as if alone.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness.apps import AppDir
from tests.harness.postgres import PgDatabase
from tests.harness.sandbox import Sandbox
from tests.harness.site import UNIT, SiteFactory, site_factory

pytestmark = [pytest.mark.systemd, pytest.mark.postgres]

SECRET = "LEAKED_ROOT_ONLY_TOKEN_7B"


@pytest.fixture
def site(make_sandbox: Callable[[], Sandbox], make_app: Callable[..., AppDir],
         flask_venv: Path, pg_database: PgDatabase) -> SiteFactory:
    return site_factory(make_sandbox, make_app, flask_venv, pg_database)


def hostile_unit(script: str, env_file: str = "") -> str:
    env = f"EnvironmentFile=-{env_file}\n" if env_file else ""
    return ("[Unit]\nDescription=hostile app\n[Service]\nUser=www-data\nGroup=www-data\n"
            f"WorkingDirectory=/srv/hostile\n{env}ExecStart={script} wsgi:app\n"
            "[Install]\nWantedBy=multi-user.target\n")


def test_hostile_scripts_and_env_files_gain_nothing_and_hold_nobody_up(
        site: SiteFactory) -> None:
    s = site()
    sb = s.sb
    secret = sb.path("/root-only/script")
    secret.parent.mkdir(mode=0o700)
    secret.write_text(f"#!/usr/bin/env {SECRET}\n")
    secret.chmod(0o600)
    bin_dir = sb.path("/srv/hostile/venv/bin")
    bin_dir.mkdir(parents=True)
    (bin_dir / "gunicorn").symlink_to("/root-only/script")
    os.mkfifo(bin_dir / "fifo")
    os.mkfifo(sb.path("/srv/hostile/env"))
    for path in (sb.path("/srv/hostile"), sb.path("/srv/hostile/venv"), bin_dir,
                 bin_dir / "fifo", sb.path("/srv/hostile/env")):
        os.chown(path, 33, 33, follow_symlinks=False)
    sb.write_file("/etc/systemd/system/hostile-link.service",
                  hostile_unit("/srv/hostile/venv/bin/gunicorn"))
    sb.write_file("/etc/systemd/system/hostile-fifo.service",
                  hostile_unit("/srv/hostile/venv/bin/fifo", "/srv/hostile/env"))
    sb.systemctl("daemon-reload")
    proc = s.agentctl("check", UNIT, "hostile-link.service", "hostile-fifo.service",
                      "--json", "--probe-timeout", "30")
    assert proc.returncode in (1, 2), proc.stderr
    assert SECRET not in proc.stdout + proc.stderr
    healthy, link, fifo = json.loads(proc.stdout)["units"]
    assert healthy["findings"] == [] and all(c["success"] for c in healthy["checks"])
    assert healthy["migrations"]["current"] == ["r3"]
    assert link["unit"] == "hostile-link.service" and fifo["unit"] == "hostile-fifo.service"
    context = s.agentctl("context", "hostile-link.service", "--json")
    assert SECRET not in context.stdout + context.stderr, context.stdout
    env = s.agentctl("env", "hostile-fifo.service", "--json")
    assert "not a regular file (a FIFO)" in env.stdout + env.stderr, env.stdout
