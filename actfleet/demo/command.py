"""`actfleet local`: the whole system on this machine (docs/local.md; `make demo`).

    actfleet local --workers 3 --chaos 0.05 --out demo-out

1. model     a tiny Qwen2-shaped model with random weights, made on the spot under OUT/tiny-model (and said
             to be random everywhere it is reported), or --model PATH for a real one;
2. prepare   `actfleet prepare` of the dataset (the bundled actfleet/demo/data/tiny_tales.jsonl, or --input) into a
             local filesystem store, OUT/store; idempotent, so running again resumes the same job;
3. fleet     N `actfleet work` processes, kept at N by actfleet.infra.decide.decide() through the local process
             driver (actfleet/demo/process_fleet.py): a dead process is a preempted node and is replaced; --chaos
             RATE SIGKILLs each busy worker (one that has committed a unit since it started and is working on
             another) with probability RATE per second, seeded by --seed;
4. status    a live table while it runs (workers, units, tokens, tokens/s, restarts);
5. verify    actfleet.worker.verify over the finished job, then a summary: units, rows, tokens, shards, bytes,
             tokens/s, restarts, where the shards are and one line of Python to load them.

Ctrl-C stops it cleanly: every worker gets SIGTERM (it stops claiming and releases or finishes its unit),
stragglers get SIGKILL after a grace period, and leases left behind simply expire. Exit codes: 0 verified,
1 a worker kept failing or verify found problems, 2 bad input, 74 a worker found its disk full (it is not
restarted: every restart would meet the same disk; the others are stopped as by Ctrl-C, and one line names
the worker, its error, its log and the filesystem with its free space; free space and run it again to
resume), 130 interrupted (run the same command again to resume).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click

from actfleet.cli import json_option
from actfleet.errors import EXIT_DISK_FULL, ActfleetError, DiskFull, InputError
from actfleet.formatting import human_bytes
from actfleet.job_options import PREPARE, BadValue, implied_positions
from actfleet.worker.commands.flags import as_arguments, job_options

BUNDLED_DATASET = Path(__file__).resolve().parent / "data" / "tiny_tales.jsonl"
TICK_S = 0.5  # how often the driver reconciles (a process's death is noticed within this)
STATUS_EVERY_S = 5.0  # progress lines when the output is not a terminal
MAX_CRASHES_WITHOUT_PROGRESS = 5  # a worker that keeps failing without a unit committed: give up, say why
RANDOM_LABEL = "RANDOM WEIGHTS (tiny demo model: the activations mean nothing)"
# `actfleet prepare`'s options that `local` passes on: which rows of which dataset, how they become samples
# (context windows included) and which positions are stored. Model, sites, layers and unit rows are local's own.
PASSED_TO_PREPARE = (
    "split",
    "subset",
    "dataset_revision",
    "max_rows",
    "format",
    "text_field",
    "messages_field",
    "tokens_field",
    "context_size",
    "separator",
    "prepend_bos",
    "concat",
    "positions",
    "max_seq",
    "long_inputs",
)


@click.command()
@click.option(
    "--workers", type=click.IntRange(1, 64), default=3, show_default=True, help="Worker processes to keep running."
)
@click.option(
    "--chaos",
    type=click.FloatRange(0.0, 1.0),
    default=0.0,
    show_default=True,
    help="Kill each busy worker with this probability per second (SIGKILL, like a spot preemption "
    "without notice). A worker is busy once it has committed a unit and is working on another.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the chaos and the tiny model.")
@click.option(
    "--model",
    "model",
    type=click.Path(file_okay=False),
    help="A Hugging Face model directory (default: a tiny random Qwen2 made under OUT).",
)
@click.option(
    "--input",
    "input_path",
    help="Dataset, anything `actfleet prepare --input` takes: a file (.jsonl[.gz|.zst], .parquet, .csv, .arrow), "
    "a directory or glob of them, a save_to_disk directory, a gs:// URL or a hub dataset id (default: the "
    "bundled actfleet/demo/data/tiny_tales.jsonl).",
)
@click.option(
    "--out",
    "out",
    type=click.Path(file_okay=False),
    default="actfleet-local",
    show_default=True,
    help="Where the model, the store (with the shards) and the worker logs go.",
)
@click.option("--job", default="local", show_default=True, help="Job name in the store.")
@click.option(
    "--layers", default="all", show_default=True, help='Layers to capture: "all" or comma-separated indices like "0,1".'
)
@click.option(
    "--sites",
    default="resid_post",
    show_default=True,
    help="Site kinds (resid_post, attn_out, mlp_out, embed), comma-separated.",
)
@click.option("--unit-rows", type=click.IntRange(min=1), default=25, show_default=True, help="Rows per work unit.")
@click.option(
    "--lease-seconds",
    type=click.IntRange(min=3),
    default=15,
    show_default=True,
    help="Unit lease length: how long a killed worker's unit waits before another takes it over.",
)
@job_options(PREPARE, only=PASSED_TO_PREPARE)
@json_option
def local(workers, chaos, seed, model, input_path, out, job, layers, sites, unit_rows, lease_seconds, as_json, **flags):
    """Run the whole system on this machine: tiny model, bundled dataset, N workers, chaos, verify.

    \b
    The input and window options are `actfleet prepare`'s, passed on to it: run it on your own data, e.g.
    --input org/dataset --split train --context-size 128.

    \b
    Exit codes: 0 verified; 1 workers kept failing or verify found problems;
    2 bad input; 74 a worker found its disk full (not restarted; the others
    are stopped; one line names the filesystem); 130 interrupted (run it
    again to resume)."""
    from actfleet import work_queue as q
    from actfleet.demo.process_fleet import Chaos, ProcessFleet, local_workers, popen_logged
    from actfleet.store import open_store

    # A local path is made absolute (the job pins it; the workers run in OUT); anything else (a glob, a gs://
    # URL, a hub id) goes to prepare as given, which resolves it or refuses it in one line.
    dataset = str(Path(input_path).resolve()) if input_path and Path(input_path).exists() else input_path
    dataset = dataset or str(BUNDLED_DATASET)
    from actfleet.worker import sources

    # What prepare checks first, here before the model is made: a typo fails at once, in one line.
    try:
        implied_positions(flags["context_size"] or 0, flags["positions"])
    except BadValue as e:
        raise InputError(str(e)) from None
    sources.resolve(
        dataset, split=flags["split"] or "train", subset=flags["subset"] or "", revision=flags["dataset_revision"] or ""
    )
    if model and not Path(model).is_dir():
        raise InputError(f"--model {model}: no such directory")
    out_dir = Path(out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    store_dir, log_dir = out_dir / "store", out_dir / "logs"

    # 1. the model
    model_dir, random_weights = _model(model, out_dir, seed)

    # 2. the job (idempotent: a second run finds it prepared and resumes)
    prepared = _prepare(store_dir, job, model_dir, dataset, layers, sites, unit_rows, out_dir, as_arguments(flags))
    _say(
        f"job {job}: {prepared['rows']} rows in {prepared['units']} units of {prepared['unit_rows']}; "
        + ("prepared" if prepared["created"] else f"resuming, {prepared['units_done']} units already done")
    )
    store = open_store(str(store_dir))

    # 3 + 4. the fleet, reconciled until the job is complete
    env = _worker_env(out_dir)

    def spawn(worker, incarnation, log_path):
        argv = [
            sys.executable,
            "-c",
            "from actfleet.cli import main; main()",
            "work",
            "--store",
            str(store_dir),
            "--job",
            job,
            "--worker-id",
            worker.name,
            "--lease-seconds",
            str(lease_seconds),
            "--drain-seconds",
            "5",
        ]
        return popen_logged(argv, log_path, env=env, cwd=out_dir)

    fleet = ProcessFleet(
        local_workers(workers), spawn, log_dir=log_dir, stop_grace_s=15.0, stop_on=frozenset({EXIT_DISK_FULL})
    )
    monkey = Chaos(chaos, seed)
    run = _Run(started=time.monotonic(), tokens_at_start=q.job_progress(store, job).tokens)
    view = _View(as_json)
    _say(
        f"{workers} workers"
        + (f", chaos {chaos:g} per busy worker per second (seed {seed})" if chaos else "")
        + f"; worker logs in {log_dir}"
    )

    _drive(fleet, monkey, store, job, run, view)
    run.seconds = time.monotonic() - run.started

    # 5. verify and summarise
    from actfleet.worker.verify import verify

    report = verify(store, job, clean=True)  # the workers are stopped: dead attempts' shards go
    summary = _summary(report, run, fleet, store_dir, job, model_dir, random_weights, dataset, workers)
    if as_json:
        click.echo(json.dumps(summary, indent=1))
    else:
        _print_summary(summary, report)
    if not report.ok:
        raise ActfleetError(f"verify found {len(report.problems)} problems in job {job} (see above)")


# ----------------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------------


def _say(message: str) -> None:
    """Progress messages go to stderr, so that --json keeps stdout for the one JSON document."""
    click.echo(f"actfleet local: {message}", err=True)


def _model(model: str | None, out_dir: Path, seed: int) -> tuple[Path, bool]:
    """(model dir, random weights?). The tiny model is written once per --out and reused, so a rerun
    resumes the same job (its path is part of the job's pinned options)."""
    if model:
        path = Path(model).resolve()
        if not (path / "config.json").is_file():
            raise InputError(f"--model {model}: no config.json in that directory (need a Hugging Face model dir)")
        return path, _is_random(path)
    path = out_dir / "tiny-model"
    if not (path / "config.json").is_file():
        from actfleet.demo.tiny_model import make_tiny_model

        _say(f"making a tiny Qwen2 model with random weights in {path} (seed {seed})")
        tmp = out_dir / "tiny-model.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        make_tiny_model(tmp, seed=seed)
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)  # whole or absent: an interrupted run never leaves half a model to resume with
    return path, _is_random(path)


def _is_random(model_dir: Path) -> bool:
    try:
        return bool(json.loads((model_dir / "config.json").read_text()).get("actfleet_random_weights"))
    except (OSError, json.JSONDecodeError):
        return False


def _prepare(
    store_dir: Path,
    job: str,
    model_dir: Path,
    dataset: str,
    layers: str,
    sites: str,
    unit_rows: int,
    cwd: Path,
    extra: list[str],
) -> dict:
    """`actfleet prepare --json`, the same command a cloud user runs; its one-line error is passed on."""
    argv = [
        sys.executable,
        "-c",
        "from actfleet.cli import main; main()",
        "prepare",
        "--store",
        str(store_dir),
        "--job",
        job,
        "--model",
        str(model_dir),
        "--input",
        str(dataset),
        "--layers",
        layers,
        "--sites",
        sites,
        "--unit-rows",
        str(unit_rows),
        "--shard-mb",
        "1",
        *extra,
        "--json",
    ]
    # In the caller's directory: a relative --input (a glob, a directory) means what it means there.
    p = subprocess.run(argv, env=_worker_env(cwd), capture_output=True, text=True)
    if p.returncode != 0:
        lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
        message = lines[-1] if lines else f"exited with code {p.returncode}"
        raise ActfleetError(f"prepare failed: {message.removeprefix('actfleet: ')}", exit_code=p.returncode)
    return json.loads(p.stdout.strip().splitlines()[-1])


def _worker_env(out_dir: Path) -> dict:
    """The children's environment: no fleet.toml picked up by accident, and a persistent JAX compilation
    cache so a replaced worker does not compile again."""
    env = dict(os.environ)
    env.pop("ACTFLEET_CONFIG", None)
    env.setdefault("ACTFLEET_JAX_CACHE", str(out_dir / "jax-cache"))  # read by actfleet.worker.engine
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # N workers may share one accelerator
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return env


def _drive(fleet, monkey, store, job: str, run: "_Run", view) -> None:
    """_supervise until the job is done; whatever else ends it (Ctrl-C, a worker's full disk, an error), every
    worker still running is stopped first (SIGTERM: it drains; SIGKILL after the grace)."""
    from actfleet import work_queue as q

    with _sigterm_as_interrupt():
        try:
            with view:
                _supervise(fleet, monkey, store, job, run, view)
        except KeyboardInterrupt:
            with _ignoring_sigint():
                fleet.stop_all()
            p = q.job_progress(store, job)
            raise ActfleetError(
                f"interrupted: {p.units_done}/{p.units_total} units done; workers stopped. Run "
                f"the same command again to resume.",
                exit_code=130,
            ) from None
        except BaseException:
            with _ignoring_sigint():
                fleet.stop_all()
            raise


@dataclass
class _Run:
    started: float
    tokens_at_start: int
    seconds: float = 0.0
    progress: object = None  # the latest actfleet.work_queue.JobProgress


def _supervise(fleet, monkey, store, job, run: _Run, view) -> None:
    """Observe -> decide -> act every tick until the job is complete and every worker has been removed."""
    from actfleet import work_queue as q
    from actfleet.demo.process_fleet import WorkerStopped

    last_tick = time.monotonic()
    last_status = 0.0
    crashes_seen, units_at_last_crash = 0, -1
    baseline: dict = {}
    while True:
        now = time.monotonic()
        for name in monkey.victims(_killable(fleet, run.progress, baseline), now - last_tick):
            fleet.kill(name)
        last_tick = now
        try:
            fleet.reconcile(job_complete=lambda: q.job_complete(store, job))
        except WorkerStopped as e:  # exit 74: a full disk; no restart can help (the caller stops the others)
            raise DiskFull(_disk_full_line(e.slot)) from None
        if now - last_status >= 1.0 or not fleet.slots:
            run.progress = q.job_progress(store, job)
            last_status = now
            view.update(fleet, monkey, run)
        if fleet.failures > crashes_seen:  # a worker died on its own: fine once, not in a loop
            crashes_seen = fleet.failures
            p = run.progress or q.job_progress(store, job)
            _give_up_on_bad_input(fleet)
            if p.units_done != units_at_last_crash:
                units_at_last_crash, streak = p.units_done, 1
            else:
                streak += 1
            if streak >= MAX_CRASHES_WITHOUT_PROGRESS:
                raise ActfleetError(
                    f"workers failed {streak} times in a row without committing a unit; the last "
                    f"one: {_failure_line(fleet.last_failure)}"
                )
        if not fleet.slots and q.job_complete(store, job):
            return
        time.sleep(TICK_S)


def _killable(fleet, progress, baseline: dict) -> list[str]:
    """The workers chaos may kill: those working on a unit whose current process has already committed one.

    Killing a process that is still importing JAX and compiling shows nothing, and on a slow machine it
    could stop the job from ever progressing; killing one in the middle of a later unit shows what matters
    (its lease expires, another worker takes the unit over, the dead attempt's shards are left as garbage).
    `baseline` remembers each process's units_done when it was first seen."""
    if progress is None:
        return []
    out = []
    for name in fleet.running():
        wp, slot = progress.workers.get(name), fleet.slots[name]
        done = wp.units_done if wp else 0
        first = baseline.setdefault((name, slot.incarnation), done)
        fresh = wp is not None and wp.last_heartbeat is not None and wp.last_heartbeat >= slot.since
        if fresh and wp.state == "working" and done > first:
            out.append(name)
    return out


def _give_up_on_bad_input(fleet) -> None:
    """A worker exiting with code 2 found bad input (a changed dataset, a broken model): no restart fixes it."""
    s = fleet.last_failure
    if s is not None and s.proc.returncode == 2:
        raise InputError(f"worker {s.worker.name}: {_failure_line(s)}")


def _disk_full_line(s) -> str:
    """One line for a worker that exited 74: its own error (what it wrote, where), its log, and the
    filesystem that is full with what is left on it (from the first path in its error: the store, a cache)."""
    line = _failure_line(s)
    # An absolute path starts the word ("storing local/shards/x in /data/store" names /data/store, not /shards/x).
    found = re.search(r"(?<![^\s(])/[^\s:;,()'\"]+", line)
    where = Path(found.group() if found else str(s.log_path or "."))
    path = where
    while not path.exists() and path != path.parent:
        path = path.parent
    mount = path.resolve()
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    free = shutil.disk_usage(path).free
    return (
        f"worker {s.worker.name} stopped: {line}; the filesystem of {where} (mounted at {mount}) has "
        f"{human_bytes(free)} free; not restarted (every restart would meet the same disk), the other workers "
        f"were stopped"
    )


def _failure_line(s) -> str:
    """The worker's own last error line from its log, else its exit status."""
    if s is None:
        return "no details"
    how = f"exit code {s.proc.returncode}"
    if s.log_path and s.log_path.is_file():
        lines = [ln for ln in s.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("actfleet:") or "Error" in ln]
        if errors or lines:
            return f"{(errors or lines)[-1].removeprefix('actfleet: ')} ({how}; log {s.log_path})"
    return how


class _sigterm_as_interrupt:
    """SIGTERM and SIGINT stop `actfleet local` like Ctrl-C does (SIGINT too, because a shell starts
    background jobs with SIGINT ignored, and `kill -INT` should still stop it cleanly)."""

    def __enter__(self):
        def handler(signum, frame):
            raise KeyboardInterrupt

        self.old = signal.signal(signal.SIGTERM, handler), signal.signal(signal.SIGINT, handler)

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self.old[0])
        signal.signal(signal.SIGINT, self.old[1])


class _ignoring_sigint:
    """While the workers are being stopped, a second Ctrl-C must not leave them running."""

    def __enter__(self):
        self.old = signal.signal(signal.SIGINT, signal.SIG_IGN), signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.old[0])
        signal.signal(signal.SIGTERM, self.old[1])


# ----------------------------------------------------------------------------------------------------
# The live view: a table on a terminal, a line every few seconds otherwise (logs, CI, --json)
# ----------------------------------------------------------------------------------------------------


class _View:
    def __init__(self, as_json: bool):
        self.live = None
        self.last_line = 0.0
        if not as_json and sys.stdout.isatty():
            from rich.console import Console
            from rich.live import Live

            self.live = Live(console=Console(), refresh_per_second=4, transient=False)

    def __enter__(self):
        if self.live is not None:
            self.live.__enter__()
        return self

    def __exit__(self, *exc):
        if self.live is not None:
            self.live.__exit__(*exc)

    def update(self, fleet, monkey, run: _Run) -> None:
        if self.live is not None:
            self.live.update(_table(fleet, run))
        elif time.monotonic() - self.last_line >= STATUS_EVERY_S:
            self.last_line = time.monotonic()
            p = run.progress
            click.echo(
                f"actfleet local: {p.units_done}/{p.units_total} units, {p.tokens:,} tokens, "
                f"{_rate(run):,.0f} tokens/s, {len(fleet.running())} running, {fleet.restarts} restarts",
                err=True,
            )


def _rate(run: _Run) -> float:
    secs = time.monotonic() - run.started if not run.seconds else run.seconds
    tokens = (run.progress.tokens if run.progress else run.tokens_at_start) - run.tokens_at_start
    return tokens / secs if secs > 0 else 0.0


def _table(fleet, run: _Run):
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    p = run.progress
    now = time.time()
    t = Table(box=None, pad_edge=False)
    for col in ("worker", "process", "pid", "unit", "units", "tokens", "heartbeat", "restarts"):
        t.add_column(col, justify="right" if col in ("pid", "unit", "units", "tokens", "restarts") else "left")
    for w in fleet.desired:
        s = fleet.slots.get(w.name)
        wp = p.workers.get(w.name) if p else None
        alive = s is not None and s.proc.poll() is None
        state = "running" if alive else ("exited" if s is not None else "stopped")
        beat = f"{now - wp.last_heartbeat:.0f}s ago" if wp and wp.last_heartbeat else "-"
        t.add_row(
            w.name,
            f"{state} ({wp.state})" if alive and wp else state,
            str(s.proc.pid) if alive else "-",
            "-" if not (wp and wp.current_unit is not None) else str(wp.current_unit),
            str(wp.units_done if wp else 0),
            f"{wp.tokens if wp else 0:,}",
            beat,
            str(fleet.restarts_of.get(w.name, 0)),
        )
    done, total = (p.units_done, p.units_total) if p else (0, 0)
    head = Text(
        f"units {done}/{total}   tokens {p.tokens if p else 0:,}   {_rate(run):,.0f} tokens/s   "
        f"restarts {fleet.restarts}   {time.monotonic() - run.started:.0f}s",
        style="bold",
    )
    return Group(head, ProgressBar(total=max(total, 1), completed=done, width=60), t)


# ----------------------------------------------------------------------------------------------------
# The summary
# ----------------------------------------------------------------------------------------------------


def _summary(
    report,
    run: _Run,
    fleet,
    store_dir: Path,
    job: str,
    model_dir: Path,
    random_weights: bool,
    dataset: str,
    workers: int,
) -> dict:
    from actfleet import work_queue as q

    shards_dir = store_dir / q.shards_prefix(job)  # a local store: keys are paths under its root
    tokens_this_run = report.tokens - run.tokens_at_start
    kills = sum(1 for e in fleet.events if e.kind == "chaos-kill")
    return {
        "verified": report.ok,
        "problems": [p.message for p in report.problems],
        "job": job,
        "store": str(store_dir),
        "model": str(model_dir),
        "random_weights": random_weights,
        "model_label": RANDOM_LABEL if random_weights else "",
        "dataset": str(dataset),
        "units": report.units_done,
        "units_total": report.units_total,
        "rows": report.rows,
        "rows_stored": report.rows_stored,
        "rows_skipped": report.rows_skipped,
        "tokens": report.tokens,
        "shards": report.shards,
        "bytes": report.bytes,
        "seconds": round(run.seconds, 3),
        "tokens_this_run": tokens_this_run,
        "tokens_per_second": round(tokens_this_run / run.seconds, 1) if run.seconds > 0 else 0.0,
        "workers": workers,
        "restarts": fleet.restarts,
        "chaos_kills": kills,
        "crashes": fleet.failures,
        "garbage_cleaned": len(report.cleaned),  # shards, statistics and leases that killed attempts left behind
        "shards_dir": str(shards_dir),
        "load_snippet": _snippet(shards_dir),
        "load_command": load_command(shards_dir),
    }


def _snippet(shards_dir: Path) -> str:
    return (
        f"from actfleet.worker.reader import load; acts = load({str(shards_dir)!r}); "
        f"print({{k: (v.shape, str(v.dtype)) for k, v in acts.items()}})"
    )


def load_command(shards_dir: Path) -> str:
    """A shell command that loads the shards: the snippet run by this interpreter (the one with actfleet
    installed), since a bare `python` on PATH is often another one (the system's) that has no actfleet."""
    import shlex

    return f"{shlex.quote(sys.executable)} -c {shlex.quote(_snippet(shards_dir))}"


def _print_summary(s: dict, report) -> None:
    skipped = sum(s["rows_skipped"].values())
    why = ", ".join(f"{k}: {v}" for k, v in sorted(s["rows_skipped"].items()))
    model = s["model"] + (f"  [{s['model_label']}]" if s["random_weights"] else "")
    lines = [
        "",
        f"job {s['job']}: " + ("verified OK" if s["verified"] else f"verify found {len(s['problems'])} problems"),
        f"  model     {model}",
        f"  dataset   {s['dataset']}",
        f"  units     {s['units']}/{s['units_total']} done",
        f"  rows      {s['rows']:,} = {s['rows_stored']:,} stored + {skipped:,} skipped" + (f" ({why})" if why else ""),
        f"  tokens    {s['tokens']:,} in {s['shards']:,} shards, {human_bytes(s['bytes'])} ({s['bytes']:,} bytes)",
        f"  speed     {s['tokens_per_second']:,.0f} tokens/s ({s['tokens_this_run']:,} tokens in {s['seconds']:.0f} s, "
        f"{s['workers']} workers)"
        if s["tokens_this_run"]
        else "  speed     - (nothing left to do: the job was already complete)",
        f"  restarts  {s['restarts']} ({s['chaos_kills']} chaos kills, {s['crashes']} crashes; "
        f"{s['garbage_cleaned']} leftovers of killed attempts cleaned)",
        f"  shards    {s['shards_dir']}",
        f"  load them {s['load_command']}",
    ]
    for line in lines:
        click.echo(line)
    for p in report.problems[:20]:
        click.echo(f"problem: {p.kind}: {p.message}", err=True)
