"""`actfleet extract`: one machine, one dataset -> activation shards and summary.json in a directory.

The same pipeline as a fleet job, run in this process: a `prepare` into a local work queue under --out
(worker/job_setup.py, then work_queue.prepare), then one worker (actfleet.worker.work_loop.Worker with the
real engine extractor) that processes the units in order. Rows are cut into units of --unit-rows exactly as a
fleet job with the same unit_rows: the same rows give the same bits either way.

Layout of --out (docs/extractor.md, "Resuming"):

    000042-0003.safetensors   part 3 of unit 42: the shards, under their (unit, part) names
    summary.json              made from the done records when the run ends
    .extract/extract/         the queue (docs/jobs.md): job.json, units/, leases/, done/, workers/

Resuming is the queue's: a unit is done iff its done record exists. A rerun with the same input and options
(after Ctrl-C, a crash, a lost machine) keeps the done units, deletes shards no done record lists (a unit cut
short) and continues; a rerun with other options is refused; --overwrite starts over. One process works on an
--out at a time (a lock), so its shards need no attempt tag in their names and a dead run's leases are
simply dropped.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import click

from actfleet import work_queue as q
from actfleet.cli import json_option
from actfleet.errors import ActfleetError, InputError
from actfleet.job_options import EXTRACT, JobOptions
from actfleet.store import LocalStore, Store
from actfleet.worker.commands.flags import job_options, options_from_flags

SUMMARY = "summary.json"
STATE = ".extract"  # the local queue's store root, under --out
JOB = "extract"  # the job's name in that store
LOCK = ".lock"  # in STATE: held while a run works on --out
WORKER = "extract"


class OutStore(Store):
    """The local store an extract run's queue lives in: records under --out/.extract/, shards straight in
    --out under their (unit, part) names (`000042-0003.safetensors`, no attempt tag: one process works on
    an --out at a time, so a retried unit rewrites its own names, atomically)."""

    def __init__(self, out: Path):
        self.records, self.shards = LocalStore(out / STATE), LocalStore(out)
        self.url = str(self.records.root)

    def _route(self, key: str) -> tuple[LocalStore, str]:
        from actfleet.work_queue import shard_name, shard_unit_part

        parts = key.split("/")
        up = shard_unit_part(key)
        if up is not None and len(parts) == 3 and parts[1] == "shards":
            return self.shards, shard_name(*up)
        return self.records, key

    def read(self, key):
        s, k = self._route(key)
        return s.read(k)

    def read_range(self, key, start, end, generation=None):
        s, k = self._route(key)
        return s.read_range(k, start, end, generation)

    def generation(self, key):
        s, k = self._route(key)
        return s.generation(k)

    def size(self, key):
        s, k = self._route(key)
        return s.size(k)

    def create(self, key, data):
        s, k = self._route(key)
        return s.create(k, data)

    def replace(self, key, data, generation):
        s, k = self._route(key)
        return s.replace(k, data, generation)

    def delete(self, key, generation=None):
        s, k = self._route(key)
        return s.delete(k, generation)

    def put(self, key, data):
        s, k = self._route(key)
        if s is self.records:
            return s.put(k, data)
        # A shard: written to a hidden temporary name and renamed into place. No per-key lock file (the
        # local store's way against concurrent writers): this run is the only writer of --out.
        path = self.shards.root / k
        tmp = path.with_name(f".{k}.tmp-{os.getpid()}")
        try:
            if isinstance(data, (bytes, bytearray, memoryview)):
                tmp.write_bytes(data)
            else:
                shutil.copyfile(data, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return os.stat(path).st_mtime_ns

    def list(self, prefix):
        return self.records.list(prefix)  # the queue lists records only; the shards are --out's *.safetensors

    def local_path(self, key):
        s, k = self._route(key)
        return s.local_path(k)

    def now(self):
        return self.records.now()

    def read_stamped(self, key):
        s, k = self._route(key)
        return s.read_stamped(k)

    def list_written(self, prefix):
        return self.records.list_written(prefix)


@click.command()
@job_options(EXTRACT)
@click.option(
    "--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Directory for shards and summary.json."
)
@click.option("--overwrite", is_flag=True, help="Start over: delete the shards and progress already in --out.")
@json_option
def extract(out_dir, overwrite, as_json, **flags):
    """Extract activations from a dataset to safetensors shards in --out (a rerun resumes)."""
    from actfleet.worker.hf_logging import quiet_transformers

    quiet_transformers()
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from actfleet.worker import compile_cache
    from actfleet.worker.job_setup import pin_job_inputs

    input_path, unit_rows = flags.pop("input"), flags.pop("unit_rows")
    options = options_from_flags(flags, JobOptions())
    max_tokens = options.max_tokens
    # Fail on a missing or misread dataset, or a model that cannot take the lengths, before --out is touched.
    pinned = pin_job_inputs(options, input_path)
    out = Path(out_dir)
    job_options_ = options.replace(max_tokens=0)  # max_tokens only says where to stop, not what is stored
    lock = _lock(out)
    store = OutStore(out)
    done = _resume_state(
        out,
        store,
        overwrite,
        {
            "input": input_path,
            "input_sha256": pinned.fingerprint,
            "rows": pinned.rows,
            "unit_rows": unit_rows,
            "model_sha256": pinned.model_pin["sha256"],
            "options": job_options_.to_json(),
        },
    )
    spec, _ = q.prepare(store, JOB, unit_rows=unit_rows, options=job_options_, **pinned.prepare_args())

    from actfleet.worker.engine_extractor import EngineExtractor
    from actfleet.worker.work_loop import Worker

    engine_extractor = EngineExtractor(spec, pinned)
    started = time.perf_counter()
    console = Console(stderr=True)
    progress = Progress(
        TextColumn("extract"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("rows"),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=as_json,
        transient=False,
    )
    stored = sum(r.tokens for r in done.values())
    stopped_at_max_tokens = bool(max_tokens) and stored >= max_tokens
    with progress:
        bar = progress.add_task(
            "rows", total=spec.rows, completed=sum(r.stop - r.start for r in done.values()), rate="-"
        )
        extractor = _ProgressExtractor(engine_extractor, progress, bar, started)
        worker = Worker(store, spec, extractor, WORKER, stream_units=not max_tokens)

        def on_event(kind: str, info: dict) -> None:
            nonlocal stored, stopped_at_max_tokens
            if kind == "abandoned":  # a failed shard write (disk full...): retrying here would fail alike
                raise ActfleetError(f"--out {out}: unit {info['unit']} failed: {info['reason']}")
            if kind == "committed":
                stored += info["tokens"]
                if max_tokens and stored >= max_tokens:  # stop after the unit in which the tokens reach it
                    stopped_at_max_tokens = True
                    worker.request_stop()

        worker.on_event = on_event
        worker.offset = 0  # units in order: --max-tokens stops after a prefix of the rows
        if not stopped_at_max_tokens:
            worker.run()
    done = {u: r for u in range(spec.units) if (r := q.read_done(store, JOB, u)) is not None}
    summary = _summary(
        done,
        engine=engine_extractor.engine,
        options=options,
        input_path=input_path,
        fingerprint=pinned.fingerprint,
        files=len(pinned.files),
        unit_rows=unit_rows,
        seconds=time.perf_counter() - started,
        stopped_at_max_tokens=stopped_at_max_tokens,
    )
    (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    os.close(lock)
    c = compile_cache.stats()  # this process's, so not in summary.json (a resumed run compiles less)
    click.echo(
        f"compilation: {c['compiled']} programs compiled, {c['cache_hits']} loaded from the cache "
        f"({compile_cache.cache_dir()}), {c['compile_seconds']} s",
        err=True,
    )
    if as_json:
        click.echo(json.dumps(summary))
    else:
        skipped_text = ", ".join(f"{n} {r}" for r, n in summary["skipped"].items()) or "none"
        click.echo(
            f"{summary['rows']} rows -> {summary['stored_tokens']} tokens in {len(summary['shards'])} shards in "
            f"{out} ({summary['rows_per_second']:,.1f} rows/s, {summary['computed_tokens_per_second']:,.0f} "
            f"tok/s computed, padding {summary['padding_fraction']:.1%}); "
            f"skipped: {skipped_text}; truncated: {summary['truncated']}"
            + ("; stopped at --max-tokens" if stopped_at_max_tokens else "")
        )


class _ProgressExtractor:
    """The engine extractor, advancing the progress bar as each batch comes off the device."""

    def __init__(self, inner, progress, bar, started: float):
        self.inner, self.progress, self.bar, self.started = inner, progress, bar, started
        self.stats = Counter()

    def fingerprint(self) -> str:
        return self.inner.fingerprint()

    def model_sha256(self) -> str:
        return self.inner.model_sha256()

    def prepare(self, start: int, stop: int):
        return self.inner.prepare(start, stop)

    def shard_writer(self, unit: int):
        return self.inner.shard_writer(unit)

    def run_stream(self, units):
        for k, batch in self.inner.run_stream(units):
            self.stats.update(rows=batch.rows, computed=batch.computed_tokens - batch.padded_tokens)
            secs = max(1e-9, time.perf_counter() - self.started)
            # Rows/s and the input tokens computed per second: the stored tokens say little (1 per row with
            # --positions last).
            self.progress.update(
                self.bar,
                advance=batch.rows,
                rate=f"{self.stats['rows'] / secs:,.1f} rows/s, {self.stats['computed'] / secs:,.0f} tok/s computed",
            )
            yield k, batch


def _lock(out: Path) -> int:
    """Hold --out for this run (released when the process ends, however it ends)."""
    (out / STATE).mkdir(parents=True, exist_ok=True)
    fd = os.open(out / STATE / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise InputError(f"--out {out}: another `actfleet extract` is working on it") from None
    return fd


def _flag(key: str) -> str:
    """A job.json key as the user typed it: sites -> --sites, input_sha256 -> the input's sha256."""
    return {"input_sha256": "the input's sha256", "model_sha256": "the model's sha256"}.get(
        key, "--" + key.replace("_", "-")
    )


def _shown(v) -> str:
    if isinstance(v, list):
        return ",".join(map(str, v))
    return str(v)[:16] + "..." if isinstance(v, str) and len(v) == 64 else str(v)


def _resume_state(out: Path, store: OutStore, overwrite: bool, wanted: dict) -> dict[int, q.DoneRecord]:
    """The done units to keep (resuming), after deleting what must go; InputError if --out holds another
    run's shards. `wanted`: what this run reads and how, compared with the job.json already there."""
    from actfleet.work_queue import shard_unit_part

    shard_files = list(out.glob("*.safetensors"))
    queue_dir = out / STATE / JOB
    if overwrite:
        for f in shard_files + [out / SUMMARY]:
            f.unlink(missing_ok=True)
        for p in (out / STATE).iterdir():  # the queue, and an older extract's records; not the lock we hold
            if p.name != LOCK:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        return {}
    if not (queue_dir / "job.json").is_file():
        if shard_files:
            raise InputError(
                f"--out {out}: already holds shards of a run it cannot resume (no "
                f"{STATE}/{JOB}/job.json); pass --overwrite to replace them"
            )
        shutil.rmtree(queue_dir, ignore_errors=True)  # a prepare cut short: job.json is written last
        return {}
    spec = q.read_job(store, JOB)
    was = {
        "input": spec.input,
        "input_sha256": spec.fingerprint,
        "rows": spec.rows,
        "unit_rows": spec.unit_rows,
        "model_sha256": spec.model_sha256,
        "options": spec.options.to_json(),
    }
    if was != wanted:
        # Each difference as the option it is (--sites ..., was ..., now ...), not as job.json's key path.
        changed = [
            (k, was["options"].get(k), v) for k, v in sorted(wanted["options"].items()) if was["options"].get(k) != v
        ]
        changed += [(k, was[k], wanted[k]) for k in wanted if k != "options" and was[k] != wanted[k]]
        diffs = "; ".join(f"{_flag(k)} was {_shown(a)}, now {_shown(b)}" for k, a, b in changed) or "other settings"
        raise InputError(
            f"--out {out}: holds a run made with different options ({diffs}); rerun with the same input "
            f"and options to resume, or pass --overwrite to start over"
        )
    # We hold the lock: any lease is a dead run's, and would only make us wait for its expiry.
    for key in list(store.list(f"{JOB}/leases/")):
        store.records.delete(key)
    done = {}
    for u in range(spec.units):
        r = q.read_done(store, JOB, u)
        if r is None:
            continue
        if all(store.size(f"{JOB}/{s.name}") == s.bytes for s in r.shards):
            done[u] = r
        else:  # a shard of it was deleted or damaged since: the unit is redone
            store.delete(q.done_key(JOB, u))
    listed = {store._route(f"{JOB}/{s.name}")[1] for r in done.values() for s in r.shards}
    for f in shard_files:  # shards of units cut short: redone, so never mixed with the rerun's
        if f.name not in listed or shard_unit_part(f.name) is None:
            f.unlink()
    for f in out.glob(".*.tmp-*"):  # a shard write cut short
        f.unlink()
    (out / SUMMARY).unlink(missing_ok=True)
    return done


def _shard_entry(s: q.ShardInfo) -> dict:
    """summary.json's entry for a shard: its file name in --out (no attempt tag), bytes, sha256, tokens."""
    from actfleet.work_queue import shard_name, shard_unit_part

    return {"name": shard_name(*shard_unit_part(s.name)), "bytes": s.bytes, "sha256": s.sha256, "tokens": s.tokens}


def _summary(
    done: dict[int, q.DoneRecord],
    *,
    engine,
    options: JobOptions,
    input_path: str,
    fingerprint: str,
    files: int,
    unit_rows: int,
    seconds: float,
    stopped_at_max_tokens: bool,
) -> dict:
    units = [done[u] for u in sorted(done)]
    total = Counter()
    skipped: dict[str, list[int]] = {}
    for u in units:
        total.update(
            stored_tokens=u.tokens,
            computed_tokens=u.computed_tokens,
            padded_tokens=u.padded_tokens,
            truncated=u.truncated,
            rows=u.stop - u.start,
        )
        for reason, ids in u.skipped.items():
            skipped.setdefault(reason, []).extend(ids)
    unit_seconds = sum(u.seconds for u in units)
    o = options
    return {
        "model": o.model,
        "revision": o.revision,
        "random_weights": engine.random_weights,
        "input": str(input_path),
        "input_sha256": fingerprint,
        "input_files": files,
        "format": o.format,
        "sites": list(engine.sites),
        "positions": o.positions,
        "compute_dtype": o.compute_dtype,
        "store_dtype": o.store_dtype,
        "max_seq": engine.max_seq,
        "long_inputs": o.long_inputs,
        "unit_rows": unit_rows,
        "context_size": o.context_size,
        "separator": o.separator,
        "prepend_bos": o.prepend_bos,
        "concat": o.concat,
        "tokens_field": o.tokens_field,
        "max_rows": o.max_rows,
        "max_tokens": o.max_tokens,
        "stopped_at_max_tokens": stopped_at_max_tokens,
        "rows": total["rows"],
        "rows_stored": total["rows"] - sum(len(v) for v in skipped.values()),
        "stored_tokens": total["stored_tokens"],
        "computed_tokens": total["computed_tokens"],
        "padded_tokens": total["padded_tokens"],
        "padding_fraction": round(total["padded_tokens"] / total["computed_tokens"], 6)
        if total["computed_tokens"]
        else 0.0,
        "truncated": total["truncated"],
        "skipped": {reason: len(ids) for reason, ids in sorted(skipped.items())},
        "skipped_samples": {reason: sorted(ids)[:100] for reason, ids in sorted(skipped.items())},
        "seconds": round(seconds, 3),
        "tokens_per_second": round(total["stored_tokens"] / unit_seconds, 1) if unit_seconds else 0,
        # with --positions last the stored tokens are one per row: rows/s and input tokens computed per second
        # say how fast the run was
        "rows_per_second": round(total["rows"] / unit_seconds, 1) if unit_seconds else 0,
        "computed_tokens_per_second": round((total["computed_tokens"] - total["padded_tokens"]) / unit_seconds, 1)
        if unit_seconds
        else 0,
        "shards": sorted((_shard_entry(s) for u in units for s in u.shards), key=lambda s: s["name"]),
    }
