"""Checks: one module per check; each returns findings and never raises to the caller."""
