"""Shards -> a SAELens cached-activations dataset (`actfleet export saelens`, docs/research.md).

SAELens 6.54 trains from cached activations by `datasets.load_from_disk(cached_activations_path)` and
checks that the dataset has a column named after the hook whose feature is `Array2D(shape=(context_size,
d_in))` (ActivationsStore.load_cached_activation_dataset), then reads rows in order, `store_batch_size_prompts`
at a time, with an optional `token_ids` column (`Sequence(int32, length=context_size)`) for
`exclude_special_tokens`. This module writes exactly that: one row per window of `context_size`
consecutive stored tokens of one sample, globally shuffled.

Windows: the stored tokens of a sample, in position order, are cut into windows of exactly context_size;
a remainder shorter than that (and a sample with fewer stored tokens) is dropped and counted, never
padded and never joined with another sample's tokens (their activations were computed in other contexts).
A sample whose tokens continue from one shard into the next (the writer cuts shards at fixed row
counts) is followed across the cut. With a job made with --context-size N and every token stored,
every sample is one window.

Order: a uniform random permutation of all windows drawn from the seed (numpy's PCG64): the same shards
and seed give the same dataset, bit for bit. Memory stays bounded: pass 1 reads only the index tensors
(sample_ids, positions) to list the windows; pass 2 streams the shards once, one at a time, and appends
each window to a spill file for the output file it belongs to; pass 3 reorders each output file's rows
(at most `chunk_mb`) in memory and writes it with datasets' ArrowWriter. Disk: the output once, plus the
spill of the files not yet written. Arrow has no bfloat16: float32 (exact for bfloat16 shards) or float16.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from actfleet.errors import InputError
from actfleet.worker.reader import ShardFile, open_source

OUT_DTYPES = ("float32", "float16")
MANIFEST = "actfleet-export.json"
STATS_FILE = "actfleet-stats.safetensors"  # mean and variance per dimension (worker/stats.py JobTotals.save)


@dataclass
class ExportSummary:
    source: str
    out: str
    site: str
    column: str
    context_size: int
    model_class: str  # which SAELens model_class_name the column is named for (saelens_names.MODEL_CLASSES)
    d_in: int
    dtype: str
    seed: int
    windows: int = 0
    tokens: int = 0  # stored tokens read
    tokens_exported: int = 0  # windows * context_size
    tokens_dropped: int = 0  # remainders and samples shorter than a window
    samples: int = 0  # runs of one sample's tokens
    samples_short: int = 0  # samples with fewer stored tokens than one window
    shards: int = 0
    files: int = 0
    units_done: int | None = None
    units_total: int | None = None
    shard_metadata: dict = field(default_factory=dict)  # the first shard's, for provenance
    # The site's activation statistics over every stored token of the committed units (worker/stats.py;
    # also STATS_FILE's arrays), or why there are none. Of all stored tokens, not only the exported windows.
    stats: dict | None = None
    stats_missing: str = ""

    def to_json(self) -> dict:
        return asdict(self)


def export_saelens(
    location: str,
    out: str | Path,
    *,
    site: str,
    context_size: int | None = None,
    seed: int = 0,
    dtype: str = "float32",
    column: str | None = None,
    model_class: str = "transformer_lens",
    chunk_mb: float = 512,
    on_progress: Callable[[str, int, int], None] = lambda stage, done, total: None,
) -> ExportSummary:
    """Write the dataset into `out` (which must not exist or be empty). InputError for bad input. The column
    is `column`, else the name SAELens looks for under `model_class` (actfleet.worker.saelens_names)."""
    if dtype not in OUT_DTYPES:
        raise InputError(f"--dtype {dtype!r}: use one of {', '.join(OUT_DTYPES)} (Arrow has no bfloat16)")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out}: exists and is not an empty directory; choose a new OUT")
    try:
        src = open_source(location)
    except FileNotFoundError as e:
        raise InputError(str(e)) from None
    if not src.keys:
        raise InputError(f"{location}: no shards there" + (" (no unit is done yet)" if src.units_total else ""))

    # Pass 1: the index tensors only -> window starts in the virtual row space of all shards in order.
    first = src.shard(src.keys[0])
    if site not in first.entries:
        raise InputError(f"--site {site}: not in {first.key} (its sites: {', '.join(first.sites)})")
    if context_size is None:
        meta_ctx = first.metadata.get("context_size", "")
        if not meta_ctx.isdigit() or int(meta_ctx) <= 0:
            raise InputError("--context-size: needed (the shards do not record a job context size)")
        context_size = int(meta_ctx)
    if context_size <= 0:
        raise InputError(f"--context-size {context_size}: must be at least 1")
    width = _width(first, site)
    if column is None:
        from actfleet.worker.saelens_names import hook_name

        column = hook_name(site, model_class, first.metadata)
    summary = ExportSummary(
        source=location,
        out=str(out),
        site=site,
        column=column,
        model_class=model_class,
        context_size=context_size,
        d_in=width,
        dtype=dtype,
        seed=seed,
        shards=len(src.keys),
        units_done=src.units_done,
        units_total=src.units_total,
        shard_metadata=dict(first.metadata),
    )
    starts, offsets = _windows(src, first, site, width, context_size, summary, on_progress)
    n = len(starts)
    summary.windows, summary.tokens_exported = n, n * context_size
    if n == 0:
        raise InputError(
            f"{location}: no sample has {context_size} stored tokens of {site}: nothing to export "
            f"(a smaller --context-size, or a job that stores every token: --positions all)"
        )

    # The permutation and the output files.
    order = np.random.default_rng(seed).permutation(n)  # output row i holds window order[i]
    pos = np.empty(n, np.int64)
    pos[order] = np.arange(n)
    window_bytes = context_size * (width * np.dtype(dtype).itemsize + 4)
    per_file = max(1, int(chunk_mb * 2**20) // window_bytes)
    files = -(-n // per_file)
    summary.files = files
    file_of = pos // per_file
    record = np.dtype([("acts", dtype, (context_size, width)), ("tok", np.int32, (context_size,))])

    out.mkdir(parents=True, exist_ok=True)
    spill = out / ".spill"
    spill.mkdir()
    try:
        _spill(src, site, starts, offsets, file_of, record, spill, context_size, on_progress)
        _write_arrow(out, spill, summary, pos, file_of, per_file, files, record, on_progress)
    finally:
        shutil.rmtree(spill, ignore_errors=True)
    _write_stats(src, site, out, summary)
    (out / MANIFEST).write_text(json.dumps(summary.to_json(), indent=2) + "\n")
    return summary


def _write_stats(src, site: str, out: Path, summary: ExportSummary) -> None:
    """The job's statistics of `site` beside the export (a job's only: a plain directory has none)."""
    from actfleet.worker.stats import NoStatistics, job_totals

    if src.job is None:
        summary.stats_missing = "not a job: plain shard files carry no statistics"
        return
    job = src.job
    try:
        totals = job_totals(job.store, job.job, job.spec.units, where=src.location, sites=[site])
    except NoStatistics as e:  # a corrupt statistics object is an error, as a corrupt shard is
        summary.stats_missing = str(e)
        return
    if site in totals.sites:
        totals.save(out / STATS_FILE)
        summary.stats = totals.sites[site].summary()


def _width(f: ShardFile, site: str) -> int:
    shape = f.entries[site].shape
    return int(np.prod(shape[1:], dtype=np.int64))  # per-head sites ([N, heads, d_head]) flatten, as SAELens does


def _windows(src, first, site, width, ctx, summary, on_progress) -> tuple[np.ndarray, np.ndarray]:
    """(window start rows in the virtual row space, each shard's first virtual row + the total)."""
    starts, offsets = [], [0]
    carry = None  # (sample id, last position, virtual start row) of a run that may continue
    total = 0

    def close(run_start: int, run_end: int) -> None:
        length = run_end - run_start
        k = length // ctx
        summary.samples += 1
        summary.tokens_dropped += length - k * ctx
        if k == 0:
            summary.samples_short += 1
        else:
            starts.append(run_start + ctx * np.arange(k, dtype=np.int64))

    for i, key in enumerate(src.keys):
        f = first if i == 0 else src.shard(key)  # headers are read once per pass
        if site not in f.entries:
            raise InputError(f"--site {site}: not in {key} (its sites: {', '.join(f.sites)})")
        if _width(f, site) != width:
            raise InputError(f"{key}: {site} is {_width(f, site)} wide, the first shard's is {width}: not one job")
        idx = f.read(("sample_ids", "positions"))
        sids, positions = np.asarray(idx["sample_ids"]), np.asarray(idx["positions"])
        rows = len(sids)
        if rows:
            brk = np.flatnonzero((sids[1:] != sids[:-1]) | (positions[1:] <= positions[:-1])) + 1
            run_starts = np.concatenate([[0], brk]) + total
            if carry is not None and not (sids[0] == carry[0] and positions[0] > carry[1]):
                close(carry[2], total)
                carry = None
            if carry is not None:
                run_starts[0] = carry[2]  # the run continues from the previous shard
            bounds = np.concatenate([run_starts, [total + rows]])
            for a, b in zip(bounds[:-2], bounds[1:-1]):  # all but the last run are complete
                close(int(a), int(b))
            carry = (sids[-1], positions[-1], int(bounds[-2]))
        total += rows
        offsets.append(total)
        on_progress("index", i + 1, len(src.keys))
    if carry is not None:
        close(carry[2], total)
    summary.tokens = total
    return (np.concatenate(starts) if starts else np.zeros(0, np.int64)), np.asarray(offsets, np.int64)


def _spill(src, site, starts, offsets, file_of, record, spill: Path, ctx: int, on_progress) -> None:
    """Pass 2: each shard once, in order; every window that ends in it goes to its output file's spill."""
    tail_acts = tail_tok = None
    tail_start = 0  # virtual row of the tail's first row
    done = 0  # windows spilled so far (they complete in start order)
    for i, key in enumerate(src.keys):
        f = src.shard(key)
        got = f.read((site, "token_ids"))
        acts = np.asarray(got[site]).reshape(len(got["token_ids"]), -1).astype(record["acts"].base, copy=False)
        tok = np.asarray(got["token_ids"], np.int32)
        if tail_acts is not None and len(tail_acts):
            acts, tok = np.concatenate([tail_acts, acts]), np.concatenate([tail_tok, tok])
        else:
            tail_start = offsets[i]
        end = offsets[i + 1]
        stop = int(np.searchsorted(starts, end - ctx, side="right"))  # windows with start + ctx <= end
        if stop > done:
            w = starts[done:stop] - tail_start
            rows = w[:, None] + np.arange(ctx)
            recs = np.empty(stop - done, record)
            recs["acts"] = acts[rows]
            recs["tok"] = tok[rows]
            target = file_of[done:stop]
            grouped = np.argsort(target, kind="stable")  # in window order within each output file
            cut = np.flatnonzero(np.diff(target[grouped])) + 1
            for part in np.split(grouped, cut):
                with open(spill / f"{int(target[part[0]]):05d}.bin", "ab") as fh:
                    recs[part].tofile(fh)
            done = stop
        keep = min(ctx - 1, len(tok))  # rows a window not yet complete may still need
        tail_acts, tail_tok = (acts[len(tok) - keep :].copy(), tok[len(tok) - keep :].copy()) if keep else (None, None)
        tail_start = end - keep
        on_progress("read", i + 1, len(src.keys))
    if done != len(starts):
        raise AssertionError(f"spilled {done} of {len(starts)} windows")


def _write_arrow(
    out: Path, spill: Path, summary: ExportSummary, pos, file_of, per_file, files, record, on_progress
) -> None:
    """Pass 3: each output file's rows, put in their shuffled order, written as save_to_disk would."""
    from datasets import Array2D, DatasetInfo, Features, Sequence, Value
    from datasets.arrow_writer import ArrowWriter

    ctx, width = summary.context_size, summary.d_in
    features = Features(
        {
            summary.column: Array2D(shape=(ctx, width), dtype=summary.dtype),
            "token_ids": Sequence(Value("int32"), length=ctx),
        }
    )
    by_file = np.argsort(file_of, kind="stable")  # windows grouped by output file, in window (= spill) order
    bounds = np.searchsorted(file_of[by_file], np.arange(files + 1))
    names = [f"data-{c:05d}-of-{files:05d}.arrow" for c in range(files)]
    for c in range(files):
        members = by_file[bounds[c] : bounds[c + 1]]
        recs = np.fromfile(spill / f"{c:05d}.bin", dtype=record)
        if len(recs) != len(members):
            raise AssertionError(f"output file {c}: {len(recs)} spilled windows, {len(members)} expected")
        rows = np.empty_like(recs)
        rows[pos[members] - c * per_file] = recs
        writer = ArrowWriter(features=features, path=str(out / names[c]))
        step = max(1, (64 << 20) // record.itemsize)  # ~64 MiB record batches
        for lo in range(0, len(rows), step):
            part = rows[lo : lo + step]
            writer.write_batch({summary.column: part["acts"], "token_ids": part["tok"]})
        writer.finalize()
        writer.close()
        os.unlink(spill / f"{c:05d}.bin")
        del recs, rows
        on_progress("write", c + 1, files)
    # The two JSON files `Dataset.save_to_disk` writes next to its Arrow files (datasets' on-disk format;
    # SAELens's own CacheActivationsRunner writes state.json by hand the same way).
    fingerprint = hashlib.sha256(
        json.dumps(
            [summary.source, summary.site, summary.column, ctx, summary.seed, summary.dtype, summary.windows]
        ).encode()
    ).hexdigest()[:16]
    state = {
        "_data_files": [{"filename": name} for name in names],
        "_fingerprint": fingerprint,
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    (out / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    info = asdict(DatasetInfo(features=features, description=f"actfleet export of {summary.source}"))
    (out / "dataset_info.json").write_text(json.dumps({k: info[k] for k in sorted(info)}, indent=2))
