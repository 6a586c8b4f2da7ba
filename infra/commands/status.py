"""`actfleet status`: every worker's state and the job's progress in one table.

    worker  zone  queued resource  node  health  units  tokens  shards  last heartbeat

`health` is the action reconcile plans for the worker right now (healthy, pending, wait, report, create,
replace, remove, delete-orphan): the same plan (infra/plan.py) on the same inputs (infra/reconcile.py:
observe_inputs). Totals, throughput and the ETA go underneath. Works with what exists: the fleet alone (no job
prepared yet, or no store reachable), the job alone (TPU API unreachable; or no fleet.toml at all, with
`--store URL --job NAME`), or both.
`--watch SECONDS` redraws in place (rich Live); `--json` prints one document (schema
"actfleet.status/v1", docs/operations.md).

It reads only: the TPU API's lists (and the GETs reconcile would confirm with), the job's small JSON
records, reconcile's memory and Terraform's state document. It never imports cdktf, Terraform, JAX or
torch, so it starts in about a second.
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import click

from actfleet.cli import config_option, json_option
from actfleet.config import Config, load, resolve_path
from actfleet.errors import ActfleetError, ConfigError
from actfleet.formatting import human_bytes, iso_utc, one_line
from actfleet.work_queue import CLOCK_SKEW_BOUND_S, clock_skew_line

SCHEMA_ID = "actfleet.status/v1"


@dataclass
class Snapshot:
    """What `status` shows, gathered once."""

    fleet: str
    taken_at: float
    rows: list[dict[str, Any]] = field(default_factory=list)
    unreachable: dict[str, str] = field(default_factory=dict)
    fleet_error: str | None = None
    job: dict[str, Any] | None = None  # totals from actfleet.work_queue.job_progress, or None
    job_error: str | None = None
    throughput: dict[str, Any] = field(default_factory=dict)
    # How `health` was planned: whether it was (planned), and the inputs it was planned on, as reconcile's
    # report shows them (managed: Terraform's state; job; workers: the worker records; confirmed: found by
    # a GET; errors: what could not be read, and so was treated as reconcile treats it).
    plan: dict[str, Any] = field(
        default_factory=lambda: {
            "planned": False,
            "managed": None,
            "job": None,
            "workers": None,
            "confirmed": [],
            "errors": [],
        }
    )

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_ID,
            "fleet": self.fleet,
            "taken_at": iso_utc(self.taken_at),
            "workers": self.rows,
            "unreachable": self.unreachable,
            "fleet_error": self.fleet_error,
            "job": self.job,
            "job_error": self.job_error,
            "throughput": self.throughput,
            "plan": self.plan,
        }


def take_snapshot(
    cfg: Config, *, api=None, store=None, job_name: str | None = None, with_job: bool = True, now: float | None = None
) -> Snapshot:
    """Observe the fleet and plan it as reconcile would, and read the job's progress (each optional, each
    failing on its own). The plan is reconcile's own (infra/plan.py) on the inputs reconcile reads
    (observe_inputs: the same zones, confirming GETs, memory, Terraform's managed set, job-complete and
    worker records); `job_name` (`--job`) changes the progress shown, not the job the plan reads."""
    from actfleet.infra.decide import Policy
    from actfleet.infra.plan import plan
    from actfleet.infra.reconcile import managed_workers, observe_inputs
    from actfleet.infra.release_id import release_id

    now = time.time() if now is None else now
    snap = Snapshot(fleet=cfg.fleet.id, taken_at=now)
    rows: dict[str, dict[str, Any]] = {}

    def row(name: str, zone: str) -> dict[str, Any]:
        return rows.setdefault(name, _new_row(name, zone))

    for w in cfg.fleet.workers:
        row(w.name, w.zone)["desired"] = True

    def observe():
        try:
            managed, not_planned = managed_workers(cfg), None
        except ActfleetError as e:  # reconcile fails on this too: show the cloud, plan nothing
            managed, not_planned = frozenset(), f"not planned: reconcile cannot plan either: {e}"
        return observe_inputs(cfg, api, managed=managed, read_job=with_job), not_planned

    def progress():
        from actfleet.store import open_store
        from actfleet.work_queue import job_progress

        return job_progress(store or open_store(cfg.job.store), job_name or cfg.job.name, now=now)

    with ThreadPoolExecutor(max_workers=2) as pool:  # the two sources answer at once
        fleet_f = pool.submit(observe)
        job_f = pool.submit(progress) if with_job else None
        try:
            inputs, not_planned = fleet_f.result()
        except Exception as e:  # no credentials, API down: show the job anyway
            inputs, snap.fleet_error = None, one_line(e, 400)
            snap.plan["errors"].append("not planned: the fleet could not be observed")
        progress_result = None
        if job_f is not None:
            try:
                progress_result = job_f.result()
            except Exception as e:
                snap.job_error = one_line(e, 400)

    if inputs is not None:
        snap.unreachable = dict(inputs.unreachable)
        snap.plan.update(
            planned=not_planned is None,
            managed=None if not_planned else sorted(inputs.managed),
            job=inputs.job,
            workers=inputs.workers,
            confirmed=inputs.confirmed,
            errors=([not_planned] if not_planned else []) + inputs.errors,
        )
        if not_planned is None:
            p = plan(
                cfg.fleet.workers,
                inputs.observed,
                now,
                Policy.from_config(cfg),
                history=inputs.history,
                unreachable_zones=frozenset(inputs.unreachable),
                managed=inputs.managed,
                job_complete=inputs.job_complete,
                liveness=inputs.liveness,
                release=release_id(cfg),
                releases=inputs.releases,
            )
            for a in p.actions:
                r = row(a.worker, a.zone)
                r["health"], r["reason"] = a.kind, a.reason
            snap.plan["rollout"] = p.rollout
            if p.rollout.get("halted"):  # the one line an operator must see (reconcile exits 1 on it too)
                snap.plan["errors"].append(p.rollout["halt"])
        for name, o in inputs.observed.items():
            if name in rows:
                r = rows[name]
                node = inputs.view.nodes.get(name)
                # gce mode: Compute Engine's own status word (decide reads it mapped: infra/gce_states.py)
                r["qr_state"], r["node_state"] = o.qr_state, getattr(node, "status", "") or o.node_state
                r["node_health"] = (node.health or None) if node else None

    if progress_result is not None:
        _add_progress(snap, progress_result, row, lambda: store or _open(cfg), job_name or cfg.job.name)

    snap.rows = sorted(rows.values(), key=lambda r: (r["zone"] or "~", r["worker"]))
    return snap


def _new_row(name: str, zone: str) -> dict[str, Any]:
    return {
        "worker": name,
        "zone": zone,
        "qr_state": None,
        "node_state": None,
        "node_health": None,
        "health": None,
        "reason": None,
        "desired": False,
        "units_done": None,
        "tokens": None,
        "shards": None,
        "last_heartbeat": None,
        "current_unit": None,
        "work_state": None,
        "clock_skew": None,
    }


def _add_progress(snap: Snapshot, p, row, store, job: str) -> None:
    """The job's totals, each worker's record and the throughput (with the ETA) into the snapshot."""
    snap.job = {k: v for k, v in p.to_dict().items() if k != "workers"}
    for name, wp in p.workers.items():
        r = row(name, "")
        r.update(
            units_done=wp.units_done,
            tokens=wp.tokens,
            shards=wp.shards,
            last_heartbeat=wp.last_heartbeat,
            current_unit=wp.current_unit,
            work_state=wp.state,
            clock_skew=wp.clock_skew,
        )
    if p.prepared and p.units_done:
        snap.throughput = _job_throughput(store(), job, p.tokens)
        if snap.throughput and not p.complete:
            # The units still to do at the job-long pace so far (units per second across the whole fleet).
            rate = p.units_done / snap.throughput["seconds"]
            snap.throughput["eta_s"] = (p.units_total - p.units_done) / rate
            snap.throughput["eta"] = iso_utc(snap.taken_at + snap.throughput["eta_s"])


def take_job_snapshot(store, job: str, *, now: float | None = None) -> Snapshot:
    """The job alone, from its store (no fleet.toml, no TPU API): progress, worker records, throughput, ETA.
    A store that cannot be read is job_error, as in take_snapshot."""
    from actfleet.work_queue import job_progress

    now = time.time() if now is None else now
    snap = Snapshot(fleet="", taken_at=now)
    snap.plan["errors"].append("not planned: no fleet.toml (the job alone, from --store)")
    rows: dict[str, dict[str, Any]] = {}

    def row(name: str, zone: str) -> dict[str, Any]:
        return rows.setdefault(name, _new_row(name, zone))

    try:
        _add_progress(snap, job_progress(store, job, now=now), row, lambda: store, job)
    except Exception as e:
        snap.job_error = one_line(e, 400)
    snap.rows = sorted(rows.values(), key=lambda r: r["worker"])
    return snap


def _open(cfg: Config):
    from actfleet.store import open_store

    return open_store(cfg.job.store)


def _job_throughput(store, job: str, tokens: int) -> dict[str, Any]:
    """Tokens per second over the job so far: from the first unit's start to the last commit (done records
    carry committed_at and the attempt's seconds)."""
    from actfleet.work_queue import DONE, done_record, list_units

    keys = list_units(store, job, DONE).units  # canonical keys only: a copied done/000001.old is not a unit

    def read(item):
        try:
            return done_record(store.read(item[1])[0], item[1], item[0])
        except ActfleetError:  # NotFound too: removed since the listing
            return None

    with ThreadPoolExecutor(max_workers=16) as pool:
        records = [r for r in pool.map(read, keys.items()) if r is not None]
    if not records:
        return {}
    first = min(r.committed_at - r.seconds for r in records)
    last = max(r.committed_at for r in records)
    span = max(last - first, 1e-9)
    return {"tokens_per_s": tokens / span, "since": iso_utc(first), "last_commit": iso_utc(last), "seconds": span}


# ----------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------


@click.command("status")
@config_option
@json_option
@click.option(
    "--watch",
    "watch_s",
    type=click.FloatRange(min=0.5),
    default=None,
    metavar="SECONDS",
    help="Refresh in place every SECONDS until interrupted.",
)
@click.option(
    "--store",
    default=None,
    metavar="URL",
    help="Read the job from this store (default: job.store). Without a fleet.toml: the job alone, from here.",
)
@click.option("--job", "job_name", default=None, help="Job name (default: job.name; without a fleet.toml: default).")
@click.option("--no-job", is_flag=True, help="Show the fleet only; do not read the work queue.")
def status(config_path, as_json, watch_s, store, job_name, no_job):
    """Show every worker's state and the job's progress.

    \b
    One row per worker: zone, queued-resource and node state, health (what
    reconcile would do), units done, tokens, shards, last heartbeat; totals
    and throughput (and the ETA) underneath. Without a fleet.toml,
    `--store URL --job NAME` shows the job alone: its workers' records,
    progress, throughput and ETA. Exit code 0, or 1 when the fleet and the
    job could both not be read (without a fleet.toml: the job).
    """
    with_job = not no_job
    path = resolve_path(config_path)
    if config_path or path.is_file():
        cfg = load(config_path)
        if store:
            cfg = cfg.replace("job", store=store)

        def take() -> Snapshot:
            return take_snapshot(cfg, job_name=job_name, with_job=with_job)

        def failed(snap: Snapshot) -> bool:
            return bool(snap.fleet_error and (snap.job_error or not with_job))
    else:  # no fleet.toml: the job alone, read from --store (a path, file:// or gs://)
        if not store:
            raise ConfigError(
                f"{path}: config file not found, and no --store given (pass --store URL --job NAME for a job's "
                f"progress alone, or --config fleet.toml)"
            )
        if no_job:
            raise ConfigError(f"--no-job: without a fleet.toml ({path} not found) there is only the job to show")
        from actfleet.store import open_store

        job_store, name = open_store(store), job_name or "default"

        def take() -> Snapshot:
            return take_job_snapshot(job_store, name)

        def failed(snap: Snapshot) -> bool:
            return snap.job_error is not None

    if watch_s is None:
        snap = take()
        if as_json:
            click.echo(json.dumps(snap.to_dict(), indent=2))
        else:
            _console().print(render(snap))
        sys.exit(1 if failed(snap) else 0)

    from rich.live import Live

    previous: Snapshot | None = None
    try:
        if as_json:  # JSON Lines, one snapshot per refresh
            while True:
                snap = take()
                _recent(snap, previous)
                click.echo(json.dumps(snap.to_dict()))
                previous = snap
                time.sleep(watch_s)
        with Live(console=_console(), auto_refresh=False, screen=False) as live:
            while True:
                snap = take()
                _recent(snap, previous)
                live.update(render(snap), refresh=True)
                previous = snap
                time.sleep(watch_s)
    except KeyboardInterrupt:
        sys.exit(0)


def _console():
    """A terminal's own width; when piped (logs, cron mail) wide enough that no column is cut."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=240)


def _recent(snap: Snapshot, previous: Snapshot | None) -> None:
    """With --watch: tokens/s between the last two refreshes, next to the job-long average."""
    if previous is None or not snap.job or not previous.job:
        return
    dt = snap.taken_at - previous.taken_at
    if dt > 0:
        snap.throughput["recent_tokens_per_s"] = (snap.job["tokens"] - previous.job["tokens"]) / dt


def render(snap: Snapshot):
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    styles = {
        "healthy": "green",
        "pending": "cyan",
        "wait": "yellow",
        "report": "bold yellow",
        "create": "red",
        "replace": "bold red",
        "remove": "red",
        "delete-orphan": "magenta",
    }
    table = Table(
        title=(f"fleet {snap.fleet}" if snap.fleet else "job workers (no fleet.toml)")
        + f" at {iso_utc(snap.taken_at)}",
        title_justify="left",
        box=None,
        header_style="bold",
        pad_edge=False,
    )
    for col, just in (
        ("worker", "left"),
        ("zone", "left"),
        ("queued resource", "left"),
        ("node", "left"),
        ("health", "left"),
        ("units", "right"),
        ("tokens", "right"),
        ("shards", "right"),
        ("last heartbeat", "right"),
    ):
        table.add_column(col, justify=just, no_wrap=True)
    for r in snap.rows:
        health = r["health"] or ("-" if r["desired"] else "not a fleet worker")
        table.add_row(
            r["worker"],
            r["zone"] or "-",
            r["qr_state"] or "-",
            r["node_state"] or "-",
            Text(health, style=styles.get(health, "")),
            _n(r["units_done"]),
            _n(r["tokens"]),
            _n(r["shards"]),
            _ago(r["last_heartbeat"], snap.taken_at),
        )
    lines = []
    healthy = sum(1 for r in snap.rows if r["health"] == "healthy")
    desired = sum(1 for r in snap.rows if r["desired"])
    if snap.fleet:
        lines.append(f"workers: {healthy}/{desired} healthy")
    if snap.unreachable:
        lines.append("unreachable zones: " + "; ".join(f"{z}: {m}" for z, m in snap.unreachable.items()))
    if snap.fleet_error:
        lines.append(f"fleet: could not be observed: {snap.fleet_error}")
    elif snap.plan["errors"] and snap.fleet:  # unreachable zones are on their own line above
        lines.extend(
            f"plan: {e}" for e in snap.plan["errors"] if not e.startswith(tuple(f"zone {z} " for z in snap.unreachable))
        )
    if snap.job is not None:
        j = snap.job
        if not j["prepared"]:
            lines.append(f"job {j['job']}: not prepared (run `actfleet prepare`)")
        else:
            pct = 100.0 * j["units_done"] / j["units_total"] if j["units_total"] else 100.0
            lines.append(
                f"job {j['job']}: {j['units_done']}/{j['units_total']} units ({pct:.1f}%), "
                f"{j['units_leased']} in progress, {_n(j['tokens'])} tokens, {_n(j['shards'])} shards, "
                f"{human_bytes(j['bytes'])}" + (" - complete" if j["complete"] else "")
            )
            if j.get("foreign") or j.get("bad_records"):
                lines.append(
                    f"  not counted: {j.get('foreign', 0)} foreign objects under done/ and leases/ (no unit's key), "
                    f"{j.get('bad_records', 0)} unreadable done records: `actfleet verify` lists them"
                )
    elif snap.job_error:
        lines.append(f"job: could not be read: {snap.job_error}")
    for r in snap.rows:
        if r.get("clock_skew") is not None and abs(r["clock_skew"]) > CLOCK_SKEW_BOUND_S:
            lines.append("warning: " + clock_skew_line("worker " + r["worker"], r["clock_skew"]))
    t = snap.throughput
    if t:
        line = f"throughput: {_n(round(t['tokens_per_s']))} tokens/s since {t['since']}"
        if "recent_tokens_per_s" in t:
            line += f" ({_n(round(t['recent_tokens_per_s']))} tokens/s since the last refresh)"
        lines.append(line)
        if "eta_s" in t:
            lines.append(f"eta: {t['eta']} (in {_duration(t['eta_s'])}, at the pace so far)")
    return Group(table, Text(""), *(Text(x) for x in lines))


def _n(v) -> str:
    return "-" if v is None else f"{v:,}"


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


def _ago(t: float | None, now: float) -> str:
    if t is None:
        return "-"
    s = max(0.0, now - t)
    return f"{s:.0f} s ago" if s < 120 else f"{s / 60:.0f} min ago" if s < 7200 else f"{s / 3600:.1f} h ago"


__all__ = ["status", "take_snapshot", "take_job_snapshot", "render", "Snapshot", "SCHEMA_ID"]
