"""`actfleet extract`: one machine, one local dataset -> activation shards and summary.json in a directory.

Rows are processed in consecutive blocks of --unit-rows, each block one `Engine.run` call and its own shard
sequence (unit u, parts 0..), exactly as a fleet job with the same unit_rows would: the same rows give the
same bits either way. Shards are written by a background thread (bounded queue) while the next batch computes.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
from collections import Counter
from pathlib import Path

import click

from actfleet import sites as site_names
from actfleet.cli import json_option
from actfleet.errors import InputError
from actfleet.job_options import DEFAULT_UNIT_ROWS, DEFAULTS, DTYPES, FORMATS, LONG_INPUTS, POSITIONS, JobOptions

SUMMARY = "summary.json"


class _FileWriter:
    """Writes Shards into a directory from a thread, atomically, recording size, sha256 and tokens."""

    def __init__(self, out: Path, depth: int = 2):
        self.out, self.shards, self.error = out, [], None
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._t = threading.Thread(target=self._loop, name="shard-writer", daemon=True)
        self._t.start()

    def __call__(self, shard) -> None:
        if self.error:
            raise self.error
        self._q.put(shard)

    def _loop(self) -> None:
        while (shard := self._q.get()) is not None:
            name, blob = shard.name, shard.data
            try:
                tmp = self.out / f".{name}.tmp"
                tmp.write_bytes(blob)
                tmp.replace(self.out / name)
                self.shards.append({"name": name, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(),
                                    "tokens": shard.tokens})
            except Exception as e:  # surfaced on the next put / at close
                self.error = e

    def close(self) -> None:
        self._q.put(None)
        self._t.join()
        if self.error:
            raise self.error


@click.command()
@click.option("--model", required=True, help="Model: a local dir, a gs:// prefix or a hub id (HF format, safetensors).")
@click.option("--revision", default=DEFAULTS.revision, show_default=True, help="Hub revision (commit) of the model.")
@click.option("--input", "input_path", required=True, help="Dataset: .jsonl, .parquet or .csv (local or gs://).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Directory for shards and summary.json.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=DEFAULTS.format, show_default=True)
@click.option("--text-field", default=DEFAULTS.text_field, show_default=True, help="Field holding the text (format text).")
@click.option("--messages-field", default=DEFAULTS.messages_field, show_default=True, help="Field holding chat messages.")
@click.option("--arc-augmentations", type=click.IntRange(min=0), default=DEFAULTS.arc_augmentations, show_default=True,
              help="Augmented copies per ARC task (flips/rotations, colours, train order).")
@click.option("--arc-seed", type=int, default=DEFAULTS.arc_seed, show_default=True)
@click.option("--sites", default="resid_post", show_default=True,
              help="Site kinds (" + ", ".join(site_names.KINDS) + ") or names like blocks.6.hook_resid_post, comma-separated.")
@click.option("--layers", default="all", show_default=True, help='Layers for the site kinds: "0,5,11" or "all".')
@click.option("--positions", type=click.Choice(POSITIONS), default=DEFAULTS.positions, show_default=True)
@click.option("--compute-dtype", type=click.Choice(DTYPES), default=DEFAULTS.compute_dtype, show_default=True)
@click.option("--store-dtype", type=click.Choice(DTYPES), default=DEFAULTS.store_dtype, show_default=True)
@click.option("--max-seq", type=click.IntRange(min=0), default=DEFAULTS.max_seq, show_default=True, help="Longest input in tokens (0 = the model's context).")
@click.option("--long-inputs", type=click.Choice(LONG_INPUTS), default=DEFAULTS.long_inputs, show_default=True,
              help="What to do with inputs longer than --max-seq (counted in summary.json).")
@click.option("--batch-tokens", type=click.IntRange(min=1), default=DEFAULTS.batch_tokens, show_default=True, help="Tokens per device batch.")
@click.option("--shard-mb", type=click.FloatRange(min=0.001), default=DEFAULTS.shard_mb, show_default=True)
@click.option("--model-parallel", type=click.IntRange(min=1), default=DEFAULTS.model_parallel, show_default=True,
              help="Devices that split one copy of the model (attention heads and MLP); must divide the device "
                   "count, the heads and the MLP size.")
@click.option("--unit-rows", type=click.IntRange(min=1), default=DEFAULT_UNIT_ROWS, show_default=True,
              help="Rows per engine run (same as a fleet job's unit_rows: same rows, same bits).")
@click.option("--overwrite", is_flag=True, help="Replace shards already in --out.")
@json_option
def extract(model, revision, input_path, out_dir, fmt, text_field, messages_field, arc_augmentations, arc_seed, sites,
            layers, positions, compute_dtype, store_dtype, max_seq, long_inputs, batch_tokens, shard_mb, model_parallel,
            unit_rows, overwrite, as_json):
    """Extract activations from a local dataset to safetensors shards in --out."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from actfleet.worker import inputs, model_files

    sites = site_names.from_flags(sites, layers)
    inputs.local_file(input_path)  # fail on a missing dataset or model before the slow imports
    model_files.resolve(model, revision=revision)

    from actfleet.worker.engine import Engine
    from actfleet.worker.shards import ShardWriter
    out = Path(out_dir)
    if out.exists() and any(out.glob("*.safetensors")):
        if not overwrite:
            raise InputError(f"--out {out}: already holds shards (pass --overwrite to replace them)")
        for f in list(out.glob("*.safetensors")) + [out / SUMMARY]:
            f.unlink(missing_ok=True)
    try:
        options = JobOptions(model=model, revision=revision, format=fmt, text_field=text_field,
                             messages_field=messages_field, arc_augmentations=arc_augmentations, arc_seed=arc_seed,
                             sites=sites, positions=positions, max_seq=max_seq, long_inputs=long_inputs,
                             batch_tokens=batch_tokens, compute_dtype=compute_dtype, store_dtype=store_dtype,
                             shard_mb=shard_mb, model_parallel=model_parallel)
    except ValueError as e:
        raise InputError(str(e)) from None
    engine = Engine(options)
    from actfleet.worker import pinning
    from actfleet.worker.engine_extractor import shard_metadata

    # What made the rows, in every shard (hashes every model file once: seconds for a 1 GB model).
    meta = shard_metadata(options, engine, pinning.model_pin(engine.model_dir).to_json())
    total = inputs.count_rows(input_path, **options.input_options())
    out.mkdir(parents=True, exist_ok=True)

    writer = _FileWriter(out)
    stats = Counter()
    skipped: dict[str, list[int]] = {}
    started = time.perf_counter()
    console = Console(stderr=True)
    progress = Progress(TextColumn("extract"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
                        TextColumn("{task.fields[tokens]} tokens, {task.fields[rate]} tok/s"), TimeElapsedColumn(),
                        console=console, disable=as_json, transient=False)
    with progress:
        bar = progress.add_task("rows", total=total, tokens=0, rate="-")
        for unit, start in enumerate(range(0, total, unit_rows)):
            rows = inputs.read_rows(input_path, tokenizer=engine.tokenizer, start=start,
                                    stop=min(total, start + unit_rows), **options.input_options())
            shards = ShardWriter(shard_mb=shard_mb, model=model, revision=revision, job="extract", unit=unit,
                                 sites=engine.sites, store_dtype=store_dtype, random_weights=engine.random_weights,
                                 on_shard=writer, extra_metadata=meta)
            for batch in engine.run(rows):
                shards.add(batch)
                stats.update(rows=batch.rows, stored_tokens=batch.stored_tokens, computed_tokens=batch.computed_tokens,
                             padded_tokens=batch.padded_tokens, truncated=batch.truncated)
                for sid, reason in batch.skipped.items():
                    skipped.setdefault(reason, []).append(sid)
                rate = stats["stored_tokens"] / max(1e-9, time.perf_counter() - started)
                progress.update(bar, advance=batch.rows, tokens=stats["stored_tokens"], rate=f"{rate:,.0f}")
            shards.close()
    writer.close()
    seconds = time.perf_counter() - started

    summary = {
        "model": model, "revision": revision, "random_weights": engine.random_weights, "input": str(input_path),
        "input_sha256": inputs.fingerprint(input_path), "format": fmt, "sites": list(engine.sites),
        "positions": positions, "compute_dtype": compute_dtype, "store_dtype": store_dtype,
        "max_seq": engine.max_seq, "long_inputs": long_inputs, "unit_rows": unit_rows,
        "rows": total, "rows_stored": stats["rows"] - sum(len(v) for v in skipped.values()),
        "stored_tokens": stats["stored_tokens"], "computed_tokens": stats["computed_tokens"],
        "padded_tokens": stats["padded_tokens"],
        "padding_fraction": round(stats["padded_tokens"] / stats["computed_tokens"], 6) if stats["computed_tokens"] else 0.0,
        "truncated": stats["truncated"],
        "skipped": {reason: len(ids) for reason, ids in sorted(skipped.items())},
        "skipped_samples": {reason: sorted(ids)[:100] for reason, ids in sorted(skipped.items())},
        "seconds": round(seconds, 3), "tokens_per_second": round(stats["stored_tokens"] / seconds, 1) if seconds else 0,
        "shards": sorted(writer.shards, key=lambda s: s["name"]),
    }
    (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    if as_json:
        click.echo(json.dumps(summary))
    else:
        skipped_text = ", ".join(f"{n} {r}" for r, n in summary["skipped"].items()) or "none"
        click.echo(f"{total} rows -> {summary['stored_tokens']} tokens in {len(summary['shards'])} shards in {out} "
                   f"({summary['tokens_per_second']:,.0f} tok/s, padding {summary['padding_fraction']:.1%}); "
                   f"skipped: {skipped_text}; truncated: {summary['truncated']}")
