"""`actfleet stats JOB|SHARDS`: a job's activation statistics, summed over its committed units exactly once.

JOB|SHARDS is a job's root (`gs://bucket/JOB`, `./store/JOB`), its shards directory, an `actfleet extract
--out` directory, or a job's name in the store fleet.toml (or --store) names. The statistics are those each
unit committed (worker/stats.py): no shard is read. Exit codes: 0 printed, 2 bad input (not a job, a unit
without statistics, a statistics object that fails its sha256).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from actfleet.cli import config_option, json_option
from actfleet.errors import InputError


@click.command()
@click.argument("where")
@click.option("--site", "sites", multiple=True, help="Only this capture site (repeatable; default: every site).")
@click.option("--store", "store_url", help="The store of a job named by WHERE (default: [job] store of fleet.toml).")
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write the per-dimension arrays ({site}.mean, {site}.variance, {site}.covariance) as safetensors.",
)
@config_option
@json_option
def stats(where, sites, store_url, out, config_path, as_json):
    """Mean, variance, mean (squared) norm and SAELens's norm scaling factor of each stored site.

    \b
    Summed from the statistics every committed unit carries (only the units whose done record lists them,
    so a unit re-done after a take-over counts once); no shard is read.
    """
    from actfleet.worker.reader import find_job, load_stats
    from actfleet.worker.stats import job_totals

    sites = list(sites) or None
    if store_url or (find_job(where) is None and not Path(where).exists() and "/" not in where):
        totals = _named_job(where, store_url, config_path, sites, job_totals)
    else:
        totals = load_stats(where, sites=sites)
    if out:
        totals.save(out)
    if as_json:
        click.echo(json.dumps(totals.to_json()))
        return
    _table(totals, out)


def _named_job(job, store_url, config_path, sites, job_totals):
    """WHERE as a job name in a store (fleet.toml's [job] store, or --store)."""
    from actfleet import work_queue as q
    from actfleet.worker.commands.jobs import _target

    t = _target(config_path, store_url, job)
    spec = q.read_job(t.store, t.job)
    return job_totals(t.store, t.job, spec.units, where=f"job {t.job} in {t.store.url}", sites=sites)


def _table(totals, out) -> None:
    from rich.console import Console
    from rich.table import Table

    if not totals.sites:
        raise InputError(f"{totals.where}: no unit is committed yet: no statistics to sum")
    console = Console()
    done = f"{totals.units_counted}/{totals.units_total} units"
    table = Table(title=f"{totals.where}: {done}", title_justify="left")
    table.add_column("site", no_wrap=True)  # site names are what people grep for: never cut
    for col in ("d", "tokens", "mean norm", "mean sq norm", "norm scale", "mean var"):
        table.add_column(col, justify="right")
    for site, s in totals.sites.items():
        m = s.summary()
        nsf = m["norm_scaling_factor"]
        table.add_row(
            site,
            str(m["d"]),
            f"{m['count']:,}",
            f"{m['mean_norm']:.5g}",
            f"{m['mean_sqnorm']:.5g}",
            "-" if nsf is None else f"{nsf:.5g}",
            f"{m['mean_variance']:.5g}",
        )
    console.print(table)
    if totals.units_counted != totals.units_total:
        click.echo(f"actfleet: warning: {done} done; these are the statistics of those", err=True)
    if out:
        click.echo(f"per-dimension mean and variance in {out}")
