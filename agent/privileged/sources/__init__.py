"""Root's I/O edges: each reads one thing (D-Bus, env files, /proc, the journal, sockets) and
returns plain data; database reads go through the child of privileged/dbclient.py."""
