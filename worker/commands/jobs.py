"""`actfleet prepare`, `actfleet work`, `actfleet verify`: the work queue's command line (docs/jobs.md).

Each reads the job from fleet.toml ([job]) when there is one; `--store` and `--job` override it, and with
both given (plus, for prepare, `--model` and `--input`) no config file is needed.

Exit codes: 0 done (prepared / job complete or drained on SIGTERM / verified), 1 failure (verify found
problems), 2 bad input (a changed dataset, a missing job, bad options).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click

from actfleet.cli import config_option, json_option
from actfleet.config import SITE_KINDS, expand_sites, resolve_path
from actfleet.errors import ConfigError, InputError
from actfleet.worker import work_queue as q
from actfleet.store import Store, open_store

# The extraction options a job pins in job.json (everything that changes the stored bits or rows).
OPTION_KEYS = ("model", "revision", "format", "text_field", "messages_field", "arc_augmentations", "arc_seed",
               "sites", "positions", "max_seq", "long_inputs", "batch_tokens", "compute_dtype", "store_dtype",
               "shard_mb")
DEFAULTS = {"revision": "main", "format": "text", "text_field": "text", "messages_field": "messages",
            "arc_augmentations": 0, "arc_seed": 0, "sites": ("resid_post",), "positions": "non-special",
            "max_seq": 0, "long_inputs": "skip", "batch_tokens": 16384, "compute_dtype": "bfloat16",
            "store_dtype": "bfloat16", "shard_mb": 512, "unit_rows": 1000, "lease_seconds": 300}


@dataclass
class Target:
    store: Store
    job: str
    defaults: dict  # the config's [job] values (or DEFAULTS without a config)


def _target(config_path: str | None, store_url: str | None, job: str | None) -> Target:
    """Config (when present) overridden by --store/--job. Without a config both must be given."""
    from actfleet import config as cfg

    path = resolve_path(config_path)
    if config_path or path.is_file():
        conf = cfg.load(path)
        values = {k: getattr(conf.job, k) for k in conf.job.__dataclass_fields__}
        store_url, job = store_url or conf.job.store, job or conf.job.name
    else:
        if not store_url:
            raise ConfigError(f"{path}: config file not found, and no --store given (pass --store URL, or "
                              f"--config fleet.toml)")
        values = dict(DEFAULTS)
        job = job or "default"
    return Target(open_store(store_url), job, values)


# ----------------------------------------------------------------------------------------------------
# The real extractor behind the loop's UnitExtractor interface
# ----------------------------------------------------------------------------------------------------


class EngineExtractor:
    """actfleet.worker.engine + actfleet.worker.inputs + actfleet.worker.shards for one job, loaded once per worker process."""

    def __init__(self, spec: q.JobSpec):
        from actfleet.worker import engine as eng, inputs, shards

        o = spec.options
        self.spec, self.o, self._inputs, self._shards = spec, o, inputs, shards
        self.engine = eng.Engine(o["model"], eng.ExtractOptions(
            sites=tuple(o["sites"]), positions=o["positions"], max_seq=o["max_seq"], long_inputs=o["long_inputs"],
            batch_tokens=o["batch_tokens"], compute_dtype=o["compute_dtype"], store_dtype=o["store_dtype"]),
            revision=o["revision"])

    def fingerprint(self) -> str:
        return input_fingerprint(self.spec.input)

    def rows(self, start: int, stop: int):
        o = self.o
        return self._inputs.read_rows(self.spec.input, format=o["format"], text_field=o["text_field"],
                                      messages_field=o["messages_field"], tokenizer=self.engine.tokenizer,
                                      arc_augmentations=o["arc_augmentations"], arc_seed=o["arc_seed"],
                                      start=start, stop=stop)

    def run(self, rows):
        return self.engine.run(rows)

    def shard_writer(self, unit: int):
        return _ShardSink(self._shards, self.engine, self.spec, unit)


class _ShardSink:
    """Adapts actfleet.worker.shards.ShardWriter to the loop's add()/finish() -> [Shard]."""

    def __init__(self, shards_mod, engine, spec: q.JobSpec, unit: int):
        self.out: list = []  # of shards_mod.Shard
        self.writer = shards_mod.ShardWriter(
            shard_mb=spec.options["shard_mb"], model=spec.options["model"], revision=spec.options["revision"],
            job=spec.job, unit=unit, sites=engine.sites, store_dtype=spec.options["store_dtype"],
            random_weights=getattr(engine, "random_weights", False),
            on_shard=lambda shard: self.out.append(shard))  # self.out is swapped for a fresh list on each take

    def add(self, batch) -> list:
        self.writer.add(batch)
        out, self.out = self.out, []
        return out

    def finish(self) -> list:
        self.writer.close()
        out, self.out = self.out, []
        return out


def input_fingerprint(path: str) -> str:
    """sha256 of the dataset's bytes, streamed (a local file or a gs:// object)."""
    from actfleet.hashing import sha256_file, sha256_stream

    if path.startswith("gs://"):
        from google.cloud import storage

        bucket, _, name = path[len("gs://"):].partition("/")
        try:
            with storage.Client().bucket(bucket).blob(name).open("rb") as f:
                return sha256_stream(f)
        except Exception as e:
            raise InputError(f"{path}: cannot read the dataset ({type(e).__name__}: {e})") from None
    try:
        return sha256_file(path)
    except OSError as e:
        raise InputError(f"{path}: cannot read the dataset ({e.strerror})") from None


def count_input_rows(path: str, options: dict) -> int:
    from actfleet.worker import inputs

    return inputs.count_rows(path, format=options["format"], text_field=options["text_field"],
                             messages_field=options["messages_field"],
                             arc_augmentations=options["arc_augmentations"], arc_seed=options["arc_seed"])


# ----------------------------------------------------------------------------------------------------
# prepare
# ----------------------------------------------------------------------------------------------------


@click.command()
@config_option
@click.option("--store", "store_url", help="Store URL: a path, file:///abs or gs://bucket/prefix (default: [job] store).")
@click.option("--job", help="Job name (default: [job] name).")
@click.option("--model", help="Model: local dir, gs:// prefix or hub id.")
@click.option("--revision", help="Hub revision of the model.")
@click.option("--input", "input_path", help="Dataset file (JSONL, Parquet, CSV) or gs:// URL.")
@click.option("--format", "fmt", type=click.Choice(["text", "chat", "arc"]), help="How rows are rendered.")
@click.option("--text-field", help="Field holding the text (format text).")
@click.option("--messages-field", help="Field holding the messages (format chat).")
@click.option("--layers", help='Layers: "6,12", "all".')
@click.option("--sites", help="Site kinds or names, comma-separated: " + ", ".join(SITE_KINDS) + ".")
@click.option("--positions", type=click.Choice(["all", "non-special", "last"]))
@click.option("--max-seq", type=int, help="Longest input in tokens (0 = the model's context).")
@click.option("--long-inputs", type=click.Choice(["skip", "truncate"]))
@click.option("--batch-tokens", type=int)
@click.option("--compute-dtype", type=click.Choice(["bfloat16", "float32"]))
@click.option("--store-dtype", type=click.Choice(["bfloat16", "float32"]))
@click.option("--shard-mb", type=click.FloatRange(min=0.001), help="Approximate shard size in MiB.")
@click.option("--unit-rows", type=click.IntRange(min=1), help="Rows per work unit.")
@json_option
def prepare(config_path, store_url, job, model, revision, input_path, fmt, text_field, messages_field, layers,
            sites, positions, max_seq, long_inputs, batch_tokens, compute_dtype, store_dtype, shard_mb, unit_rows,
            as_json):
    """Split a dataset into work units in the store (idempotent; a changed dataset is refused)."""
    t = _target(config_path, store_url, job)
    d = t.defaults
    given = {"model": model, "revision": revision, "format": fmt, "text_field": text_field,
             "messages_field": messages_field, "positions": positions, "max_seq": max_seq, "long_inputs": long_inputs,
             "batch_tokens": batch_tokens, "compute_dtype": compute_dtype, "store_dtype": store_dtype,
             "shard_mb": shard_mb}
    options = {k: (given[k] if given.get(k) is not None else d.get(k)) for k in OPTION_KEYS if k != "sites"}
    if sites or layers:
        kinds = [s.strip() for s in (sites or "resid_post").split(",") if s.strip()]
        lay = "all" if (layers or "").strip() == "all" else _parse_layers(layers or "")
        options["sites"] = list(expand_sites(kinds, lay, "--sites/--layers"))
    else:
        options["sites"] = list(d.get("sites") or ())
        if not options["sites"] or any(s in SITE_KINDS for s in options["sites"]):
            raise InputError("prepare: no capture sites: pass --layers (and --sites), or set [job] sites/layers")
    if not options.get("model"):
        raise InputError("prepare: no model: pass --model or set [job] model")
    source = input_path or d.get("input")
    if not source:
        raise InputError("prepare: no dataset: pass --input or set [job] input")
    if "://" not in source:
        if not Path(source).is_file():
            raise InputError(f"prepare: --input {source}: no such file")
        source = str(Path(source).resolve())
    if "://" not in options["model"] and Path(options["model"]).exists():
        options["model"] = str(Path(options["model"]).resolve())
    rows_per_unit = unit_rows or d.get("unit_rows") or DEFAULTS["unit_rows"]
    fingerprint = input_fingerprint(source)
    rows = count_input_rows(source, options)
    spec, created = q.prepare(t.store, t.job, input=source, fingerprint=fingerprint, rows=rows,
                              unit_rows=rows_per_unit, options=options)
    progress = q.job_progress(t.store, t.job)
    if as_json:
        click.echo(json.dumps({"job": t.job, "store": t.store.url, "created": created, "units": spec.units,
                               "rows": spec.rows, "unit_rows": spec.unit_rows, "fingerprint": spec.fingerprint,
                               "units_done": progress.units_done}))
    else:
        verb = "prepared" if created else "already prepared (same input and options)"
        click.echo(f"job {t.job} in {t.store.url}: {verb}: {spec.rows} rows in {spec.units} units of "
                   f"{spec.unit_rows}; {progress.units_done} done")


def _parse_layers(text: str) -> list[int]:
    try:
        return sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise InputError(f'--layers {text}: must be comma-separated layer indices like "6,12", or "all"') from None


# ----------------------------------------------------------------------------------------------------
# work
# ----------------------------------------------------------------------------------------------------


@click.command()
@config_option
@click.option("--store", "store_url", help="Store URL (default: [job] store).")
@click.option("--job", help="Job name (default: [job] name).")
@click.option("--worker-id", help="This worker's name in leases and status (default: host-pid; bootstrap passes "
                                   "the node name).")
@click.option("--lease-seconds", type=click.IntRange(min=1), help="Lease length; renewed every third of it.")
@click.option("--drain-seconds", type=float, default=25.0, show_default=True,
              help="After SIGTERM, how long the current unit may still take before it is abandoned.")
@click.option("--queue-depth", type=click.IntRange(min=1), default=2, show_default=True,
              help="Batches and shards buffered between compute, serialization and upload.")
@json_option
def work(config_path, store_url, job, worker_id, lease_seconds, drain_seconds, queue_depth, as_json):
    """Claim units, extract, commit, until every unit of the job is done (exit 0)."""
    from actfleet.worker.work_loop import Worker, install_sigterm

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    t = _target(config_path, store_url, job)
    spec = q.read_job(t.store, t.job)
    worker_id = worker_id or q.default_worker_id()
    lease = lease_seconds or t.defaults.get("lease_seconds") or DEFAULTS["lease_seconds"]
    start = time.monotonic()
    if q.job_complete(t.store, t.job):  # nothing to do: do not pay for loading the model
        if as_json:
            click.echo(json.dumps({"worker": worker_id, "job": t.job, "units_committed": 0, "units_abandoned": 0,
                                   "tokens": 0, "stopped_by_signal": False, "job_complete": True, "seconds": 0.0}))
        else:
            click.echo(f"worker {worker_id}: job {t.job} is already complete")
        return

    def on_event(kind: str, info: dict) -> None:
        # One line per event on stderr: the journal (and Cloud Logging) on a TPU VM, the chaos test here.
        click.echo(f"{kind} {json.dumps(info)}", err=True)

    w = Worker(t.store, spec, EngineExtractor(spec), worker_id, lease_seconds=lease, queue_depth=queue_depth,
               drain_seconds=drain_seconds, on_event=on_event)
    install_sigterm(w)
    result = w.run()
    secs = time.monotonic() - start
    if as_json:
        click.echo(json.dumps({"worker": worker_id, "job": t.job, **result.__dict__, "seconds": round(secs, 3)}))
    else:
        how = "stopped by signal" if result.stopped_by_signal else "job complete"
        click.echo(f"worker {worker_id}: {how}: {result.units_committed} units committed, "
                   f"{result.units_abandoned} abandoned, {result.tokens} tokens in {secs:.1f}s")


# ----------------------------------------------------------------------------------------------------
# verify
# ----------------------------------------------------------------------------------------------------


@click.command()
@config_option
@click.option("--store", "store_url", help="Store URL (default: [job] store).")
@click.option("--job", help="Job name (default: [job] name).")
@click.option("--clean", is_flag=True, help="Delete garbage: shards no done record lists, leases left on done units.")
@json_option
def verify(config_path, store_url, job, clean, as_json):
    """Prove a job's output: every unit done once, every shard intact, every row stored or skipped."""
    from actfleet.worker.verify import verify as run_verify

    t = _target(config_path, store_url, job)
    rep = run_verify(t.store, t.job, clean=clean)
    if as_json:
        click.echo(json.dumps(rep.to_dict()))
    else:
        skipped = sum(rep.rows_skipped.values())
        click.echo(f"job {rep.job} in {rep.store}")
        click.echo(f"  units   {rep.units_done}/{rep.units_total} done")
        click.echo(f"  rows    {rep.rows} = {rep.rows_stored} stored + {skipped} skipped"
                   + (" (" + ", ".join(f"{k}: {v}" for k, v in sorted(rep.rows_skipped.items())) + ")"
                      if skipped else ""))
        click.echo(f"  tokens  {rep.tokens} in {rep.shards} shards, {rep.bytes} bytes")
        if rep.cleaned:
            click.echo(f"  cleaned {len(rep.cleaned)} garbage objects")
        if rep.in_progress:
            click.echo(f"  in progress: units {', '.join(map(str, rep.in_progress[:20]))}")
        for p in rep.problems[:200]:
            click.echo(f"problem: {p.kind}: {p.message}", err=True)
        if len(rep.problems) > 200:
            click.echo(f"... and {len(rep.problems) - 200} more problems", err=True)
        click.echo("verified: OK" if rep.ok else f"verify: {len(rep.problems)} problems")
    if not rep.ok:
        sys.exit(1)
