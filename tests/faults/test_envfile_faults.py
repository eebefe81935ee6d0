"""Bad env files under a real sandbox systemd: a directory, binary garbage, megabytes on one
line. A clear finding, one line at most on stderr, never a traceback, the check bounded."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness.apps import AppDir
from tests.harness.postgres import PgDatabase
from tests.harness.sandbox import Sandbox
from tests.harness.site import ENV_FILE, UNIT, SiteFactory, site_factory

pytestmark = [pytest.mark.systemd, pytest.mark.postgres]


@pytest.fixture
def site(make_sandbox: Callable[[], Sandbox], make_app: Callable[..., AppDir],
         flask_venv: Path, pg_database: PgDatabase) -> SiteFactory:
    """site(...) -> a running Site."""
    return site_factory(make_sandbox, make_app, flask_venv, pg_database)


def test_bad_env_files(site: SiteFactory) -> None:
    s = site()
    url = s.db.url
    cases = {
        "binary garbage": b"\x00\xff\xfe garbage \x00\n\x1b[31mDATABASE_URL=" + url.encode()
                          + b"\n",
        "5 MB on one line": b"JUNK=" + b"x" * 5_000_000 + b"\nDATABASE_URL=" + url.encode()
                            + b"\n",
        "a directory": None,
    }
    figures = []
    for name, content in cases.items():
        s.sb.run(["rm", "-rf", ENV_FILE])
        if content is None:
            s.sb.run(["mkdir", "-p", ENV_FILE])
        else:
            s.sb.write_file(ENV_FILE, content)
        started = time.monotonic()
        proc = s.agentctl("check", UNIT, "--json", "--probe-timeout", "30")
        took = time.monotonic() - started
        env = s.agentctl("env", "gunicorn")
        unit = json.loads(proc.stdout)["units"][0]
        env_findings = [f["check"] for f in unit["findings"] if f["check"].startswith("env")]
        figures.append(f"{name}: exit {proc.returncode} in {took:.1f} s, env exit "
                       f"{env.returncode}, findings {env_findings}")
        for p in (proc, env):
            assert "Traceback" not in p.stderr, p.stderr
            assert len(p.stderr.strip().splitlines()) <= 1, p.stderr
        assert s.db.password not in proc.stdout + env.stdout + env.stderr
        assert "\x1b" not in env.stdout + env.stderr  # no raw escape reaches the terminal
        assert proc.returncode in (0, 1, 2)
    print("\n" + "\n".join(figures))
