"""The `actfleet` console script: one Click group whose commands live next to what they drive.

Commands are imported lazily (only the one being run), so `actfleet status` never pays for importing
JAX, torch or the cdktf provider bindings. Each entry below is "module:attribute".
"""

from __future__ import annotations

import importlib
import sys

import click

from actfleet.errors import ActfleetError

# name, "module:attribute", short help: one row a command, grouped by wing.
_TABLE = """
synth      actfleet.infra.commands.stacks:synth       Synthesize the base and fleet stacks to Terraform JSON (cached).
plan       actfleet.infra.commands.stacks:plan        Show what `deploy` would change (terraform plan).
deploy     actfleet.infra.commands.stacks:deploy      Create or update the stacks (terraform apply).
preflight  actfleet.infra.commands.preflight:preflight  Check the project is ready for a first deploy (APIs, quota, ...).
release    actfleet.infra.commands.release:release    Publish what TPU VMs install to the bucket (once per commit).
destroy    actfleet.infra.commands.stacks:destroy     Tear the stacks down (terraform destroy).
tpu        actfleet.infra.commands.tpu:tpu            Low-level TPU API calls (used by the fleet stack's provisioners).
reconcile  actfleet.infra.commands.reconcile:reconcile  Bring the fleet back to its desired state.
status     actfleet.infra.commands.status:status      Show every worker's state and the job's progress.

extract    actfleet.worker.commands.extract:extract   Extract activations from a local dataset to shards.
prepare    actfleet.worker.commands.jobs:prepare      Split a dataset into work units in the store.
work       actfleet.worker.commands.jobs:work         Claim units, extract, commit, until the job is done.
verify     actfleet.worker.commands.jobs:verify       Prove a job's output is complete and exactly-once.
export     actfleet.worker.commands.export:export     Write shards in a trainer's format (SAELens).
stats      actfleet.worker.commands.stats:stats       A job's activation statistics (mean, variance, norm scaling).

local      actfleet.demo.command:local                Run the whole system on this machine (the demo).
"""
COMMANDS: dict[str, tuple[str, str]] = {
    name: (target, help_text)
    for name, target, help_text in (line.split(None, 2) for line in _TABLE.strip().splitlines() if line.strip())
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        target, _ = COMMANDS[name]
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and (e.name == module_name or module_name.startswith(e.name + ".")):
                raise click.ClickException(f"command {name!r} is not available in this build ({module_name} missing)")
            raise
        return getattr(module, attr)

    def format_commands(self, ctx, formatter):
        # Short help without importing every module.
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="actfleet")
def cli():
    """actfleet: transformer activations at scale on spot Cloud TPUs.

    \b
    Exit codes: 0 success, 1 failure, 2 bad input (config, usage, files),
    3 missing prerequisite (terraform, node, a Python extra).
    """


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="actfleet", standalone_mode=False)
    except ActfleetError as e:
        click.echo(f"actfleet: {e}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("actfleet: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    sys.exit(0)


# ----------------------------------------------------------------------------------------------------
# Shared options for command modules
# ----------------------------------------------------------------------------------------------------


def config_option(f):
    """`--config PATH` (falls back to $ACTFLEET_CONFIG, then ./fleet.toml)."""
    return click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False),
        default=None,
        help="fleet.toml to use (default: $ACTFLEET_CONFIG, then ./fleet.toml).",
    )(f)


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout.")(f)
