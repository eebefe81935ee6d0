"""Real mounts for fault tests: a tiny tmpfs, a read-only bind. Root only; always unmounted."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def mount_unavailable_reason() -> str:
    """Why real mounts cannot be made here ('' when they can)."""
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    return ""


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True)


@contextmanager
def tmpfs(where: Path, size: str = "64k") -> Iterator[Path]:
    """A tmpfs of the given size mounted on where (made if needed), unmounted after."""
    where.mkdir(parents=True, exist_ok=True)
    _run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "driftwatch-fault", str(where))
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True)


@contextmanager
def read_only_bind(where: Path) -> Iterator[Path]:
    """where bind-mounted read-only over itself (writes then fail with EROFS), undone after."""
    _run("mount", "--bind", str(where), str(where))
    try:
        _run("mount", "-o", "remount,bind,ro", str(where))
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True)


def fill(directory: Path, name: str = "filler") -> Path:
    """Write into directory until the filesystem says ENOSPC; returns the filler file."""
    path = directory / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    return path

