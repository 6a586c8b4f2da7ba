"""`actfleet prepare`, `actfleet work`, `actfleet verify`: the work queue's command line (docs/jobs.md).

Each reads the job from fleet.toml ([job]) when there is one; `--store` and `--job` override it, and with
both given (plus, for prepare, `--model` and `--input`) no config file is needed.

Exit codes: 0 done (prepared / job complete or drained on SIGTERM / verified), 1 failure (verify found
problems), 2 bad input (a changed dataset, a missing job, bad options), 74 disk full (a local write failed with
ENOSPC, EDQUOT or EFBIG: the store, a cache; nothing committed is lost), 75 `work` found the store unavailable
outside its claim loop (a GCS outage past the client's retries at start-up or while reading a unit's input:
try again later; systemd restarts it).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click

from actfleet import sites as site_names
from actfleet import work_queue as q
from actfleet.cli import config_option, json_option
from actfleet.config import JobConfig, resolve_path
from actfleet.errors import ActfleetError, ConfigError, InputError, disk_full_is_fatal
from actfleet.job_options import (
    DEFAULT_LEASE_SECONDS,
    DEFAULT_UNIT_ROWS,
    PREPARE,
    BadValue,
    JobOptions,
    implied_positions,
)
from actfleet.quiet import log_to_stderr
from actfleet.store import Store, open_store, unavailable
from actfleet.worker.commands.flags import job_options
from actfleet.worker.engine_extractor import EngineExtractor


@dataclass
class Target:
    store: Store
    job: str
    config: JobConfig | None  # the config's [job] section (None without a config file)


def _target(config_path: str | None, store_url: str | None, job: str | None) -> Target:
    """Config (when present) overridden by --store/--job. Without a config both must be given."""
    from actfleet import config as cfg

    path = resolve_path(config_path)
    if config_path or path.is_file():
        conf = cfg.load(path)
        job_config = conf.job
        store_url, job = store_url or conf.job.store, job or conf.job.name
    else:
        if not store_url:
            raise ConfigError(
                f"{path}: config file not found, and no --store given (pass --store URL, or --config fleet.toml)"
            )
        job_config = None
        job = job or "default"
    return Target(open_store(store_url), job, job_config)


# ----------------------------------------------------------------------------------------------------
# prepare
# ----------------------------------------------------------------------------------------------------


def target_options(f):
    """--config, --store and --job: which job in which store (the three commands' shared way to name it)."""
    f = click.option("--job", help="Job name (default: [job] name).")(f)
    f = click.option(
        "--store", "store_url", help="Store URL: a path, file:///abs or gs://bucket/prefix (default: [job] store)."
    )(f)
    return config_option(f)


@click.command()
@target_options
@job_options(PREPARE)
@json_option
def prepare(config_path, store_url, job, as_json, **flags):
    """Split a dataset into work units in the store (idempotent; a changed dataset is refused)."""
    t = _target(config_path, store_url, job)
    c = t.config
    input_path, unit_rows = flags.pop("input"), flags.pop("unit_rows")
    changes = {k: v for k, v in flags.items() if v is not None and k not in ("sites", "layers", "positions")}
    if flags["sites"] or flags["layers"]:
        changes["sites"] = site_names.from_flags(flags["sites"] or "resid_post", flags["layers"] or "")
    elif c is None:
        raise InputError("prepare: no capture sites: pass --layers (and --sites), or set [job] sites/layers")
    # --context-size implies --positions all; a flag, or [job] positions as written, is the explicit choice.
    base = c.options if c else JobOptions()
    try:
        ctx = changes.get("context_size", base.context_size)
        if flags["positions"] is not None or c is None or c.positions is None:
            changes["positions"] = implied_positions(ctx, flags["positions"])
        else:
            changes["positions"] = implied_positions(ctx, c.positions, f"{resolve_path(config_path)}: job.positions =")
    except BadValue as e:
        raise InputError(f"prepare: {e}") from None
    model = changes.get("model") or (c.options.model if c else "")
    if not model:
        raise InputError("prepare: no model: pass --model or set [job] model")
    source = input_path or (c.input if c else "")
    if not source:
        raise InputError("prepare: no dataset: pass --input or set [job] input")
    if "://" not in source and Path(source).exists():
        source = str(Path(source).resolve())
    if "://" not in model and Path(model).exists():
        changes["model"] = str(Path(model).resolve())
    try:
        options = base.replace(**changes)
    except ValueError as e:
        raise InputError(f"prepare: {e}") from None
    if options.max_tokens:
        raise InputError(
            "prepare: --max-tokens is for `actfleet extract` (a fleet's workers run in parallel); "
            "size a test job with --max-rows"
        )
    rows_per_unit = unit_rows or (c.unit_rows if c else DEFAULT_UNIT_ROWS)
    from actfleet.worker.job_setup import pin_job_inputs
    from actfleet.worker.model_mirror import mirrored

    # A hub model is copied into the store once (by resolved commit): workers read it there, not from the hub.
    pinned = mirrored(pin_job_inputs(options, source), options.model, t.store)
    spec, created = q.prepare(t.store, t.job, unit_rows=rows_per_unit, options=options, **pinned.prepare_args())
    progress = q.job_progress(t.store, t.job)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "job": t.job,
                    "store": t.store.url,
                    "created": created,
                    "units": spec.units,
                    "files": len(spec.input_files or [spec.input]),
                    "rows": spec.rows,
                    "unit_rows": spec.unit_rows,
                    "fingerprint": spec.fingerprint,
                    "input_generation": spec.input_generation,
                    "model_sha256": spec.model_sha256,
                    "units_done": progress.units_done,
                }
            )
        )
    else:
        verb = "prepared" if created else "already prepared (same input and options)"
        click.echo(
            f"job {t.job} in {t.store.url}: {verb}: {spec.rows} rows in {spec.units} units of "
            f"{spec.unit_rows}; {progress.units_done} done"
        )


# ----------------------------------------------------------------------------------------------------
# work
# ----------------------------------------------------------------------------------------------------


@click.command()
@target_options
@click.option(
    "--worker-id",
    help="This worker's name in leases and status (default: host-pid; bootstrap passes "
    "the node name, which every host of a multi-host slice shares).",
)
@click.option("--lease-seconds", type=click.IntRange(min=1), help="Lease length; renewed every third of it.")
@click.option(
    "--drain-seconds",
    type=float,
    default=20.0,
    show_default=True,
    help="After SIGTERM, how long the current unit may still take before it is abandoned; 2 s after that "
    "the process releases its leases and exits even if an upload or engine step still blocks.",
)
@click.option(
    "--queue-depth",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Batches and shards buffered between compute, serialization and upload.",
)
@click.option(
    "--coordinator",
    envvar="ACTFLEET_COORDINATOR",
    help="Multi-host slice: HOST:PORT of process 0 (with --num-processes and --process-id; on a Cloud "
    "TPU VM all three come from the instance metadata).",
)
@click.option(
    "--num-processes",
    type=click.IntRange(min=1),
    envvar="ACTFLEET_NUM_PROCESSES",
    help="Multi-host slice: hosts in the slice (1: a single-host worker, no metadata lookup).",
)
@click.option(
    "--process-id",
    type=click.IntRange(min=0),
    envvar="ACTFLEET_PROCESS_ID",
    help="Multi-host slice: this host's index; 0 holds the lease and writes the shards.",
)
@click.option(
    "--heartbeat-seconds",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    envvar="ACTFLEET_HEARTBEAT_SECONDS",
    help="Multi-host slice: a host silent this long ends every process of the slice (jax.distributed).",
)
@click.option(
    "--stall-seconds",
    type=click.FloatRange(min=0.1),
    default=600.0,
    show_default=True,
    envvar="ACTFLEET_STALL_SECONDS",
    help="Multi-host slice: an engine step (compilation included) running this long ends the leader "
    "(exit 75); its lease is not renewed meanwhile.",
)
@json_option
def work(
    config_path,
    store_url,
    job,
    worker_id,
    lease_seconds,
    drain_seconds,
    queue_depth,
    coordinator,
    num_processes,
    process_id,
    heartbeat_seconds,
    stall_seconds,
    as_json,
):
    """Claim units, extract, commit, until every unit of the job is done (exit 0).

    \b
    Exit codes: 0 job complete, or drained after SIGTERM; 2 bad input (released its unit);
    74 disk full (released its unit; nothing committed is lost); 75 the store was unavailable
    outside the claim loop (which waits an outage out), or a multi-host slice stalled.
    """
    try:
        with disk_full_is_fatal("actfleet work:"):
            _work(
                config_path,
                store_url,
                job,
                worker_id,
                lease_seconds,
                drain_seconds,
                queue_depth,
                coordinator,
                num_processes,
                process_id,
                heartbeat_seconds,
                stall_seconds,
                as_json,
            )
    except Exception as e:
        if isinstance(e, ActfleetError) or not unavailable(e):
            raise
        raise ActfleetError(
            f"store unavailable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (try again later)",
            exit_code=EXIT_STORE_UNAVAILABLE,
        ) from None


EXIT_STORE_UNAVAILABLE = 75  # EX_TEMPFAIL, as a stalled slice's: systemd restarts the worker


def _work(
    config_path,
    store_url,
    job,
    worker_id,
    lease_seconds,
    drain_seconds,
    queue_depth,
    coordinator,
    num_processes,
    process_id,
    heartbeat_seconds,
    stall_seconds,
    as_json,
):
    from actfleet.worker import multihost
    from actfleet.worker.work_loop import Worker, install_sigterm

    log_to_stderr()  # actfleet's records from INFO, other libraries' from WARNING
    t = _target(config_path, store_url, job)
    spec = q.read_job(t.store, t.job)
    worker_id = q.check_worker_id(worker_id) if worker_id else q.default_worker_id()
    lease = lease_seconds or (t.config.lease_seconds if t.config else DEFAULT_LEASE_SECONDS)
    role = multihost.detect(coordinator, num_processes, process_id)
    start = time.monotonic()

    def on_event(kind: str, info: dict) -> None:
        # One line per event on stderr: the journal (and Cloud Logging) on a TPU VM, the chaos test here.
        click.echo(f"{kind} {json.dumps(info)}", err=True)

    def report(out: dict, sentence: str) -> None:
        click.echo(
            json.dumps({"worker": worker_id, "job": t.job, **out, "seconds": round(time.monotonic() - start, 3)})
            if as_json
            else sentence
        )

    channel = None
    if role is not None:
        multihost.initialize(role, heartbeat_seconds=heartbeat_seconds)
        channel = multihost.Channel()
        if not role.leader:
            _follow(channel, spec, role, on_event, report)
            return
    # A single host, or the leader of a slice (which decides for its followers).
    if q.job_complete(t.store, t.job):  # nothing to do: do not pay for loading the model
        if channel is not None:
            channel.send("stop", job_complete=True)
        report(
            {"units_committed": 0, "units_abandoned": 0, "tokens": 0, "stopped_by_signal": False, "job_complete": True},
            f"worker {worker_id}: job {t.job} is already complete",
        )
        return
    if channel is not None:
        channel.send("start")
    try:
        extractor = EngineExtractor(spec)  # the model into its cache: the first thing a small disk cannot hold
    except Exception as e:
        _record_failure(t.store, t.job, worker_id, e)
        raise
    healthy = lambda: True  # noqa: E731
    if role is not None:
        progress = multihost.Progress(stall_seconds)
        multihost.start_watchdog(progress)
        extractor, healthy = multihost.LeaderExtractor(extractor, channel, progress, spec.unit_rows), progress.healthy
    w = Worker(
        t.store,
        spec,
        extractor,
        worker_id,
        lease_seconds=lease,
        queue_depth=queue_depth,
        drain_seconds=drain_seconds,
        on_event=on_event,
        healthy=healthy,
    )
    install_sigterm(w)
    result = w.run()
    if channel is not None:
        channel.send("stop", job_complete=result.job_complete)
    how = "stopped by signal" if result.stopped_by_signal else "job complete"
    report(
        {**result.__dict__, **({"processes": role.num_processes} if role else {})},
        f"worker {worker_id}: {how}: {result.units_committed} units committed, {result.units_abandoned} "
        f"abandoned, {result.tokens} tokens in {time.monotonic() - start:.1f}s",
    )
    if result.stopped_by_signal:
        # Drained: every lease is committed or released, nothing is left to write. The interpreter's teardown
        # (JAX's backends, threads inside an engine step) took seconds of a spot VM's ~30 s notice: skip it.
        from actfleet.worker.work_loop import exit_now

        exit_now()


def _record_failure(store: Store, job: str, worker_id: str, e: Exception) -> None:
    """Before the work loop exists (loading the model): the same lasting `failed` record with its reason that
    Worker.run writes, for the errors that stop the worker for good (bad input, a full disk)."""
    from actfleet.worker.work_loop import is_fatal, one_line

    if not is_fatal(e):
        return
    record = q.WorkerProgress(worker_id, state="failed", started_at=time.time(), reason=str(one_line(e)))
    try:
        q.write_worker_record(store, job, record)
    except Exception as e2:  # best effort: the exit code and the journal still say why
        click.echo(f"actfleet work: the worker record could not be written: {e2}", err=True)


def _follow(channel, spec: q.JobSpec, role, on_event, report) -> None:
    """A follower host of a slice: compute what the leader computes; hold no lease, write nothing."""
    import signal

    from actfleet.worker import multihost

    first = channel.recv()
    if first["kind"] == "stop":  # the job was complete before the model was loaded
        report(
            {"process_id": role.process_id, "units_followed": 0, "job_complete": True},
            f"process {role.process_id}: job {spec.job} is already complete",
        )
        return
    extractor = EngineExtractor(spec)
    q.check_input(spec, extractor.fingerprint())  # the same refusal as the leader's, on this host's own copy
    q.check_model(spec, extractor.model_sha256())
    # SIGTERM (spot notice, systemd stop): the leader drains and says stop; a follower must not leave first.
    signal.signal(signal.SIGTERM, lambda signum, frame: on_event("sigterm-following-leader", {}))
    r = multihost.follow(channel, extractor, on_event)
    report(
        {
            "process_id": role.process_id,
            "units_followed": r.units,
            "steps": r.steps,
            "aborted": r.aborted,
            "job_complete": r.job_complete,
        },
        f"process {role.process_id}: followed {r.units} units ({r.aborted} aborted)"
        + (": job complete" if r.job_complete else ""),
    )


# ----------------------------------------------------------------------------------------------------
# verify
# ----------------------------------------------------------------------------------------------------


@click.command()
@target_options
@click.option(
    "--clean",
    is_flag=True,
    help="Delete garbage: shards and statistics objects of done units their done record does not list, leases "
    "left on done units (safe while workers run). Foreign objects (no key the protocol writes) are reported, never deleted.",
)
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
        click.echo(
            f"  rows    {rep.rows} = {rep.rows_stored} stored + {skipped} skipped"
            + (" (" + ", ".join(f"{k}: {v}" for k, v in sorted(rep.rows_skipped.items())) + ")" if skipped else "")
        )
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
