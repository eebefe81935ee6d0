"""What the daemon serves (root): the HTTP endpoint, the metrics, the scrape cache, the D-Bus
signal watcher, and the worker process the inspections run in. Entry point: main.py."""
