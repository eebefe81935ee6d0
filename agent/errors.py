"""The small exception tree of driftwatch; the CLI catches only DriftwatchError."""

from __future__ import annotations


class DriftwatchError(Exception):
    """Base of every error driftwatch reports as one clear line."""

    exit_code = 2


class UnitNotFound(DriftwatchError):
    """systemd has no such unit."""


class BusUnavailable(DriftwatchError):
    """The systemd D-Bus API could not be reached."""


class AccessDenied(DriftwatchError):
    """The caller lacks the privilege the operation needs."""


class ConfigError(DriftwatchError):
    """The configuration file or a command-line option is invalid."""
