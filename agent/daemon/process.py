"""What the daemon and its inspection worker both do: log, tell discovery candidates, stop
the process groups they started. Kept apart from agent/daemon/main.py so the worker (a fresh
interpreter) loads none of the HTTP side (http.server, ssl, prometheus_client: ~8 MiB)."""

from __future__ import annotations

import fnmatch
import logging
import os
import signal
import sys
import importlib
from collections.abc import Callable
from typing import Any

from agent.config import Config
from agent.errors import ConfigError
from agent.secrets import mask_text

log = logging.getLogger("driftwatch")


# -- logging ------------------------------------------------------------------------------
class _Formatter(logging.Formatter):
    """One line per record, secrets masked; syslog priority prefix for journald."""

    PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                logging.CRITICAL: 2}

    def __init__(self, journald: bool) -> None:
        # journald stamps every line itself: a second timestamp is noise.
        super().__init__("%(name)s: %(message)s" if journald
                         else "%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        text = mask_text(super().format(record))
        if self.journald:
            # "<N>" is sd-daemon's SD_* prefix: journald turns it into the entry's priority.
            prio = self.PRIORITY.get(record.levelno, 6)
            return "\n".join(f"<{prio}>{line}" for line in text.splitlines())
        return text


def setup_logging(level: str) -> None:
    """Log to stderr; journald-friendly when JOURNAL_STREAM says stderr goes to the journal."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(journald=bool(os.environ.get("JOURNAL_STREAM"))))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def candidate_predicate(config: Config) -> Callable[[str], bool]:
    """Which newly appearing units could be picked up by discovery (-> full re-inspection)."""
    def is_candidate(name: str) -> bool:
        if not name.endswith(".service"):
            return False
        return config.discover_gunicorn or any(
            fnmatch.fnmatchcase(name, p) for p in config.unit_patterns)
    return is_candidate



def stop_children(grace: float = 2.0) -> int:
    """SIGTERM, then SIGKILL, every process group the agent started (probes run in their own
    session, so outside systemd nothing else would end them); returns how many."""
    import psutil

    try:
        children = psutil.Process().children()
    except psutil.Error:
        return 0
    groups = set()
    for child in children:
        try:
            groups.add(os.getpgid(child.pid))
        except OSError:
            continue
    groups.discard(os.getpgrp())
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pgid in groups:
            try:
                os.killpg(pgid, sig)
            except OSError:
                pass
        if sig == signal.SIGTERM:
            _, alive = psutil.wait_procs(children, timeout=grace)
            if not alive:
                break
    psutil.wait_procs(children, timeout=grace)
    for child in children:   # children outside a group of their own
        try:
            if child.is_running():
                child.kill()
        except psutil.Error:
            pass
    if groups:
        log.info("stopped %d probe process group(s)", len(groups))
    return len(groups)


# -- memory -------------------------------------------------------------------------------
def lean_worker_imports() -> None:
    """Before the inspection worker imports anything else: pystemd without its lxml-based
    introspection (agent/pystemd_lite.py), and hashlib with Python's built-in SHA-256 rather
    than OpenSSL's libcrypto (3.4 MiB of RSS; the worker hashes a few KiB of fingerprints per
    inspection and never speaks TLS). The same digests either way."""
    from agent.pystemd_lite import bare_pystemd

    bare_pystemd()
    if "hashlib" not in sys.modules:
        sys.modules.setdefault("_hashlib", None)   # type: ignore[arg-type]


def trim_heap() -> None:
    """Give the C heap's free pages back to the kernel (glibc malloc_trim): an inspection's
    peak (probe reports, pickled snapshots) is otherwise kept as RSS until the process ends."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None


# -- the inspector factory ----------------------------------------------------------------
class FactoryRef:
    """'module:callable', imported where it is called: in the worker, so the daemon serving
    HTTP never loads the inspector's libraries (SQLAlchemy, pystemd, psutil: ~30 MiB)."""

    def __init__(self, spec: str) -> None:
        self.spec = spec

    def resolve(self) -> Callable[[Config], Any]:
        """The callable itself (ConfigError when it cannot be imported)."""
        module_name, _, attr = self.spec.partition(":")
        try:
            return getattr(importlib.import_module(module_name), attr or "make_inspector")
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"cannot load inspector {self.spec!r}: {exc}") from None

    def __call__(self, config: Config) -> Any:
        return self.resolve()(config)
