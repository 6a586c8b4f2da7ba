"""What a synth reads besides the parsed config: the config file's own text and the `actfleet` command line.

Stdlib only. infra/stacks.py (the cdktf code), infra/synth_cache.py (which keys its cache on these values
and imports stacks.py only on a miss) and main.py (the cdktf CLI's entry point) all take them from here, so
the dependency runs one way: synth_cache -> stacks -> synth_inputs, never back.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from actfleet.config import Config


def config_text(config: Config) -> str | None:
    """The config file's own text (the base stack uploads it for the workers), or None for in-memory configs."""
    path = Path(config.source)
    return path.read_text() if config.source and path.is_file() else None


def actfleet_command() -> str:
    """How the fleet's provisioners run actfleet: the console script of the environment doing the synth.

    Recorded in the provisioner command, not in a worker's `input`, so moving the checkout never replaces
    a worker (provisioners are not part of the state)."""
    script = Path(sys.executable).parent / "actfleet"
    if script.exists():
        return shlex.quote(str(script))
    return f"{shlex.quote(sys.executable)} -c 'from actfleet.cli import main; main()'"
