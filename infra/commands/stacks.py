"""`actfleet synth | plan | deploy | destroy`: the two stacks without knowing cdktf exists.

    actfleet synth   [--stack base|fleet] [--force]   Terraform JSON for both stacks (cached; prints where)
    actfleet plan    [--stack base|fleet]             what deploy would change (default: both stacks)
    actfleet deploy  [--stack base|fleet] [--yes]     plan, confirm, apply (default: base, then fleet)
    actfleet destroy [--stack base|fleet] [--yes]     plan -destroy, confirm, apply (default: fleet only:
                                                      the base stack holds the data and is destroyed only
                                                      when named)

deploy and destroy apply exactly the plan that was shown (a saved plan file), ask before applying unless
--yes, and refuse to guess without a terminal. All take --config and --json.
Exit codes: 0 done (or nothing to change), 1 terraform failed (its error summary on one line) or the
confirmation was declined, 2 bad configuration or usage, 3 terraform missing.
"""

from __future__ import annotations

import json
import sys

import click

from actfleet.cli import config_option, json_option
from actfleet.errors import ActfleetError, InputError
from actfleet.infra.commands.release import describe, publish, release_options
from actfleet.infra.terraform_layout import FLEET, STACK_NAMES

STACK_CHOICE = click.Choice(STACK_NAMES)


def _stack_option(help_text: str):
    return click.option("--stack", "stack_name", type=STACK_CHOICE, default=None, help=help_text)


def _yes_option(f):
    return click.option("--yes", "-y", is_flag=True, help="Apply without asking (for scripts and CI).")(f)


def _load(config_path):
    from actfleet import config as config_mod

    return config_mod.load(config_path)


def _load_for_terraform(config_path):
    """The config, once terraform is known to be there (exit 3 now, not after a 20 s synth) and the stacks
    are synthesized under the spinner (each stack then comes from the cache)."""
    from actfleet.infra.terraform import terraform_binary

    cfg = _load(config_path)
    terraform_binary()
    _synth(cfg)
    return cfg


def _synth(cfg, *, force: bool = False):
    """The cached synth, with a spinner on a terminal while a cold one imports cdktf (~20 s)."""
    from rich.console import Console

    from actfleet.infra.synth_cache import synth

    with Console(stderr=True).status("synthesizing the stacks (cdktf; cached after the first time)..."):
        return synth(cfg, force=force)


def _stack(cfg, name: str, *, stream: bool):
    from actfleet.infra.terraform import stack

    return stack(cfg, name, stream=stream)


def _emit_json(payload: dict) -> None:
    click.echo(json.dumps(payload, indent=2, sort_keys=True))


# ----------------------------------------------------------------------------------------------------


@click.command()
@config_option
@_stack_option("Print only this stack's directory (both are always synthesized together).")
@click.option("--force", is_flag=True, help="Synthesize again even when the cache has this config.")
@json_option
def synth(config_path, stack_name, force, as_json):
    """Synthesize the base and fleet stacks to Terraform JSON (cached by config, bootstrap and infra code)."""
    cfg = _load(config_path)
    result = _synth(cfg, force=force)
    names = [stack_name] if stack_name else STACK_NAMES
    dirs = {name: str(result.stack_dir(name)) for name in names}
    if as_json:
        _emit_json(
            {
                "key": result.key,
                "cached": result.cached,
                "seconds": round(result.seconds, 3),
                "mode": cfg.fleet.mode,
                "workers": len(cfg.fleet.workers),
                "stacks": dirs,
            }
        )
        return
    how = "from the cache" if result.cached else f"in {result.seconds:.1f} s"
    click.echo(f"synthesized {how} ({len(cfg.fleet.workers)} workers, mode {cfg.fleet.mode}):")
    for name, path in dirs.items():
        click.echo(f"  {name:5}  {path}/cdk.tf.json")


@click.command()
@config_option
@_stack_option("Plan only this stack (default: both).")
@json_option
def plan(config_path, stack_name, as_json):
    """Show what `deploy` would change (terraform plan), per stack."""
    cfg = _load_for_terraform(config_path)
    summaries = {}
    for name in [stack_name] if stack_name else STACK_NAMES:
        tf = _stack(cfg, name, stream=False)
        result = tf.plan()
        try:
            summaries[name] = result.as_dict()
            if not as_json:
                click.echo(f"== {name} stack ==")
                click.echo(tf.show_text(result.plan_file) if result.changes else "No changes.")
        finally:
            tf.discard(result)
    if as_json:
        _emit_json({"stacks": summaries})


@click.command()
@config_option
@_stack_option("Deploy only this stack (default: base, then fleet).")
@_yes_option
@release_options
@click.option("--skip-preflight", is_flag=True, help="Do not run `actfleet preflight` first.")
@json_option
def deploy(config_path, stack_name, yes, repo, wheelhouse, python_archive, skip_preflight, as_json):
    """Create or update the stacks (terraform apply of the plan shown); the release is published before the fleet."""
    if not skip_preflight:
        _preflight(config_path, as_json)
    # The fleet's VMs install from the release, which lives in the bucket the base stack creates: publish between.
    release_args = (repo, wheelhouse, python_archive)
    _apply_stacks(
        config_path,
        [stack_name] if stack_name else STACK_NAMES,
        destroy=False,
        yes=yes,
        as_json=as_json,
        release_args=release_args,
    )


@click.command()
@config_option
@_stack_option("Destroy this stack (default: fleet only; the base stack holds the data).")
@_yes_option
@json_option
def destroy(config_path, stack_name, yes, as_json):
    """Tear a stack down (default: the fleet; `--stack base` also deletes the bucket and account)."""
    _apply_stacks(config_path, [stack_name or FLEET], destroy=True, yes=yes, as_json=as_json)


def _preflight(config_path, as_json: bool) -> None:
    """deploy's first step: nothing is planned or applied while a check fails (the checks print on stderr)."""
    from actfleet.infra.commands.preflight import run_checks
    from actfleet.infra.preflight import failed

    bad = failed(run_checks(_load(config_path), as_json=as_json, echo=lambda line: click.echo(line, err=True)))
    if bad:
        raise ActfleetError(
            f"preflight: {len(bad)} check(s) failed ({', '.join(o.name for o in bad)}): nothing applied; "
            f"fix them (the commands above) or pass --skip-preflight"
        )


def _apply_stacks(config_path, names, *, destroy: bool, yes: bool, as_json: bool, release_args=None) -> None:
    """deploy and destroy: each stack in turn planned, shown, confirmed and applied; --json: one document.
    With release_args (deploy), the commit's release is published before the fleet stack is applied."""
    cfg = _load_for_terraform(config_path)
    results, extra = {}, {}
    for name in names:
        if name == FLEET and release_args is not None:
            published = publish(cfg, *release_args)
            extra["release"] = published.as_dict()
            if not as_json:
                click.echo(describe(published))
        results[name] = _plan_confirm_apply(cfg, name, destroy=destroy, yes=yes, as_json=as_json)
    if as_json:
        _emit_json({"stacks": results, **extra})


def _plan_confirm_apply(cfg, name: str, *, destroy: bool, yes: bool, as_json: bool) -> dict:
    verb = "destroy" if destroy else "deploy"
    tf = _stack(cfg, name, stream=False)
    planned = tf.plan(destroy=destroy)
    try:
        return _confirm_apply(tf, name, planned, verb, yes=yes, as_json=as_json)
    finally:
        tf.discard(planned)


def _confirm_apply(tf, name: str, planned, verb: str, *, yes: bool, as_json: bool) -> dict:
    summary = planned.as_dict()
    if not planned.changes:
        if not as_json:
            click.echo(f"{name} stack: no changes.")
        return {**summary, "applied": False}
    if not as_json:
        click.echo(tf.show_text(planned.plan_file))
    if not yes:
        if not sys.stdin.isatty():
            raise InputError(f"{verb} of the {name} stack needs a confirmation: run it in a terminal or pass --yes")
        question = (
            f"{verb} the {name} stack: {planned.add} to add, {planned.change} to change, {planned.destroy} to destroy?"
        )
        if not click.confirm(question, default=False, err=True):
            raise ActfleetError(f"{verb} of the {name} stack declined: nothing applied")
    tf.stream = not as_json  # people watch the apply's progress line by line (on stderr)
    tf.apply(plan_file=planned.plan_file)
    if not as_json:
        click.echo(
            f"{name} stack: {verb} done ({planned.add} added, {planned.change} changed, {planned.destroy} destroyed)."
        )
    return {**summary, "applied": True}
