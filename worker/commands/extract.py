"""`actfleet extract`: one machine, one dataset -> activation shards and summary.json in a directory.

Rows are processed in consecutive blocks of --unit-rows, each block one `Engine.run` call and its own shard
sequence (unit u, parts 0..), exactly as a fleet job with the same unit_rows would: the same rows give the
same bits either way. Shards are written by a background thread (bounded queue) while the next batch computes.

Resuming: after a unit's shards are written, a record of the unit (its rows, skips, counters and shards) is
written to `.extract/` in --out; `.extract/run.json` holds what the run reads and how. A rerun with the same
input and options (after Ctrl-C, a crash, a lost machine) keeps the recorded units, deletes the shards of
any unit without a record (it was cut short), and continues; summary.json is made from the unit records.
A rerun with other options is refused; --overwrite starts over.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
from collections import Counter
from functools import partial
from pathlib import Path

import click

from actfleet import sites as site_names
from actfleet.cli import json_option
from actfleet.errors import InputError
from actfleet.job_options import DEFAULT_UNIT_ROWS, DEFAULTS, DTYPES, FORMATS, LONG_INPUTS, POSITIONS, JobOptions
from actfleet.worker.commands.flags import POSITIONS_HELP, SHARD_MB_HELP, reading_options

SUMMARY = "summary.json"
STATE = ".extract"  # run.json and one record per finished unit (resuming)


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

    def after_written(self, fn) -> None:
        """Run fn(shards written so far) on the writer thread once every shard queued before it is written."""
        if self.error:
            raise self.error
        self._q.put(fn)

    def _loop(self) -> None:
        while (shard := self._q.get()) is not None:
            if callable(shard):
                try:
                    shard(list(self.shards))
                except Exception as e:
                    self.error = e
                continue
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
@click.option("--input", "input_path", required=True,
              help="Dataset: a file (.jsonl[.gz|.zst], .parquet, .csv, .arrow; local or gs://), a directory or glob "
                   "of them, a save_to_disk directory, or a hub dataset id (with --split, --subset, --dataset-revision).")
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
@click.option("--positions", type=click.Choice(POSITIONS), default=DEFAULTS.positions, show_default=True,
              help=POSITIONS_HELP)
@click.option("--compute-dtype", type=click.Choice(DTYPES), default=DEFAULTS.compute_dtype, show_default=True)
@click.option("--store-dtype", type=click.Choice(DTYPES), default=DEFAULTS.store_dtype, show_default=True)
@click.option("--max-seq", type=click.IntRange(min=0), default=DEFAULTS.max_seq, show_default=True, help="Longest input in tokens (0 = the model's context).")
@click.option("--long-inputs", type=click.Choice(LONG_INPUTS), default=DEFAULTS.long_inputs, show_default=True,
              help="What to do with inputs longer than --max-seq (counted in summary.json).")
@click.option("--batch-tokens", type=click.IntRange(min=1), default=DEFAULTS.batch_tokens, show_default=True, help="Tokens per device batch.")
@click.option("--shard-mb", type=click.FloatRange(min=0.001), default=DEFAULTS.shard_mb, show_default=True,
              help=SHARD_MB_HELP)
@click.option("--model-parallel", type=click.IntRange(min=1), default=DEFAULTS.model_parallel, show_default=True,
              help="Devices that split one copy of the model (attention heads and MLP); must divide the device "
                   "count, the heads and the MLP size.")
@click.option("--unit-rows", type=click.IntRange(min=1), default=DEFAULT_UNIT_ROWS, show_default=True,
              help="Rows per engine run (same as a fleet job's unit_rows: same rows, same bits).")
@click.option("--max-tokens", type=click.IntRange(min=0), default=DEFAULTS.max_tokens, show_default=True,
              help="Stop after the unit in which the stored tokens reach N (0 = no limit): a test-size run.")
@reading_options(show_defaults=True)
@click.option("--overwrite", is_flag=True, help="Start over: delete the shards and progress already in --out.")
@json_option
def extract(model, revision, input_path, out_dir, fmt, text_field, messages_field, arc_augmentations, arc_seed, sites,
            layers, positions, compute_dtype, store_dtype, max_seq, long_inputs, batch_tokens, shard_mb, model_parallel,
            unit_rows, max_tokens, overwrite, as_json, **reading):
    """Extract activations from a dataset to safetensors shards in --out (a rerun resumes)."""
    from actfleet.worker.hf_logging import quiet_transformers

    quiet_transformers()
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from actfleet.worker import compile_cache, inputs, model_files, pinning, sources
    from actfleet.worker.engine import check_lengths
    from actfleet.worker.engine_extractor import samples_per_row

    sites = site_names.from_flags(sites, layers)
    try:
        options = JobOptions(model=model, revision=revision, format=fmt, text_field=text_field,
                             messages_field=messages_field, arc_augmentations=arc_augmentations, arc_seed=arc_seed,
                             sites=sites, positions=positions, max_seq=max_seq, long_inputs=long_inputs,
                             batch_tokens=batch_tokens, compute_dtype=compute_dtype, store_dtype=store_dtype,
                             shard_mb=shard_mb, model_parallel=model_parallel, max_tokens=max_tokens, **reading)
    except ValueError as e:
        raise InputError(str(e)) from None
    # Fail on a missing or misread dataset, or a model that cannot take the lengths, before the slow imports.
    refs = sources.resolve(input_path, **options.source_options())
    check_lengths(options, model_files.resolve(model, revision=revision))
    per = samples_per_row(options)
    files, local_paths = pinning.pin_files(refs, options.max_rows, per)
    inputs.check_field(sources.head(files[0], local_paths[0], 1000), what=input_path, **options.input_options())
    copies = {f.path: p for f, p in zip(files, local_paths)}

    def local(f):  # compressed JSONL: decompressed once into the data cache, where the index's offsets point
        return sources.plain_copy(f, copies[f.path], pinning.data_cache())

    total = sum(f.rows for f in files) * per
    if options.max_rows:
        total = min(total, options.max_rows)
    fingerprint = sources.fingerprint(files)
    out = Path(out_dir)
    run_key = {"input": input_path, "input_sha256": fingerprint, "rows": total, "unit_rows": unit_rows,
               "options": options.replace(max_tokens=0).to_json()}  # max_tokens only says where to stop
    done = _resume_state(out, run_key, overwrite)

    from actfleet.worker.engine import Engine
    from actfleet.worker.shards import ShardWriter

    engine = Engine(options)
    from actfleet.worker.engine_extractor import shard_metadata

    # What made the rows, in every shard (hashes every model file once: seconds for a 1 GB model).
    meta = shard_metadata(options, engine, pinning.model_pin(engine.model_dir).to_json())
    (out / STATE).mkdir(parents=True, exist_ok=True)
    (out / STATE / "run.json").write_text(json.dumps(run_key, indent=1, sort_keys=True) + "\n")

    writer = _FileWriter(out)
    started = time.perf_counter()
    console = Console(stderr=True)
    progress = Progress(TextColumn("extract"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
                        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
                        TimeRemainingColumn(), console=console, disable=as_json, transient=False)
    stored_before = sum(u["stored_tokens"] for u in done.values())
    rows_before = sum(u["stop"] - u["start"] for u in done.values())
    run_stats = Counter()
    stopped_at_max_tokens = bool(max_tokens) and stored_before >= max_tokens
    with progress:
        bar = progress.add_task("rows", total=total, completed=rows_before, rate="-")
        for unit, start in enumerate(range(0, total, unit_rows)):
            if stopped_at_max_tokens:
                break
            if unit in done:
                continue
            stop = min(total, start + unit_rows)
            rows = inputs.read_source_rows(files, local, start=start, stop=stop, tokenizer=engine.tokenizer,
                                           **options.input_options())
            shards = ShardWriter(shard_mb=shard_mb, model=model, revision=revision, job="extract", unit=unit,
                                 sites=engine.sites, store_dtype=store_dtype, random_weights=engine.random_weights,
                                 on_shard=writer, extra_metadata=meta)
            stats, skipped, unit_started = Counter(), {}, time.perf_counter()
            for batch in engine.run(rows):
                shards.add(batch)
                stats.update(rows=batch.rows, stored_tokens=batch.stored_tokens, computed_tokens=batch.computed_tokens,
                             padded_tokens=batch.padded_tokens, truncated=batch.truncated)
                for sid, reason in batch.skipped.items():
                    skipped.setdefault(reason, []).append(int(sid))
                run_stats.update(rows=batch.rows, computed=batch.computed_tokens - batch.padded_tokens)
                secs = max(1e-9, time.perf_counter() - started)
                # Rows/s and the input tokens computed per second: the stored tokens say little (1 per row
                # with --positions last).
                progress.update(bar, advance=batch.rows, rate=f"{run_stats['rows'] / secs:,.1f} rows/s, "
                                f"{run_stats['computed'] / secs:,.0f} tok/s computed")
            shards.close()
            record = {"unit": unit, "start": start, "stop": stop, **{k: int(v) for k, v in stats.items()},
                      "skipped": {r: sorted(ids) for r, ids in skipped.items()},
                      "seconds": round(time.perf_counter() - unit_started, 3)}
            writer.after_written(partial(_write_unit_record, out, record))
            stored_before += stats["stored_tokens"]
            if max_tokens and stored_before >= max_tokens:
                stopped_at_max_tokens = True
    writer.close()
    done = {u: json.loads(_unit_record_path(out, u).read_text())
            for u in range(-(-total // unit_rows)) if _unit_record_path(out, u).is_file()}
    summary = _summary(out, done, engine=engine, options=options, input_path=input_path, fingerprint=fingerprint,
                       files=len(files), unit_rows=unit_rows, seconds=time.perf_counter() - started,
                       stopped_at_max_tokens=stopped_at_max_tokens)
    (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    c = compile_cache.stats()  # this process's, so not in summary.json (a resumed run compiles less)
    click.echo(f"compilation: {c['compiled']} programs compiled, {c['cache_hits']} loaded from the cache "
               f"({compile_cache.cache_dir()}), {c['compile_seconds']} s", err=True)
    if as_json:
        click.echo(json.dumps(summary))
    else:
        skipped_text = ", ".join(f"{n} {r}" for r, n in summary["skipped"].items()) or "none"
        click.echo(f"{summary['rows']} rows -> {summary['stored_tokens']} tokens in {len(summary['shards'])} shards in "
                   f"{out} ({summary['rows_per_second']:,.1f} rows/s, {summary['computed_tokens_per_second']:,.0f} "
                   f"tok/s computed, padding {summary['padding_fraction']:.1%}); "
                   f"skipped: {skipped_text}; truncated: {summary['truncated']}"
                   + ("; stopped at --max-tokens" if stopped_at_max_tokens else ""))


def _unit_record_path(out: Path, unit: int) -> Path:
    return out / STATE / f"unit-{unit:06d}.json"


def _write_unit_record(out: Path, record: dict, written: list[dict]) -> None:
    """After the unit's shards are on disk (run on the writer thread): its record, atomically."""
    prefix = f"{record['unit']:06d}-"
    rec = {**record, "shards": sorted((s for s in written if s["name"].startswith(prefix)), key=lambda s: s["name"])}
    path = _unit_record_path(out, record["unit"])
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(rec, sort_keys=True))
    tmp.replace(path)


def _resume_state(out: Path, run_key: dict, overwrite: bool) -> dict[int, dict]:
    """The finished units' records to keep (resuming), after deleting what must go; InputError if --out holds
    another run's shards."""
    from actfleet.work_queue import SHARD_SUFFIX, shard_unit_part

    shard_files = list(out.glob("*" + SHARD_SUFFIX)) if out.exists() else []
    state = out / STATE
    if overwrite:
        for f in shard_files + [out / SUMMARY] + (list(state.glob("*")) if state.exists() else []):
            f.unlink(missing_ok=True)
        return {}
    run_file = state / "run.json"
    if not run_file.is_file():
        if shard_files:
            raise InputError(f"--out {out}: already holds shards of a run it cannot resume (no {STATE}/run.json); "
                             f"pass --overwrite to replace them")
        return {}
    try:
        was = json.loads(run_file.read_text())
    except ValueError:
        was = None
    if was != run_key:
        changed = sorted(k for k in run_key if not isinstance(was, dict) or was.get(k) != run_key[k])
        if "options" in changed and isinstance(was, dict) and isinstance(was.get("options"), dict):
            changed = [f"options.{k}" for k in sorted(run_key["options"])
                       if was["options"].get(k) != run_key["options"][k]] + [c for c in changed if c != "options"]
        raise InputError(f"--out {out}: holds a run with other {', '.join(changed) or 'settings'}; rerun with the "
                         f"same input and options to resume, or pass --overwrite to start over")
    done = {}
    for f in sorted(state.glob("unit-*.json")):
        try:
            rec = json.loads(f.read_text())
            if all((out / s["name"]).is_file() for s in rec["shards"]):
                done[int(rec["unit"])] = rec
        except (ValueError, KeyError, TypeError):
            pass  # a torn record: the unit is redone
    for f in shard_files:  # shards of units cut short: redone, so never mixed with the rerun's
        up = shard_unit_part(f.name)
        if up is None or up[0] not in done:
            f.unlink()
    (out / SUMMARY).unlink(missing_ok=True)
    return done


def _summary(out: Path, done: dict[int, dict], *, engine, options: JobOptions, input_path: str, fingerprint: str,
             files: int, unit_rows: int, seconds: float, stopped_at_max_tokens: bool) -> dict:
    units = [done[u] for u in sorted(done)]
    total = Counter()
    skipped: dict[str, list[int]] = {}
    for u in units:
        total.update({k: u.get(k, 0) for k in ("stored_tokens", "computed_tokens", "padded_tokens", "truncated")})
        total["rows"] += u["stop"] - u["start"]
        for reason, ids in u["skipped"].items():
            skipped.setdefault(reason, []).extend(ids)
    unit_seconds = sum(u.get("seconds", 0) for u in units)
    o = options
    return {
        "model": o.model, "revision": o.revision, "random_weights": engine.random_weights, "input": str(input_path),
        "input_sha256": fingerprint, "input_files": files, "format": o.format, "sites": list(engine.sites),
        "positions": o.positions, "compute_dtype": o.compute_dtype, "store_dtype": o.store_dtype,
        "max_seq": engine.max_seq, "long_inputs": o.long_inputs, "unit_rows": unit_rows,
        "context_size": o.context_size, "separator": o.separator, "prepend_bos": o.prepend_bos, "concat": o.concat,
        "tokens_field": o.tokens_field, "max_rows": o.max_rows, "max_tokens": o.max_tokens,
        "stopped_at_max_tokens": stopped_at_max_tokens,
        "rows": total["rows"], "rows_stored": total["rows"] - sum(len(v) for v in skipped.values()),
        "stored_tokens": total["stored_tokens"], "computed_tokens": total["computed_tokens"],
        "padded_tokens": total["padded_tokens"],
        "padding_fraction": round(total["padded_tokens"] / total["computed_tokens"], 6) if total["computed_tokens"] else 0.0,
        "truncated": total["truncated"],
        "skipped": {reason: len(ids) for reason, ids in sorted(skipped.items())},
        "skipped_samples": {reason: sorted(ids)[:100] for reason, ids in sorted(skipped.items())},
        "seconds": round(seconds, 3),
        "tokens_per_second": round(total["stored_tokens"] / unit_seconds, 1) if unit_seconds else 0,
        # with --positions last the stored tokens are one per row: rows/s and input tokens computed per second
        # say how fast the run was
        "rows_per_second": round(total["rows"] / unit_seconds, 1) if unit_seconds else 0,
        "computed_tokens_per_second": round((total["computed_tokens"] - total["padded_tokens"]) / unit_seconds, 1)
        if unit_seconds else 0,
        "shards": sorted((s for u in units for s in u["shards"]), key=lambda s: s["name"]),
    }
