"""The `screening` command: local operations on the database and registry, the local stack,
and (in `remote.py`) the commands that talk to the running services through the client."""
