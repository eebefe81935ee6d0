"""What agentctl does (root, an admin's terminal): read-only views of a unit (context, env,
check, status, plan), and exec/upgrade, which run the unit's command as its user apart from
root's terminal. Entry point: main.py."""
