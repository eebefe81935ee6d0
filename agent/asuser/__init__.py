"""Code that runs as the unit's user, in the app's own interpreter (never as root).

Stdlib only at module level: these files are bundled into ``python -B -c SOURCE`` by
agent/privileged/launch.py and run with the app's venv python, whose SQLAlchemy and driver are
the app's own. Everything here treats what it reads as the app's, and reports plain JSON.
"""
