"""The migration-safety preflight: what each pending revision locks, for how long, what it breaks.

PostgreSQL only. probe.py gets each revision's offline SQL from the app's own Alembic (as the
unit's user); statements.py reads it with PostgreSQL's parser (pglast); rules.py names the
hazards with squawk's rule names; live.py reads table sizes and would-be blockers; risk.py
weighs them into low / high / critical per revision; plan.py puts it together for agentctl,
/status and the metrics.
"""
