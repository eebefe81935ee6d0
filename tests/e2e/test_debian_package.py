"""The Debian package from packaging/build-deb: its metadata and files, then its whole life
(install, start, scrape, reinstall, remove, purge) with dpkg inside a real systemd sandbox.

dpkg only ever runs inside the sandbox, whose root is an overlay over the host's: the host's
dpkg database, /opt, /etc and /lib are never written.
"""

from __future__ import annotations

import gzip
import marshal
import os
import re
import shutil
import subprocess
import tomllib
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.config import Config, parse_config
from tests.conftest import skip_or_fail
from tests.harness.agent import agent_config
from tests.harness.postgres import free_port
from tests.harness.prometheus import PROMTOOL
from tests.harness.sandbox import REPO_ROOT, Sandbox

pytestmark = pytest.mark.systemd

BUILD_DEB = REPO_ROOT / "packaging" / "build-deb"
VERSION = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
DEB_VERSION = f"{VERSION}-1"
UNIT = "driftwatch-agent.service"
CONFIG = "/etc/driftwatch/agent.toml"
PREFIX = "/opt/driftwatch"
DEB_IN_SANDBOX = "/root/driftwatch.deb"
DPKG_ENV = {"DEBIAN_FRONTEND": "noninteractive"}

#: path in the package -> symlink target ("" for anything that is not a symlink)
EXPECTED_PATHS = {
    f"{PREFIX}/bin/python3": "/usr/bin/python3",
    f"{PREFIX}/bin/agentctl": "",
    f"{PREFIX}/bin/driftwatch-agent": "",
    f"{PREFIX}/pyvenv.cfg": "",
    "/usr/bin/agentctl": f"{PREFIX}/bin/agentctl",
    "/usr/bin/driftwatch-agent": f"{PREFIX}/bin/driftwatch-agent",
    f"/lib/systemd/system/{UNIT}": "",
    CONFIG: "",
    "/usr/share/driftwatch/prometheus/driftwatch-alerts.yml": "",
    "/usr/share/driftwatch/prometheus/driftwatch-alerts.test.yml": "",
    "/usr/share/driftwatch/prometheus/configure.py": "",
    "/usr/share/driftwatch/alertmanager/driftwatch-inhibit.yml": "",
    "/usr/share/driftwatch/alertmanager/alertmanager.example.yml": "",
    "/usr/share/doc/driftwatch/README.md.gz": "",
    "/usr/share/doc/driftwatch/copyright": "",
    "/usr/share/doc/driftwatch/bundled-python-packages.txt": "",
}


def _build_unavailable_reason() -> str | None:
    if shutil.which("dpkg-deb") is None:
        return "dpkg-deb is not installed (dpkg-dev)"
    if not os.access("/usr/bin/python3", os.X_OK):
        return "/usr/bin/python3 is not installed"
    if shutil.which("pkg-config") is None or subprocess.run(
            ["pkg-config", "--exists", "libsystemd"]).returncode != 0:
        return "libsystemd-dev and pkg-config are needed to build pystemd: run .ci/setup"
    if shutil.which("gcc") is None:
        return "gcc is needed to build pystemd: run .ci/setup"
    return None


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package, built once for this module (xz -1: the size does not matter here)."""
    reason = _build_unavailable_reason()
    if reason:
        skip_or_fail(reason)
    out = tmp_path_factory.mktemp("deb")
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["DEB_COMPRESS_LEVEL"] = "1"
    proc = subprocess.run(["bash", str(BUILD_DEB), str(out)], capture_output=True, text=True,
                          env=env, timeout=280, cwd="/")
    assert proc.returncode == 0, f"build-deb exited {proc.returncode}:\n{proc.stderr[-6000:]}"
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                          check=True).stdout.strip()
    path = out / f"driftwatch_{DEB_VERSION}_{arch}.deb"
    assert proc.stdout.strip() == str(path), proc.stdout
    assert sorted(out.iterdir()) == [path]
    return path


@pytest.fixture(scope="module")
def unpacked(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package's file system tree, extracted with dpkg-deb -x (not installed)."""
    root = tmp_path_factory.mktemp("unpacked")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root


def dpkg_deb(*args: str) -> str:
    return subprocess.run(["dpkg-deb", *args], capture_output=True, text=True,
                          check=True).stdout


# -- the package, as a file ---------------------------------------------------------------------

def test_control_fields_scripts_and_conffile(deb: Path) -> None:
    fields = dict(line.split(": ", 1) for line in dpkg_deb(
        "--show", "--showformat=Package: ${Package}\\nVersion: ${Version}\\n"
        "Architecture: ${Architecture}\\nDepends: ${Depends}\\n", str(deb)).splitlines())
    assert fields["Package"] == "driftwatch"
    assert fields["Version"] == DEB_VERSION
    assert fields["Architecture"] == "amd64" or os.uname().machine != "x86_64"
    depends = [d.strip() for d in fields["Depends"].split(",")]
    assert "python3 (>= 3.11)" in depends and "libsystemd0" in depends, depends

    info = dpkg_deb("--info", str(deb))
    for script in ("postinst", "prerm", "postrm"):
        assert re.search(rf"^\s+\d+ bytes,\s+\d+ lines\s+\*\s+{script}\s+#!/bin/sh$", info,
                         re.M), f"{script} missing or not executable:\n{info}"
    description = dpkg_deb("--field", str(deb), "Description")
    assert description.startswith("systemd-aware agent") and len(description.splitlines()) > 5
    assert dpkg_deb("--info", str(deb), "conffiles").split() == [CONFIG]
    md5sums = dpkg_deb("--info", str(deb), "md5sums")
    assert "opt/driftwatch/bin/agentctl" in md5sums and CONFIG.lstrip("/") not in md5sums


def test_contents_paths_owners_and_symlinks(deb: Path) -> None:
    entries: dict[str, tuple[str, str, str]] = {}  # path -> (mode, owner, symlink target)
    for line in dpkg_deb("--contents", str(deb)).splitlines():
        mode, owner, _size, _date, _time, name = line.split(None, 5)
        name, _, target = name.partition(" -> ")
        entries["/" + name.removeprefix("./").rstrip("/")] = (mode, owner, target)
    for path, target in EXPECTED_PATHS.items():
        assert path in entries, f"{path} is not in the package"
        assert entries[path][2] == target, f"{path} -> {entries[path][2]!r}, not {target!r}"
    assert {owner for _, owner, _ in entries.values()} == {"root/root"}
    assert entries[CONFIG][0] == "-rw-r--r--"
    assert entries[f"/lib/systemd/system/{UNIT}"][0] == "-rw-r--r--"
    assert entries[f"{PREFIX}/bin/agentctl"][0] == "-rwxr-xr-x"
    # The bundled venv is changed only by a new package: no installer inside it.
    assert not [p for p in entries if re.search(r"/site-packages/pip[-/]", p)]
    assert not [p for p in entries if p.startswith("/var/")], "state is made by systemd"


def test_unpacked_files_match_the_checkout(unpacked: Path) -> None:
    unit = (unpacked / f"lib/systemd/system/{UNIT}").read_text()
    assert unit == (REPO_ROOT / "systemd" / UNIT).read_text()
    assert f"ExecStart=/usr/bin/driftwatch-agent --config.file={CONFIG}" in unit
    for name in ("driftwatch-alerts.yml", "driftwatch-alerts.test.yml"):
        assert (unpacked / "usr/share/driftwatch/prometheus" / name).read_bytes() == \
            (REPO_ROOT / "packaging" / "prometheus" / name).read_bytes()
    readme = gzip.decompress((unpacked / "usr/share/doc/driftwatch/README.md.gz").read_bytes())
    assert readme == (REPO_ROOT / "README.md").read_bytes()
    bundled = (unpacked / "usr/share/doc/driftwatch/bundled-python-packages.txt").read_text()
    for dist in ("driftwatch==", "pystemd==", "psutil==", "SQLAlchemy==", "alembic=="):
        assert dist in bundled, bundled


def test_default_config_is_all_comments_and_every_commented_key_is_real(
        unpacked: Path) -> None:
    text = (unpacked / CONFIG.lstrip("/")).read_text()
    assert parse_config(text, CONFIG) == Config(source=CONFIG)  # as commented: the defaults
    uncommented = re.sub(r"^#(?=[a-z_\[])", "", text, flags=re.M)
    assert uncommented.count("\n") == text.count("\n") and uncommented != text
    config = parse_config(uncommented, CONFIG)  # uncommented: valid, documented values
    assert config.listen_address == ":9410" and config.tls.enabled


def test_venv_points_at_opt_and_ships_final_byte_code(unpacked: Path) -> None:
    venv = unpacked / PREFIX.lstrip("/")
    cfg = (venv / "pyvenv.cfg").read_text()
    assert "home = /usr/bin" in cfg and "include-system-site-packages = false" in cfg
    assert f"-m venv {PREFIX}" in cfg, cfg
    for script in ("agentctl", "driftwatch-agent"):
        first = (venv / "bin" / script).read_text().splitlines()[0]
        assert first in (f"#!{PREFIX}/bin/python", f"#!{PREFIX}/bin/python3"), first
    assert f'VIRTUAL_ENV={PREFIX}' in (venv / "bin" / "activate").read_text()
    for path in [*(venv / "bin").iterdir(), venv / "pyvenv.cfg"]:
        if path.is_file() and not path.is_symlink():
            assert "/tmp" not in path.read_text(errors="replace"), path
    # Every module of the agent has hash-checked byte code naming its installed path, so
    # nothing is compiled (or written into /opt) at run time.
    agent_dir = next(venv.glob("lib/python3*/site-packages/agent"))
    sources = sorted(agent_dir.rglob("*.py"))
    assert sources
    for source in sources:
        pycs = list((source.parent / "__pycache__").glob(f"{source.stem}.cpython-*.pyc"))
        assert len(pycs) == 1, f"no byte code for {source}"
        data = pycs[0].read_bytes()
        assert int.from_bytes(data[4:8], "little") == 0b11, f"{pycs[0]} is not checked-hash"
        filename = marshal.loads(data[16:]).co_filename
        assert filename == "/" + str(source.relative_to(unpacked)), filename


def test_packaged_alert_rules_pass_promtool(unpacked: Path) -> None:
    if not PROMTOOL.exists():
        skip_or_fail(f"{PROMTOOL} missing: run .ci/setup")
    tests = unpacked / "usr/share/driftwatch/prometheus/driftwatch-alerts.test.yml"
    proc = subprocess.run([str(PROMTOOL), "test", "rules", str(tests)], capture_output=True,
                          text=True, cwd=tests.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- the package, installed with dpkg inside a booted systemd ----------------------------------

def test_install_start_scrape_reinstall_remove_purge(
        deb: Path, make_sandbox: Callable[[], Sandbox]) -> None:
    port = free_port()
    sb = make_sandbox()
    sb.add_file(DEB_IN_SANDBOX, deb.read_bytes())
    # The admin's config is there before the package (as configuration management does it),
    # so the agent that postinst starts listens on a free loopback port, never on :9410.
    admin_config = agent_config(f"127.0.0.1:{port}")
    sb.add_file(CONFIG, admin_config)
    sb.boot()
    # A container's "start no services" policy (Docker images ship one) is not a server's.
    sb.run(["rm", "-f", "/usr/sbin/policy-rc.d"])

    def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = sb.run(list(argv), check=False, env=DPKG_ENV, input="", timeout=120)
        assert not check or proc.returncode == 0, \
            f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        return proc

    def active() -> str:
        return sb.systemctl("is-active", UNIT, check=False).stdout.strip()

    def main_pid_cmdline() -> str:
        pid = sb.main_pid(UNIT)
        assert pid > 0
        return run("cat", f"/proc/{pid}/cmdline").stdout.replace("\0", " ")

    def metrics() -> str:
        url = f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.read().decode()

    # dpkg -i: enabled, and started by postinst (systemd runs), with the admin's config kept.
    install = run("dpkg", "--force-confold", "-i", DEB_IN_SANDBOX)
    assert "Setting up driftwatch" in install.stdout
    assert sb.systemctl("is-enabled", UNIT, check=False).stdout.strip() == "enabled"
    assert active() == "active", sb.systemctl("status", UNIT, check=False).stdout
    assert run("cat", CONFIG).stdout == admin_config
    assert run("cat", f"{CONFIG}.dpkg-dist").stdout == (REPO_ROOT / "packaging" / "debian" /
                                                        "agent.toml").read_text()
    assert f"{PREFIX}/bin/python /usr/bin/driftwatch-agent --config.file={CONFIG}" in \
        main_pid_cmdline()

    # Where systemd is not running (a chroot, an image build: no /run/systemd/system), dpkg -i
    # succeeds, keeps the unit enabled and starts nothing.
    sb.systemctl("stop", UNIT)
    run("unshare", "--mount", "sh", "-c",
        f"mount -t tmpfs none /run/systemd && exec dpkg -i {DEB_IN_SANDBOX}")
    assert active() == "inactive"
    assert sb.systemctl("is-enabled", UNIT, check=False).stdout.strip() == "enabled"

    # Type=notify: start returns once the agent said READY=1, then it serves its metrics.
    sb.systemctl("start", UNIT)
    assert active() == "active"
    text = metrics()
    assert re.search(rf'^driftwatch_build_info{{python="3\.\d+\.\d+",version="{VERSION}"}} 1\.0$',
                     text, re.M), text[:2000]
    assert run("agentctl", "--version").stdout.strip() == f"agentctl {VERSION}"
    as_nobody = run("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                    "/usr/bin/driftwatch-agent", "--version")
    assert as_nobody.stdout.strip().endswith(VERSION)
    status = run("agentctl", "status", check=False)        # root: the packaged unit's socket
    assert status.stdout.startswith(f"from the driftwatch agent {VERSION} on "
                                    "/run/driftwatch/agent.sock"), status.stdout + status.stderr
    status = run("agentctl", "status", "--socket", "", check=False)
    assert status.stdout.startswith(f"from the driftwatch agent {VERSION} on 127.0.0.1:{port} "
                                    "over TCP"), status.stdout + status.stderr
    assert run("test", "-d", "/var/lib/driftwatch", check=False).returncode == 0

    # Reinstall (an upgrade to the same version): restarted, the admin's config untouched.
    before = sb.main_pid(UNIT)
    reinstall = run("dpkg", "-i", DEB_IN_SANDBOX)
    assert "Configuration file" not in reinstall.stdout, reinstall.stdout
    assert active() == "active" and sb.main_pid(UNIT) != before
    assert run("cat", CONFIG).stdout == admin_config
    # Nothing under /opt/driftwatch that the package does not own (no run-time byte code).
    stray = run("sh", "-c", f"find {PREFIX} -type f | sort > /tmp/found; "
                "dpkg-query -L driftwatch | sort > /tmp/owned; comm -23 /tmp/found /tmp/owned")
    assert stray.stdout == "", stray.stdout

    # dpkg -r: stopped, gone; configuration and state stay.
    remove = run("dpkg", "-r", "driftwatch")
    assert "warning" not in remove.stdout + remove.stderr, remove.stdout + remove.stderr
    assert active() == "inactive"
    assert sb.systemctl("show", "-p", "LoadState", "--value", UNIT).stdout.strip() == "not-found"
    leftovers = run("sh", "-c", "grep -l driftwatch-agen[t] /proc/[0-9]*/cmdline", check=False)
    assert leftovers.stdout == "", leftovers.stdout
    for gone in (PREFIX, "/usr/bin/agentctl", "/usr/bin/driftwatch-agent",
                 f"/lib/systemd/system/{UNIT}", "/usr/share/driftwatch"):
        assert run("test", "-e", gone, check=False).returncode != 0, f"{gone} is still there"
    assert run("cat", CONFIG).stdout == admin_config
    assert run("test", "-d", "/var/lib/driftwatch", check=False).returncode == 0
    status_line = run("dpkg-query", "-W", "-f=${Status}", "driftwatch").stdout
    assert status_line == "deinstall ok config-files"

    # dpkg --purge: configuration, enablement and state removed too.
    run("dpkg", "--purge", "driftwatch")
    for gone in ("/etc/driftwatch", "/var/lib/driftwatch",
                 f"/etc/systemd/system/multi-user.target.wants/{UNIT}",
                 f"/var/lib/systemd/deb-systemd-helper-enabled/{UNIT}.dsh-also"):
        assert run("test", "-e", gone, check=False).returncode != 0, f"{gone} is still there"
    assert run("dpkg-query", "-W", "driftwatch", check=False).returncode != 0
