"""Filesystem facts the pure context builder needs: env files, venvs, shebangs, mtimes."""

from __future__ import annotations

import errno
import grp
import os
import pwd
import stat
import subprocess
from dataclasses import dataclass, field
from typing import Any

# One byte over systemd's own limit, so the parser can name the exact refusal.
MAX_ENV_FILE_BYTES = 64 * 1024 * 1024
# Directories never walked when looking for the newest code change.
SKIP_DIRS = {".git", ".hg", ".svn", "__pycache__", "node_modules", ".venv", "venv", "env",
             ".tox", ".mypy_cache", ".pytest_cache", "static", "media", "site-packages"}
CODE_SUFFIXES = {".py", ".ini", ".cfg", ".toml", ".mako"}
DEV_NULL = os.makedev(1, 3)
HEAD = "/usr/bin/head"
# A FIFO swapped in after the O_PATH check blocks the reading child, never root: bounded.
HEAD_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class FileRead:
    """The bytes of a file, or why they could not be read."""

    path: str
    data: bytes | None = field(default=None, repr=False)
    error: str = ""
    missing: bool = False


class NotRegular(OSError):
    """The path names a FIFO, socket, device or directory: never opened for reading."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str) -> int:
    """A read-only fd on path, which must be a regular file (NotRegular otherwise).

    The app's user can put a symlink to a FIFO (the open would block root for ever) or to a
    device (opening /dev/watchdog has effects) where a file is expected: the path is first
    opened with O_PATH, which opens nothing, and only the regular file that fd names is
    reopened for reading (through /proc/self/fd: the same inode, no second lookup to race).
    """
    pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        st = os.fstat(pfd)
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == DEV_NULL:
            return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)  # EnvironmentFile=/dev/null
        if not stat.S_ISREG(st.st_mode):
            raise NotRegular(errno.EINVAL, _kind(st.st_mode))
        return os.open(f"/proc/self/fd/{pfd}", os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    finally:
        os.close(pfd)


def read_file(path: str, limit: int = MAX_ENV_FILE_BYTES) -> FileRead:
    """Read a small regular file, turning every failure into a reason instead of an
    exception (a FIFO, socket or device is refused unopened: see open_regular)."""
    try:
        with os.fdopen(open_regular(path), "rb") as handle:
            data = handle.read(limit + 1)
    except NotRegular as exc:
        return FileRead(path, error=f"not a regular file ({exc.strerror})")
    except FileNotFoundError:
        return FileRead(path, missing=True, error="no such file")
    except PermissionError:
        return FileRead(path, error="permission denied")
    except IsADirectoryError:
        return FileRead(path, error="is a directory")
    except OSError as exc:
        return FileRead(path, error=exc.strerror or str(exc))
    if len(data) > limit:
        return FileRead(path, error=f"larger than {limit} bytes")
    return FileRead(path, data=data)


def is_virtualenv(path: str) -> bool:
    """True when path holds a virtualenv (pyvenv.cfg beside bin/)."""
    return bool(path) and os.path.isfile(os.path.join(path, "pyvenv.cfg"))


def venv_python(venv: str) -> str:
    """The interpreter of a virtualenv: bin/python3 if present, else bin/python."""
    for name in ("python3", "python"):
        candidate = os.path.join(venv, "bin", name)
        if os.path.exists(candidate):
            return candidate
    return os.path.join(venv, "bin", "python3")


@dataclass(frozen=True)
class Reader:
    """Who a file is read as: the unit's uid/gid/groups (None: root, for units that run as
    root, as systemd would)."""

    uid: int | None = None
    gid: int = 0
    groups: tuple[int, ...] = ()


NOBODY = 65534


def reader_for(user: str, group: str = "", supplementary: tuple[str, ...] = (),
               dynamic_user: bool = False) -> Reader | None:
    """Who reads a unit's files: its User=/Group=/SupplementaryGroups= as systemd resolves
    them; a dynamic user reads as nobody would (its uid is allocated at start); None (root)
    for a unit without User=, which systemd runs as root. An unknown user reads as nobody."""
    if dynamic_user:
        return Reader(NOBODY, NOBODY)
    if not user or user in ("root", "0"):
        return None
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, ValueError):
        return Reader(int(user), int(user)) if user.isdigit() else Reader(NOBODY, NOBODY)
    gid = entry.pw_gid
    if group:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            return Reader(NOBODY, NOBODY)
    groups = list(os.getgrouplist(entry.pw_name, gid))
    for extra in supplementary:
        try:
            groups.append(int(extra) if extra.isdigit() else grp.getgrnam(extra).gr_gid)
        except KeyError:
            continue
    return Reader(entry.pw_uid, gid, tuple(dict.fromkeys(groups)))


# (path, reader, dev, ino, mtime_ns, size) -> first line: a script is read as its user only
# when it changed, not on every inspection.
_HEADS: dict[tuple[Any, ...], bytes] = {}
_HEADS_MAX = 1024


def _first_line_as(path: str, reader: Reader) -> bytes:
    """The first line (<= 512 bytes) of a regular file, read by a child running as reader:
    what that user could not read, root does not read for it either."""
    proc = subprocess.run(
        [HEAD, "-c", "512", "--", path], user=reader.uid, group=reader.gid,
        extra_groups=list(reader.groups), stdin=subprocess.DEVNULL, capture_output=True,
        env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"}, cwd="/", timeout=HEAD_TIMEOUT_S,
        check=False)
    return proc.stdout.split(b"\n", 1)[0] if proc.returncode == 0 else b""


def first_line(path: str, reader: Reader | None = None) -> bytes:
    """The first line of a regular file ('' for anything else or what reader cannot read)."""
    try:
        fd = open_regular(path)
    except OSError:
        return b""
    try:
        # Not root (agentctl as a user): reading as ourselves gains nobody anything.
        if reader is None or reader.uid in (None, 0) or os.geteuid() != 0:
            with os.fdopen(os.dup(fd), "rb") as handle:
                return handle.readline(512)
        st = os.fstat(fd)
    finally:
        os.close(fd)
    key = (path, reader, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
    if key not in _HEADS:
        try:
            line = _first_line_as(path, reader)
        except (OSError, subprocess.SubprocessError):
            line = b""
        if len(_HEADS) >= _HEADS_MAX:
            _HEADS.clear()
        _HEADS[key] = line
    return _HEADS[key]


def shebang_interpreter(path: str, reader: Reader | None = None) -> str:
    """The interpreter named on a script's '#!' line ('' for binaries, for anything but a
    regular file, and for what reader, the unit's user, cannot read)."""
    first = first_line(path, reader)
    if not first.startswith(b"#!"):
        return ""
    words = first[2:].decode("utf-8", errors="replace").split()
    if not words:
        return ""
    if os.path.basename(words[0]) == "env" and len(words) > 1:
        return words[-1]
    return words[0]


def realpath(path: str) -> str:
    """os.path.realpath, '' for '' and for what no path can be (a NUL byte in it)."""
    try:
        return os.path.realpath(path) if path else ""
    except ValueError:  # "embedded null byte": the app's user wrote this path
        return ""


def user_home(user: str) -> str:
    """Home directory of a user name or numeric id ('' if unknown); root for ''."""
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user or "root")
    except (KeyError, ValueError):
        return ""
    return entry.pw_dir


def newest_file(root: str, max_files: int = 20000,
                skip: tuple[str, ...] = ()) -> tuple[str, float] | None:
    """(path, mtime) of the most recently modified code file under root, walking a bounded tree
    (directories in skip, absolute, left out); symlinks neither followed nor stat'ed through."""
    best: tuple[str, float] | None = None
    seen = 0
    if not root or not os.path.isdir(root):
        return None
    skipped = {os.path.normpath(p) for p in skip if p}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".")
                       and os.path.join(dirpath, d) not in skipped]
        for name in filenames:
            if os.path.splitext(name)[1] not in CODE_SUFFIXES:
                continue
            seen += 1
            if seen > max_files:
                return best
            full = os.path.join(dirpath, name)
            try:
                # The link's own time, never its target's: a link the app's user puts here
                # must not make root stat a file that user cannot (a root-only file's
                # mtime would show in code_newer_than_process).
                mtime = os.lstat(full).st_mtime
            except OSError:
                continue
            if best is None or mtime > best[1]:
                best = (full, mtime)
    return best
