"""The app-context probe: load the app in the unit's exact context, in a child process."""

from agent.probe.runner import (
    ProbeRequest,
    ProbeResult,
    fingerprint,
    run_probe,
)

__all__ = ["ProbeRequest", "ProbeResult", "fingerprint", "run_probe"]
