"""What runs as root: systemd over D-Bus, the unit's env files read the way systemd reads them,
the journal, /proc, the agent's own state; the inspector that walks the runbook; and the
launchers that start and bound the unprivileged children (agent/asuser/).

Root never connects to an app's database, never imports the app, and never follows a path the
app's user controls into a file of its own: the children do that as the unit's user and report
bounded JSON, which root validates (sources/, alembic_env.py).
"""
