"""A real systemd booted in throwaway namespaces over an overlay of the host's root.

Safety: systemd is only ever booted inside a private mount namespace whose root is an
overlayfs (lower=/, upper on a tmpfs), with fresh /run and /tmp, every generator and
every boot unit that touches the kernel, the network or host state masked, and its own
cgroup subtree. The sandbox is ended by killing its PID 1 by PID, which ends every process
in its PID namespace and drops the tmpfs with the mount namespace.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

SYSTEMD_BIN = "/lib/systemd/systemd"
REPO_ROOT = Path(__file__).resolve().parents[2]
SANDBOX_TARGET = "driftwatch-sandbox.target"

# Units that must never run against the host: kernel settings, devices, clocks, /tmp
# cleaners, networking (the network namespace is shared), and anything enabled on the host.
MASKED_UNITS = (
    "systemd-tmpfiles-setup.service systemd-tmpfiles-setup-dev.service "
    "systemd-tmpfiles-setup-dev-early.service systemd-tmpfiles-clean.service "
    "systemd-tmpfiles-clean.timer systemd-sysctl.service systemd-modules-load.service "
    "kmod-static-nodes.service systemd-udevd.service systemd-udev-trigger.service "
    "systemd-udev-settle.service systemd-udevd-control.socket systemd-udevd-kernel.socket "
    "systemd-random-seed.service systemd-binfmt.service proc-sys-fs-binfmt_misc.automount "
    "systemd-remount-fs.service systemd-fsck-root.service systemd-timesyncd.service "
    "systemd-hwdb-update.service ldconfig.service systemd-machine-id-commit.service "
    "systemd-firstboot.service systemd-pstore.service systemd-networkd.service "
    "systemd-networkd.socket systemd-resolved.service networking.service "
    "systemd-logind.service getty.target getty@tty1.service console-getty.service "
    "serial-getty@.service systemd-update-utmp.service systemd-update-utmp-runlevel.service "
    "systemd-journald-audit.socket systemd-repart.service systemd-pcrphase.service "
    "systemd-pcrphase-sysinit.service dev-hugepages.mount dev-mqueue.mount "
    "sys-kernel-config.mount sys-kernel-debug.mount sys-kernel-tracing.mount "
    "sys-fs-fuse-connections.mount tmp.mount swap.target cryptsetup.target "
    "postgresql.service prometheus.service prometheus-node-exporter.service cron.service "
    "ssh.service smartmontools.service smartd.service e2scrub_reap.service "
    "systemd-boot-update.service systemd-ask-password-wall.path "
    "systemd-ask-password-console.path"
).split()

BOOT_SCRIPT = r"""
set -eu
base=$1; payload=$2; cgmode=$3; cgname=$4; shift 4
mount -t tmpfs -o mode=755 driftwatch-sandbox "$base"
mkdir -p "$base/upper" "$base/work" "$base/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$base/upper,workdir=$base/work" "$base/root"
R="$base/root"
mount -t proc proc "$R/proc"
mount --rbind /sys "$R/sys"
mount --rbind /dev "$R/dev"
mount -t tmpfs -o mode=755 tmpfs "$R/run"
mount -t tmpfs -o mode=1777 tmpfs "$R/tmp"
# Host paths the tests need at the same place inside (the checkout may live under /tmp).
for p in "$@"; do mkdir -p "$R$p"; mount --bind "$p" "$R$p"; done
# Fresh cgroup mounts made inside our cgroup namespace show only our own subtree.
if [ "$cgmode" = unified ]; then
  mount -t cgroup2 cgroup2 "$R/sys/fs/cgroup"
else
  mount -t tmpfs -o mode=755 cgroup "$R/sys/fs/cgroup"
  mkdir -p "$R/sys/fs/cgroup/systemd" "$R/sys/fs/cgroup/unified"
  mount -t cgroup -o none,name=systemd cgroup "$R/sys/fs/cgroup/systemd"
  mount -t cgroup2 cgroup2 "$R/sys/fs/cgroup/unified" || rmdir "$R/sys/fs/cgroup/unified"
fi
E="$R/etc/systemd/system"
mkdir -p "$E" "$R/etc/systemd/system-generators"
rm -rf "$E"/*.wants "$E"/*.requires
for d in sysinit.target.wants multi-user.target.wants timers.target.wants \
         sockets.target.wants default.target.wants local-fs.target.wants; do
  for f in "$R/lib/systemd/system/$d"/*; do
    [ -e "$f" ] || [ -L "$f" ] || continue
    case "$(basename "$f")" in
      systemd-journald*|dbus.socket|dbus.service) ;;
      *) rm -f "$f" ;;
    esac
  done
done
for g in "$R/lib/systemd/system-generators"/*; do
  ln -sf /dev/null "$R/etc/systemd/system-generators/$(basename "$g")"
done
for u in $MASKED; do ln -sf /dev/null "$E/$u"; done
rm -f "$R/etc/machine-id"; : > "$R/etc/machine-id"
cp -a "$payload/." "$R/"
mkdir -p "$R/oldroot"
cd "$R"
pivot_root . oldroot
umount -l /oldroot
rmdir /oldroot
exec env -i container=driftwatch-sandbox PATH=/usr/sbin:/usr/bin:/sbin:/bin \
  /lib/systemd/systemd --system --unit=driftwatch-sandbox.target \
  --log-target=console --log-level=notice
"""

SANDBOX_TARGET_UNIT = """[Unit]
Description=driftwatch test sandbox
DefaultDependencies=no
Wants=systemd-journald.socket systemd-journald.service dbus.socket
After=systemd-journald.socket dbus.socket
AllowIsolate=yes
"""


class SandboxError(RuntimeError):
    """The sandbox could not boot or a command inside it failed."""


def sandbox_unavailable_reason() -> str | None:
    """Why a sandbox cannot be booted here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root to boot systemd in a namespace sandbox"
    for tool in ("unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} (util-linux) is not installed"
    if not Path(SYSTEMD_BIN).exists():
        return f"{SYSTEMD_BIN} is not installed"
    return None


def _cgroup_mode() -> str:
    """'unified' when /sys/fs/cgroup is cgroup2, else 'legacy' (v1 or hybrid)."""
    fstype = subprocess.run(
        ["stat", "-f", "-c", "%T", "/sys/fs/cgroup"], capture_output=True, text=True
    ).stdout.strip()
    return "unified" if fstype == "cgroup2fs" else "legacy"


class Sandbox:
    """One booted systemd; use as a context manager or call boot()/destroy()."""

    def __init__(self, workdir: Path | None = None, binds: tuple[str, ...] = ()) -> None:
        self.id = uuid.uuid4().hex[:10]
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="driftwatch-sandbox-"))
        self.payload = self.workdir / "payload"
        self.base = self.workdir / "mnt"
        self.log_path = self.workdir / "systemd.log"
        self.pid: int | None = None
        self._launcher: subprocess.Popen[bytes] | None = None
        self._cgroup_dirs: list[Path] = []
        # The checkout (with its .venv) is always visible inside, wherever it was cloned.
        self.binds = tuple(dict.fromkeys((str(REPO_ROOT), *binds)))
        self.payload.mkdir(parents=True, exist_ok=True)
        self.base.mkdir(exist_ok=True)
        self.add_file(f"/etc/systemd/system/{SANDBOX_TARGET}", SANDBOX_TARGET_UNIT)

    # -- preparing, before boot ------------------------------------------------------
    def add_file(self, path: str, content: str | bytes, mode: int = 0o644) -> None:
        """Place a file in the sandbox's root before boot."""
        target = self.payload / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        data = content.encode() if isinstance(content, str) else content
        target.write_bytes(data)
        target.chmod(mode)

    def add_unit(self, name: str, text: str, dropins: dict[str, str] | None = None) -> None:
        """Install a unit file (and drop-ins) under /etc/systemd/system before boot."""
        self.add_file(f"/etc/systemd/system/{name}", text)
        for dropin_name, dropin_text in (dropins or {}).items():
            self.add_file(f"/etc/systemd/system/{name}.d/{dropin_name}", dropin_text)

    # -- lifecycle -----------------------------------------------------------------------
    def boot(self, timeout: float = 30.0) -> "Sandbox":
        """Boot systemd and wait until it answers on its private bus."""
        reason = sandbox_unavailable_reason()
        if reason:
            raise SandboxError(reason)
        mode = _cgroup_mode()
        script = self.workdir / "boot.sh"
        script.write_text(
            f"MASKED={shlex.quote(' '.join(MASKED_UNITS))}\n" + BOOT_SCRIPT
        )
        self._cgroup_dirs = self._make_cgroups(mode)
        log = open(self.log_path, "wb")
        self._launcher = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount", "--uts", "--ipc", "--cgroup",
             "--propagation", "private",
             "sh", str(script), str(self.base), str(self.payload), mode, self.id,
             *self.binds],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=self._enter_cgroups,
        )
        log.close()
        try:
            self.pid = self._find_init_pid(timeout=5.0)
            self._wait_running(timeout)
        except BaseException:
            self.destroy()
            raise
        return self

    def _make_cgroups(self, mode: str) -> list[Path]:
        name = f"driftwatch-sandbox-{self.id}"
        if mode == "unified":
            roots = [Path("/sys/fs/cgroup")]
        else:
            roots = [p for p in (Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified"))
                     if p.is_dir()]
        dirs = []
        for root in roots:
            d = root / name
            d.mkdir(exist_ok=True)
            dirs.append(d)
        return dirs

    def _enter_cgroups(self) -> None:
        for d in self._cgroup_dirs:
            (d / "cgroup.procs").write_text(str(os.getpid()))

    def _find_init_pid(self, timeout: float) -> int:
        assert self._launcher is not None
        deadline = time.monotonic() + timeout
        children = Path(f"/proc/{self._launcher.pid}/task/{self._launcher.pid}/children")
        while time.monotonic() < deadline:
            try:
                pids = children.read_text().split()
            except FileNotFoundError:
                pids = []
            if pids:
                return int(pids[0])
            if self._launcher.poll() is not None:
                raise SandboxError(f"sandbox launcher exited: {self.log_tail()}")
            time.sleep(0.01)
        raise SandboxError("sandbox launcher did not fork its init")

    def _wait_running(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            if self._launcher is not None and self._launcher.poll() is not None:
                raise SandboxError(f"systemd exited during boot: {self.log_tail()}")
            proc = self.run(["systemctl", "is-system-running"], check=False, timeout=5)
            state = proc.stdout.strip()
            if state in ("running", "degraded"):
                return
            time.sleep(0.05)
        raise SandboxError(f"systemd did not finish booting (state {state!r}): {self.log_tail()}")

    def destroy(self) -> None:
        """Kill the sandbox's PID 1 (by PID) and clean up; safe to call twice."""
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self._launcher is not None:
            try:
                self._launcher.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self._launcher.pid, signal.SIGKILL)
                self._launcher.wait(timeout=10)
        self.pid = None
        self._launcher = None
        for d in self._cgroup_dirs:
            _remove_cgroup_tree(d)
        self._cgroup_dirs = []

    def __enter__(self) -> "Sandbox":
        return self.boot()

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    # -- using a booted sandbox ----------------------------------------------------------
    def nsenter_argv(self, argv: list[str]) -> list[str]:
        """argv that runs a command inside the sandbox's namespaces and root."""
        if self.pid is None:
            raise SandboxError("sandbox is not booted")
        return ["nsenter", "-t", str(self.pid), "-m", "-p", "-u", "-i", "-C", "-r", "-w",
                "--", *argv]

    def run(self, argv: list[str], check: bool = True, timeout: float = 60,
            env: dict[str, str] | None = None, input: str | None = None,
            ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the sandbox and capture its output."""
        full_env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
        full_env.update(env or {})
        proc = subprocess.run(self.nsenter_argv(argv), capture_output=True, text=True,
                              timeout=timeout, env=full_env, input=input)
        if check and proc.returncode != 0:
            raise SandboxError(
                f"{shlex.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}"
                f" {proc.stdout.strip()}")
        return proc

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run systemctl inside the sandbox."""
        return self.run(["systemctl", "--no-pager", *args], check=check)

    def path(self, path: str) -> Path:
        """The host path of a file inside the running sandbox's root."""
        if self.pid is None:
            raise SandboxError("sandbox is not booted")
        return Path(f"/proc/{self.pid}/root") / path.lstrip("/")

    def write_file(self, path: str, content: str | bytes, mode: int = 0o644) -> None:
        """Write a file inside the running sandbox (lands in the overlay's upper layer)."""
        target = self.path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        data = content.encode() if isinstance(content, str) else content
        target.write_bytes(data)
        target.chmod(mode)

    def main_pid(self, unit: str) -> int:
        """MainPID of a unit, as seen from the sandbox's PID namespace."""
        out = self.systemctl("show", "-p", "MainPID", "--value", unit).stdout.strip()
        return int(out)

    def wait_active(self, unit: str, timeout: float = 30.0) -> None:
        """Wait until a unit is active (and, for notify/forking units, started)."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.systemctl("is-active", unit, check=False).stdout.strip()
            if state == "active":
                return
            if state == "failed":
                break
            time.sleep(0.05)
        status = self.systemctl("status", unit, check=False).stdout
        journal = self.run(["journalctl", "-u", unit, "-n", "40", "--no-pager"],
                           check=False).stdout
        raise SandboxError(f"{unit} is {state!r}:\n{status}\n{journal}")

    def log_tail(self, lines: int = 30) -> str:
        """The last lines systemd printed on its console."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


def _remove_cgroup_tree(path: Path) -> None:
    """rmdir a cgroup directory bottom-up (cgroupfs only allows rmdir of empty groups)."""
    if not path.exists():
        return
    for _ in range(50):
        try:
            for sub in sorted((p for p in path.rglob("*") if p.is_dir()),
                              key=lambda p: len(p.parts), reverse=True):
                sub.rmdir()
            path.rmdir()
            return
        except OSError:
            time.sleep(0.05)
