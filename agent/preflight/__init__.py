"""The migration-safety preflight: what each pending revision locks, for how long, what it breaks.

PostgreSQL only. probe.py gets each revision's offline SQL from the app's own Alembic (as the
unit's user); parse.py has it read by PostgreSQL's parser (pglast) in a confined child
(sqlchild.py: the unit's user or nobody, chrooted, bounded), where rules.py names the hazards
with squawk's rule names; root gets plain data back (analysis.py, validated by wire.py);
live.py reads table sizes and would-be blockers; risk.py weighs them into low / high /
critical per revision; plan.py puts it together for agentctl, /status and the metrics.
"""
