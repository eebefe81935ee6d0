"""The probe and the agent's database session as transient units of a real systemd.

Each test boots a sandbox with gunicorn.service (a real Flask app, a real PostgreSQL) and
runs ``agentctl check`` inside it: the probe and the session must carry the app unit's own
execution settings (credentials, UnsetEnvironment=/PassEnvironment=, DynamicUser=, no
User=) and be bounded by limits of their own (a timeout ends the whole cgroup, memory).
"""

from __future__ import annotations

import json
import os
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.harness.apps import AppDir, AppSpec, writable_dir
from tests.harness.postgres import PgDatabase
from tests.harness.sandbox import Sandbox
from tests.harness.site import UNIT, Site, SiteFactory, site_factory

pytestmark = [pytest.mark.systemd, pytest.mark.postgres]


@pytest.fixture
def site(make_sandbox: Callable[[], Sandbox], make_app: Callable[..., AppDir],
         flask_venv: Path, pg_database: PgDatabase) -> SiteFactory:
    return site_factory(make_sandbox, make_app, flask_venv, pg_database)


def record_hook(directory: str) -> str:
    """on_import code: one JSON file per import with uid, cgroup, env keys and umask."""
    return textwrap.dedent(f"""\
        import json as _j, os as _o, time as _t
        _m = _o.umask(0); _o.umask(_m)
        with open(_o.path.join({directory!r}, "%d-%d.json" % (_o.getuid(), _o.getpid())),
                  "x") as _fh:
            _j.dump({{"uid": _o.getuid(), "env": dict(_o.environ), "umask": _m,
                      "cgroup": open("/proc/self/cgroup").read(), "time": _t.time(),
                      "tmp": sorted(_o.listdir("/tmp"))}}, _fh)
        """)


def records(s: Site, directory: Path) -> list[dict[str, Any]]:
    found = [json.loads(p.read_text()) for p in s.sb.path(str(directory)).glob("*.json")]
    return sorted(found, key=lambda r: r["time"])


def finding(unit: dict[str, Any], check: str) -> dict[str, Any] | None:
    return next((f for f in unit["findings"] if f["check"] == check), None)


def test_probe_gets_the_units_settings_from_systemd_itself(site: SiteFactory,
                                                           app_workspace: Path) -> None:
    out = writable_dir(app_workspace / "records")
    s = site(AppSpec(on_import=record_hook(str(out))), start_unit=False,
             environment={"FLASK_APP": "wsgi.py", "DROPPED": "x", "KEPT": "y"},
             service="UnsetEnvironment=DROPPED\nPassEnvironment=FROM_MANAGER NOT_SET\n"
                     "UMask=0027\nPrivateTmp=yes\n")
    for old in out.iterdir():
        old.unlink()
    s.sb.systemctl("set-environment", "FROM_MANAGER=passed")
    s.sb.write_file("/tmp/outside-marker", "x")
    s.sb.systemctl("start", UNIT)
    code, unit = s.check()
    assert unit["migrations"]["current"] == ["r3"], unit
    rec = records(s, out)
    probes = [r for r in rec if "/driftwatch-probe-gunicorn-" in r["cgroup"]]
    apps = [r for r in rec if "/gunicorn.service" in r["cgroup"]]
    assert probes and apps, [r["cgroup"] for r in rec]
    app_env, probe = apps[0]["env"], probes[-1]
    assert "driftwatch-probe-gunicorn" in probe["cgroup"], probe["cgroup"]
    assert probe["uid"] == 33 and probe["umask"] == 0o027
    assert "outside-marker" not in probe["tmp"]  # PrivateTmp=yes, as for the app
    assert "DROPPED" not in probe["env"] and probe["env"]["KEPT"] == "y"
    assert probe["env"]["FROM_MANAGER"] == "passed" and "NOT_SET" not in probe["env"]
    # Everything the app got from systemd, the probe got too (plus the probe's own).
    same = {k: v for k, v in app_env.items() if k not in ("INVOCATION_ID", "SERVER_SOFTWARE",
                                                          "JOURNAL_STREAM", "SYSTEMD_EXEC_PID")}
    assert {k: probe["env"].get(k) for k in same} == same
    # agentctl env applies UnsetEnvironment= and PassEnvironment= as systemd does.
    env = json.loads(s.agentctl("env", UNIT, "--json").stdout)
    sources = {e["name"]: e["source"] for e in env["environment"]}
    names = list(sources)
    assert "DROPPED" not in sources and "NOT_SET" not in sources
    assert env["unset_environment"] == ["DROPPED"]
    assert sources["FROM_MANAGER"] == "PassEnvironment=" and sources["KEPT"] == "Environment="
    assert names.index("FROM_MANAGER") < names.index("FLASK_APP")  # systemd's order
    # No probe unit is left behind.
    left = s.sb.systemctl("list-units", "--all", "--no-legend", "driftwatch-probe-*",
                          "driftwatch-session-*").stdout
    assert left.strip() == ""


def test_load_credential_url(site: SiteFactory, pg_database: PgDatabase) -> None:
    """The app reads its URL from $CREDENTIALS_DIRECTORY: the probe and the session too."""
    hook = textwrap.dedent("""\
        import os as _o
        if _o.environ.get("CREDENTIALS_DIRECTORY"):  # not for flask db upgrade on the host
            _creds = _o.environ["CREDENTIALS_DIRECTORY"]
            _o.environ["DATABASE_URL"] = open(_o.path.join(_creds, "dburl")).read().strip()
            if open(_o.path.join(_creds, "flavour")).read() != "blue":
                raise RuntimeError("SetCredential= did not arrive")
        """)
    s = site(AppSpec(on_import=hook), start_unit=False, url="postgresql://nobody@127.0.0.1:1/x",
             service="LoadCredential=dburl:/etc/site/dburl\nSetCredential=flavour:blue\n",
             extra_files={"/etc/site/dburl": pg_database.url + "\n"})
    s.sb.path("/etc/site/dburl").chmod(0o600)
    # The sandbox boots with private propagation; a real host has / shared (design.md).
    s.sb.run(["mount", "--make-rshared", "/"])
    s.sb.systemctl("start", UNIT)
    code, unit = s.check()
    assert unit["migrations"]["current"] == ["r3"], unit["findings"]
    assert unit["database"].endswith("/" + pg_database.name)
    assert finding(unit, "database_unreachable") is None
    assert pg_database.password not in json.dumps(unit)


def test_dynamic_user_unit_is_inspected(site: SiteFactory) -> None:
    s = site(user=None, group=None, service="DynamicUser=yes\n")
    code, unit = s.check()
    assert unit["migrations"]["current"] == ["r3"], unit["findings"]
    assert unit["migrations"]["pending"] == []
    assert finding(unit, "probe_privileges") is None


NOT_AS_ROOT = textwrap.dedent("""\
    import os as _o
    if "driftwatch-probe" in open("/proc/self/cgroup").read() and _o.getuid() in (0, 33):
        raise RuntimeError("the probe ran as uid %d" % _o.getuid())
    """)


def test_unit_without_user_is_inspected_as_a_dynamic_user(site: SiteFactory) -> None:
    """The app runs as root; the probe and the session run as a dynamic user instead."""
    s = site(AppSpec(on_import=NOT_AS_ROOT), user=None, group=None, upgrade_to="r2")
    code, unit = s.check()
    assert unit["migrations"] and unit["migrations"]["current"] == ["r2"], (
        unit["findings"], unit["checks"])
    assert unit["migrations"]["pending"] == ["r3"]
    assert finding(unit, "pending_migrations") is not None
    assert finding(unit, "app_load_failed") is None


HANG = textwrap.dedent("""\
    import os as _o, subprocess as _s, time as _t
    if _o.environ.get("HANG_AT_IMPORT"):
        _p = _s.Popen(["/bin/sleep", "1000"], start_new_session=True)
        open(_o.environ["HANG_AT_IMPORT"], "w").write(str(_p.pid))
        _t.sleep(1000)
    """)


def test_timeout_ends_the_whole_cgroup(site: SiteFactory, app_workspace: Path) -> None:
    out = writable_dir(app_workspace / "pids")
    pidfile = out / "grandchild"
    s = site(AppSpec(on_import=HANG), start_unit=False,
             environment={"FLASK_APP": "wsgi.py", "HANG_AT_IMPORT": str(pidfile)})
    proc = s.agentctl("check", UNIT, "--json", "--probe-timeout", "15")
    unit = json.loads(proc.stdout)["units"][0]
    assert finding(unit, "app_load_timeout") is not None, unit["findings"]
    pid = int(s.sb.path(str(pidfile)).read_text())  # the app did start its grandchild
    deadline = time.monotonic() + 5
    while s.sb.path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not s.sb.path(f"/proc/{pid}").exists(), "a grandchild outlived the probe"


HOG = textwrap.dedent("""\
    import os as _o
    if _o.environ.get("HOG_AT_IMPORT") == "reserve":   # one huge allocation: LimitAS=
        _hog = bytearray(3 * 1024 * 1024 * 1024)
    elif _o.environ.get("HOG_AT_IMPORT") == "touch":   # 900 MiB really used: MemoryMax=
        _hog = [bytearray(64 * 1024 * 1024) for _ in range(14)]
    """)


@pytest.mark.parametrize("how", ["reserve", "touch"])
def test_memory_stays_under_the_probes_limit(site: SiteFactory, how: str) -> None:
    s = site(AppSpec(on_import=HOG), start_unit=False,
             environment={"FLASK_APP": "wsgi.py", "HOG_AT_IMPORT": how})
    code, unit = s.check()
    failed = finding(unit, "app_load_failed")
    assert failed is not None, unit["findings"]
    if how == "reserve":
        assert "MemoryError" in failed["message"]
    else:  # the cgroup's OOM killer ended it (or the allocator gave up first)
        assert "the probe's memory limit (MemoryMax=512M)" in failed["message"] or \
            "MemoryError" in failed["message"], failed
    assert unit["app_loaded"] is False


def test_unit_without_user_unreadable_file_is_one_finding_naming_it(
        site: SiteFactory, make_app: Callable[..., AppDir]) -> None:
    """gunicorn runs as root and reads a root-only module; the probe may not: say which."""
    app = make_app(AppSpec(on_import="from . import settings_local\n",
                           extra_files={"app/settings_local.py": "LOCAL = 1\n"}))
    private = app.root / "app" / "settings_local.py"
    private.chmod(0o640)
    os.chown(private, 0, 33)  # root:www-data
    s = site(app=app, user=None, group=None)
    code, unit = s.check()
    found = [f for f in unit["findings"] if str(private) in f["message"]]
    assert len(found) == 1 and found[0]["check"] == "probe_privileges", unit["findings"]
    assert "probe_user" in found[0]["remedy"]
    # The fix the finding names: a probe user who can read it (www-data's group can).
    proc = s.agentctl("check", UNIT, "--json", "--probe-timeout", "30", "--probe-user",
                      "www-data")
    unit = json.loads(proc.stdout)["units"][0]
    assert unit["migrations"]["current"] == ["r3"], unit["findings"]
    assert not [f for f in unit["findings"] if f["check"] == "probe_privileges"]


def test_unit_without_user_unloadable_app_still_gets_its_revision_state(
        site: SiteFactory, make_app: Callable[..., AppDir], pg_database: PgDatabase) -> None:
    """The stand-in cannot import the app, but it can read the migration files and the
    database the unit's environment names: current, heads and pending are still reported,
    beside the one finding naming the unreadable file and the fix."""
    app = make_app(AppSpec(on_import="from . import settings_local\n",
                           extra_files={"app/settings_local.py": "LOCAL = 1\n"}))
    private = app.root / "app" / "settings_local.py"
    private.chmod(0o600)  # root only: gunicorn (root) reads it, no stand-in can
    s = site(app=app, user=None, group=None, upgrade_to="r2")
    code, unit = s.check()
    naming = [f for f in unit["findings"] if str(private) in f["message"]]
    assert len(naming) == 1 and naming[0]["check"] == "probe_privileges", unit["findings"]
    assert unit["migrations"] is not None, (unit["findings"], unit["checks"])
    assert unit["migrations"]["current"] == ["r2"]
    assert unit["migrations"]["heads"] == ["r3"]
    assert unit["migrations"]["pending"] == ["r3"]
    assert "probe_user" in naming[0]["remedy"]
    assert "DATABASE_URL" in naming[0]["message"]
    assert finding(unit, "pending_migrations") is not None
    assert finding(unit, "app_load_failed") is None
    assert unit["database"].endswith("/" + pg_database.name)
    assert unit["app_loaded"] is False
    assert pg_database.password not in json.dumps(unit)


def test_unit_without_user_unreadable_migrations_still_gets_its_current_revision(
        site: SiteFactory, make_app: Callable[..., AppDir]) -> None:
    """Neither the app nor its migration files are readable by the stand-in: the current
    revision still comes from the version table; heads and pending are said to be unknown,
    not taken for "nothing pending"."""
    app = make_app(AppSpec(on_import="from . import settings_local\n",
                           extra_files={"app/settings_local.py": "LOCAL = 1\n"}))
    private = app.root / "app" / "settings_local.py"
    private.chmod(0o600)
    app.versions.chmod(0o700)  # root only
    s = site(app=app, user=None, group=None, upgrade_to="r2")
    code, unit = s.check()
    naming = [f for f in unit["findings"] if str(private) in f["message"]]
    assert len(naming) == 1 and naming[0]["check"] == "probe_privileges", unit["findings"]
    assert [f["check"] for f in unit["findings"]
            if f["check"] in ("app_load_failed", "migration_scripts_broken")] == []
    assert str(app.versions) in naming[0]["message"]
    notes = " ".join(unit.get("notes") or [])
    assert "current revision in alembic_version: r2" in notes, (notes, unit["checks"])
    assert "heads and pending unknown" in notes
    assert code != 0
