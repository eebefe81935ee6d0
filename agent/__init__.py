"""driftwatch: a systemd-aware agent that watches Flask/gunicorn apps for migration drift."""

__version__ = "0.1.0"
