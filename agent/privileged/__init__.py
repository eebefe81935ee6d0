"""Code that runs as root in the agent: starts and bounds the unprivileged children.

It never connects to an app's database nor reads the app's files itself; it only parses
the bounded JSON its children (agent/asuser/) report.
"""
