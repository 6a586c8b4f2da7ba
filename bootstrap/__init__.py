"""bootstrap/: what a fresh TPU VM runs (startup.sh and the systemd units), shipped as package data.

Read it with importlib.resources (`actfleet.infra.startup_script`), never by a path relative to the source.
"""
