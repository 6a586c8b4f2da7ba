"""`actfleet preflight`: check the project is ready for the fleet, one line a check with the command that fixes it.

    actfleet preflight [--config ...] [--json]

`deploy` runs it first and applies nothing when a check fails (docs/operations.md, "Preflight").
Exit codes: 0 every check passed (or was skipped), 1 a check failed, 2 bad configuration.
"""

from __future__ import annotations

import json

import click

from actfleet.cli import config_option, json_option
from actfleet.errors import ActfleetError


def run_checks(cfg, *, as_json: bool, echo=click.echo) -> list:
    from actfleet.infra import preflight

    outcomes = preflight.run(cfg)
    if not as_json:
        for line in preflight.lines(outcomes):
            echo(line)
    return outcomes


@click.command()
@config_option
@json_option
def preflight(config_path, as_json):
    """Check APIs, network, TPU quota, actAs and runtime before a first deploy."""
    from actfleet import config as config_mod
    from actfleet.infra.preflight import failed

    outcomes = run_checks(config_mod.load(config_path), as_json=as_json)
    if as_json:
        click.echo(json.dumps({"checks": [o.as_dict() for o in outcomes]}, indent=2, sort_keys=True))
    bad = failed(outcomes)
    if bad:
        raise ActfleetError(f"preflight: {len(bad)} check(s) failed: {', '.join(o.name for o in bad)}")
