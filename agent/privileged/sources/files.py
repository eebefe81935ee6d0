"""Filesystem facts the pure context builder needs: env files, venvs, shebangs, mtimes."""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass, field

# One byte over systemd's own limit, so the parser can name the exact refusal.
MAX_ENV_FILE_BYTES = 64 * 1024 * 1024
# Directories never walked when looking for the newest code change.
SKIP_DIRS = {".git", ".hg", ".svn", "__pycache__", "node_modules", ".venv", "venv", "env",
             ".tox", ".mypy_cache", ".pytest_cache", "static", "media", "site-packages"}
CODE_SUFFIXES = {".py", ".ini", ".cfg", ".toml", ".mako"}


@dataclass(frozen=True)
class FileRead:
    """The bytes of a file, or why they could not be read."""

    path: str
    data: bytes | None = field(default=None, repr=False)
    error: str = ""
    missing: bool = False


def read_file(path: str, limit: int = MAX_ENV_FILE_BYTES) -> FileRead:
    """Read a small file, turning every failure into a reason instead of an exception."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
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


def shebang_interpreter(path: str) -> str:
    """The interpreter named on a script's '#!' line ('' for binaries or unreadable files)."""
    try:
        with open(path, "rb") as handle:
            first = handle.readline(512)
    except OSError:
        return ""
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
    (directories in skip, absolute, left out)."""
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
                mtime = os.stat(full).st_mtime
            except OSError:
                continue
            if best is None or mtime > best[1]:
                best = (full, mtime)
    return best
