"""The I/O edges: each returns plain data."""
