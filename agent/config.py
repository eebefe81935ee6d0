"""TOML configuration of the agent -> a frozen Config; every mistake is one clear ConfigError."""

from __future__ import annotations

import argparse
import difflib
import ipaddress
import math
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from agent.errors import ConfigError

DEFAULT_CONFIG_PATH = "/etc/driftwatch/agent.toml"
LOG_LEVELS = ("debug", "info", "warning", "error")
# 30 days: longer than any sane interval or timeout; beyond it a typo (1e12) is likelier.
MAX_SECONDS = 30 * 86400.0
# The durations in [agent]; only the interval may be 0 (inspect on every scrape).
SECONDS_KEYS = ("min_interval_seconds", "probe_timeout_seconds", "db_timeout_seconds",
                "journal_window_seconds", "scrape_wait_seconds", "request_timeout_seconds")


@dataclass(frozen=True)
class TLSConfig:
    """HTTPS for the metrics endpoint; client_ca_file turns on client-certificate checks."""

    cert_file: str = ""
    key_file: str = ""
    client_ca_file: str = ""

    @property
    def enabled(self) -> bool:
        """True when the server must speak TLS."""
        return bool(self.cert_file)


@dataclass(frozen=True)
class Config:
    """Everything the agent reads from agent.toml (flags may override some of it)."""

    units: tuple[str, ...] = ()   # empty: gunicorn.service if it exists, plus discovery
    unit_patterns: tuple[str, ...] = ()
    discover_gunicorn: bool = True
    listen_address: str = ":9410"
    min_interval_seconds: float = 30.0
    probe_timeout_seconds: float = 20.0
    db_timeout_seconds: float = 5.0       # connect, statement and lock timeout
    journal_window_seconds: float = 3600.0
    state_dir: str = "/var/lib/driftwatch"
    log_level: str = "info"
    scrape_wait_seconds: float = 4.0      # a scrape waits no longer on an inspection
    max_connections: int = 64             # open HTTP connections at once
    request_timeout_seconds: float = 10.0  # a whole HTTP request, headers to last byte
    # Units without User=: the probe runs as this user ("" = a systemd dynamic user).
    probe_user: str = ""
    probe_memory_max_mb: int = 512         # the probe's MemoryMax= (transient unit)
    tls: TLSConfig = field(default_factory=TLSConfig)
    source: str = ""                      # the file this came from, "" for built-in defaults
    # agentctl upgrade (its flags override these): lock_timeout of the migration's sessions,
    # attempts after one gave up waiting for a lock, and the whole run's bound.
    upgrade_lock_timeout_seconds: float = 5.0
    upgrade_lock_retries: int = 3
    upgrade_timeout_seconds: float = 600.0

    def with_overrides(self, **changes: Any) -> Config:
        """A copy with command-line overrides applied and validated."""
        changes = {k: v for k, v in changes.items() if v is not None}
        new = replace(self, **changes)
        _validate(new, new.source or "command line")
        return new


# key -> (accepted python types, description for the error message)
_AGENT_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "units": ((list,), "a list of strings"),
    "unit_patterns": ((list,), "a list of strings"),
    "discover_gunicorn": ((bool,), "true or false"),
    "listen_address": ((str,), "a string such as \":9410\""),
    "min_interval_seconds": ((int, float), "a number"),
    "probe_timeout_seconds": ((int, float), "a number"),
    "db_timeout_seconds": ((int, float), "a number"),
    "journal_window_seconds": ((int, float), "a number"),
    "state_dir": ((str,), "a string"),
    "log_level": ((str,), "one of " + ", ".join(LOG_LEVELS)),
    "scrape_wait_seconds": ((int, float), "a number"),
    "max_connections": ((int,), "an integer"),
    "request_timeout_seconds": ((int, float), "a number"),
    "upgrade_lock_timeout_seconds": ((int, float), "a number"),
    "upgrade_lock_retries": ((int,), "a whole number"),
    "upgrade_timeout_seconds": ((int, float), "a number"),
    "probe_user": ((str,), "a user name (not root)"),
    "probe_memory_max_mb": ((int,), "a whole number of MiB"),
}
_TLS_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "cert_file": ((str,), "a string (path)"),
    "key_file": ((str,), "a string (path)"),
    "client_ca_file": ((str,), "a string (path)"),
}
_TABLES = {"agent": _AGENT_KEYS, "tls": _TLS_KEYS}


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _check_table(name: str, table: Any, spec: dict[str, tuple[tuple[type, ...], str]],
                 where: str) -> dict[str, Any]:
    """Reject unknown keys and wrong types in one [table]."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: [{name}] must be a table")
    for key, value in table.items():
        if key not in spec:
            raise ConfigError(f"{where}: unknown key '{key}' in [{name}]"
                              f"{_did_you_mean(key, list(spec))}")
        types, described = spec[key]
        # bool is an int subclass in Python: `min_interval_seconds = true` must still fail.
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            raise ConfigError(f"{where}: '{key}' in [{name}] must be {described}, "
                              f"not {type(value).__name__} {value!r}")
        if list in types and not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{where}: '{key}' in [{name}] must be {described}")
    return table


def parse_listen_address(text: str) -> tuple[str, int]:
    """':9410' -> ('', 9410) (all interfaces); '127.0.0.1:9410'; '[::1]:9410' -> ('::1', 9410)."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"invalid listen address {text!r}: expected [HOST]:PORT, "
                         "e.g. ':9410', '127.0.0.1:9410' or '[::1]:9410'")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"invalid listen address {text!r}: {host!r} is not an IPv6 "
                             "address") from None
    elif ":" in host:
        raise ValueError(f"invalid listen address {text!r}: put IPv6 addresses in brackets, "
                         "e.g. '[::1]:9410'")
    return host, int(port_text)


def seconds_problem(value: object, zero_ok: bool = False) -> str:
    """'' for a usable duration, else what is wrong with it (nan, inf, negative, huge)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"must be a number of seconds, not {type(value).__name__} {value!r}"
    # nan compares false with everything: without this a nan interval froze the snapshot
    # and an inf timeout disabled the probe kill (#8).
    if not math.isfinite(value):
        return f"must be a finite number of seconds, not {value!r}"
    if value < 0 or (value == 0 and not zero_ok):
        return "must be positive" if not zero_ok else "must not be negative"
    if value > MAX_SECONDS:
        return f"must be at most {MAX_SECONDS:.0f} seconds (30 days), not {value!r}"
    return ""


def seconds_argument(text: str) -> float:
    """argparse type for --probe-timeout and friends: a positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    problem = seconds_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(f"{text!r}: {problem}")
    return value


def _validate(config: Config, where: str) -> None:
    """Checks on values (not types): ranges, address syntax, TLS completeness."""
    try:
        parse_listen_address(config.listen_address)
    except ValueError as exc:
        raise ConfigError(f"{where}: 'listen_address': {exc}") from None
    for name in SECONDS_KEYS:
        problem = seconds_problem(getattr(config, name), zero_ok=name == "min_interval_seconds")
        if problem:
            raise ConfigError(f"{where}: '{name}' {problem}")
    if config.max_connections <= 0:
        raise ConfigError(f"{where}: 'max_connections' must be positive")
    if config.probe_memory_max_mb < 64:
        raise ConfigError(f"{where}: 'probe_memory_max_mb' must be at least 64")
    if config.probe_user in ("root", "0"):
        raise ConfigError(f"{where}: 'probe_user' must not be root: app code never runs as root")
    if not config.state_dir.startswith("/"):
        # Relative to what? The daemon's cwd is / under systemd, a shell's anywhere else.
        raise ConfigError(f"{where}: 'state_dir' must be an absolute path, "
                          f"not {config.state_dir!r}")
    if config.log_level not in LOG_LEVELS:
        raise ConfigError(f"{where}: 'log_level' must be one of {', '.join(LOG_LEVELS)}, "
                          f"not {config.log_level!r}")
    _validate_upgrade(config, where)
    tls = config.tls
    if bool(tls.cert_file) != bool(tls.key_file):
        raise ConfigError(f"{where}: [tls] needs both 'cert_file' and 'key_file'")
    if tls.client_ca_file and not tls.cert_file:
        raise ConfigError(f"{where}: [tls] 'client_ca_file' needs 'cert_file' and 'key_file'")


def _validate_upgrade(config: Config, where: str) -> None:
    """agentctl upgrade's bounds: finite and positive seconds, 0..100 retries."""
    for name in ("upgrade_lock_timeout_seconds", "upgrade_timeout_seconds"):
        value = getattr(config, name)
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{where}: '{name}' must be a finite number above 0, "
                              f"not {value!r}")
    if not 0 <= config.upgrade_lock_retries <= 100:
        raise ConfigError(f"{where}: 'upgrade_lock_retries' must be between 0 and 100, "
                          f"not {config.upgrade_lock_retries!r}")


def parse_config(text: str, where: str = "<config>") -> Config:
    """Pure: TOML text -> validated Config; WHERE names the file in errors."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    for key in data:
        if key not in _TABLES:
            raise ConfigError(f"{where}: unknown table or key '{key}' at top level"
                              f"{_did_you_mean(key, list(_TABLES))}; "
                              "expected [agent] and optionally [tls]")
    agent = _check_table("agent", data.get("agent", {}), _AGENT_KEYS, where)
    tls = _check_table("tls", data.get("tls", {}), _TLS_KEYS, where)
    values: dict[str, Any] = {}
    for f in fields(Config):
        if f.name in agent:
            value = agent[f.name]
            values[f.name] = tuple(value) if isinstance(value, list) else value
    if "log_level" in values:
        values["log_level"] = values["log_level"].lower()
    config = Config(**values, tls=TLSConfig(**tls), source=where)
    _validate(config, where)
    return config


def load_config(path: str | None = None) -> Config:
    """Read PATH (default /etc/driftwatch/agent.toml; a missing default file means defaults)."""
    explicit = path is not None
    file = Path(path if explicit else DEFAULT_CONFIG_PATH)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{file}: config file not found") from None
        return Config()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file}: cannot read config file: {exc}") from None
    return parse_config(text, str(file))
