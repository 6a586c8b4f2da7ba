"""`actfleet export saelens SHARDS OUT`: shards in a trainer's format (docs/research.md).

SHARDS is what the reader takes (actfleet.worker.reader.open_source): a directory or file of shards, a
gs:// prefix, or a job's root in a store (`gs://bucket/JOB`, `./store/JOB`: the committed shards only).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import click

from actfleet.cli import json_option
from actfleet.errors import DiskFull, PrerequisiteError, disk_full_is_fatal


@click.group()
def export():
    """Write shards in a trainer's format."""


@export.command()
@click.argument("shards")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--site", required=True, help="Capture site to export, e.g. blocks.6.hook_resid_post.")
@click.option(
    "--context-size",
    type=click.IntRange(min=1),
    default=None,
    help="Tokens per row (SAELens context_size). Default: the job's --context-size, from the shards.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the global shuffle of the rows.")
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16"]),
    default="float32",
    show_default=True,
    help="Activation dtype (Arrow has no bfloat16; float32 holds bfloat16 exactly).",
)
@click.option(
    "--model-class",
    type=click.Choice(["transformer_lens", "hf"]),
    default="transformer_lens",
    show_default=True,
    help="How SAELens will load the model, which decides the column (its hook_name): transformer_lens "
    '(model_class_name="HookedTransformer", a hub model TransformerLens knows: the site name) or hf '
    '("AutoModelForCausalLM", any local or hub model: the module whose output is the site, e.g. model.layers.6).',
)
@click.option(
    "--hook-name",
    default=None,
    help="Column name, overriding --model-class's (any module name SAELens should hook).",
)
@click.option(
    "--chunk-mb",
    type=click.FloatRange(min=1),
    default=512,
    show_default=True,
    help="MiB per output Arrow file (also the most the shuffle holds in memory at once).",
)
@json_option
def saelens(shards, out, site, context_size, seed, dtype, model_class, hook_name, chunk_mb, as_json):
    """Write a `datasets` directory SAELens trains from (use_cached_activations, cached_activations_path=OUT).

    \b
    One row per window of --context-size consecutive stored tokens of one sample: a column named after
    the hook, Array2D(context_size, d_in), and token_ids. Rows are shuffled by --seed; partial windows
    are dropped and counted.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from actfleet.worker.export import export_saelens
    from actfleet.worker.saelens_names import MODEL_CLASSES

    try:
        import datasets  # noqa: F401
    except ImportError:
        raise PrerequisiteError("export saelens needs the `datasets` package (pip install datasets)") from None
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=as_json,
        transient=True,
    )
    tasks: dict[str, object] = {}

    def on_progress(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = progress.add_task(
                {"index": "index ", "read": "shards", "write": "write "}[stage], total=total
            )
        progress.update(tasks[stage], completed=done)

    fresh = not Path(out).exists()
    try:
        with progress, disk_full_is_fatal("exporting to", out):
            summary = export_saelens(
                shards,
                out,
                site=site,
                context_size=context_size,
                seed=seed,
                dtype=dtype,
                column=hook_name,
                model_class=model_class,
                chunk_mb=chunk_mb,
                on_progress=on_progress,
            )
    except DiskFull:
        if fresh:  # a partial export is of no use and holds the space: remove what this run wrote
            shutil.rmtree(out, ignore_errors=True)
        raise
    if summary.units_total is not None and summary.units_done != summary.units_total:
        click.echo(
            f"actfleet: warning: the job has {summary.units_done} of {summary.units_total} units done; exported those",
            err=True,
        )
    if summary.stats_missing:
        click.echo(f"actfleet: warning: no statistics written: {summary.stats_missing}", err=True)
    if as_json:
        click.echo(json.dumps(summary.to_json()))
        return
    click.echo(
        f"{summary.windows:,} rows of {summary.context_size} tokens x {summary.d_in} ({summary.dtype}) "
        f"in {summary.files} files in {out}; {summary.tokens_dropped:,} of {summary.tokens:,} tokens dropped "
        f"(partial windows; {summary.samples_short:,} samples shorter than a window)"
    )
    click.echo(
        f"SAELens: LanguageModelSAERunnerConfig(model_class_name={MODEL_CLASSES[model_class]!r}, "
        f"use_cached_activations=True, cached_activations_path={str(out)!r}, hook_name={summary.column!r}, "
        f"context_size={summary.context_size}, sae=...(d_in={summary.d_in}, ...)) (docs/research.md, step 4)"
    )
    if summary.stats:
        click.echo(
            f"statistics ({summary.stats['count']:,} tokens): norm scaling factor "
            f"{summary.stats['norm_scaling_factor']:.6g} (sqrt(d_in) / mean norm), mean and variance per "
            f"dimension in {out}/actfleet-stats.safetensors"
        )
