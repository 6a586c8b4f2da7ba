"""`actfleet release`: publish the pinned commit's release (wheelhouse, project wheel, uv, CPython) to the bucket.

    actfleet release [--repo PATH] [--wheelhouse DIR] [--python-archive FILE] [--config ...] [--json]

Once per commit: a release already published is left as it is (exit 0, "already published"). `deploy` runs it
between the base stack (which creates the bucket) and the fleet stack (whose VMs install from it).
Exit codes: 0 published or already there, 1 a step failed (pip, git, the upload), 2 bad input (a wheel missing
from the wheelhouse, a commit not in the checkout, a wrong CPython archive), 3 git or pip missing.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from actfleet.cli import config_option, json_option


def release_options(f):
    """The options `release` and `deploy` share: where the release's parts come from."""
    f = click.option(
        "--python-archive",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="The python-build-standalone archive of the pinned CPython for x86_64 Linux (install_only_stripped).",
    )(f)
    f = click.option(
        "--wheelhouse",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="A directory of wheels for the TPU VM (every locked package and uv); default: pip download them.",
    )(f)
    return click.option(
        "--repo",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="A git checkout holding repo.commit (default: the one around the current directory).",
    )(f)


def publish(cfg, repo, wheelhouse, python_archive):
    from actfleet.infra import release as rel

    return rel.release(cfg, repo, wheelhouse=wheelhouse, python_archive=python_archive)


def describe(result) -> str:
    if not result.published:
        return f"release {result.commit[:12]}: already published at {result.url}"
    return (
        f"release {result.commit[:12]}: published {result.files} files ({result.bytes / 1e6:,.1f} MB) to {result.url}"
    )


@click.command()
@config_option
@release_options
@json_option
def release(config_path, repo, wheelhouse, python_archive, as_json):
    """Publish what TPU VMs install (hashed wheelhouse, actfleet's wheel, uv, CPython) to the bucket, once."""
    from actfleet import config as config_mod

    result = publish(config_mod.load(config_path), repo, wheelhouse, python_archive)
    click.echo(json.dumps(result.as_dict(), indent=2, sort_keys=True) if as_json else describe(result))
