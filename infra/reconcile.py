"""One reconcile pass: observe -> decide -> act -> report (docs/operations.md).

    report = reconcile_pass(cfg)              # takes the lock, acts, releases it
    report = reconcile_pass(cfg, dry_run=True)  # observes and decides only
    print(report.to_json())

- observe:  list queued resources and nodes in every zone (infra/observe.py), confirm with a GET any
            worker a listing left out that should exist, read which workers Terraform's state holds (the
            state file itself: no terraform process), the workers' own records in the job's store (boot
            and heartbeat rules), whether the job is complete (`reconcile.watch_job`), and the memory the
            last pass left (when each worker entered its state; the backoff of failing creates).
- decide:   infra/plan.py (settle -> history -> decide, pure), the plan `actfleet status` also shows: it
            reads the same inputs through observe_inputs below.
- act:      delete orphans through the TPU API (deletes confirmed); then, only if a worker must be created,
            replaced or removed, exactly ONE `terraform apply` of the fleet stack carrying every -replace=
            of the pass. A pass with nothing to do runs no terraform and never imports cdktf.
- remember: save the memory for the next pass, next to the reconcile lock (not in --dry-run).
- report:   a PassReport: the actions with their reasons, what was done, what failed (JSON schema v1,
            docs/operations.md).

One actor at a time: the pass holds the reconcile lock (infra/lock.py) from before observing until after
acting; Terraform's own state lock guards the state underneath. A pass that finds the lock held returns a
report with outcome "locked" naming the holder (exit 0).

Partial failure: a zone whose API calls fail after retries is reported and left alone (decide says
"wait" for everything in it) while the other zones are repaired; a Terraform failure ends the pass with
Terraform's error summary, outcome "failed", exit 1, and the lock released.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from actfleet.config import Config, zone_of
from actfleet.errors import ActfleetError
from actfleet.formatting import iso_utc, one_line
from actfleet.infra.decide import (
    APPLY_KINDS,
    CREATE,
    DELETE_ORPHAN,
    DRAIN,
    ERROR_CLASSES,
    HOLD,
    KINDS,
    REPLACE,
    ROLLOUT,
    WAIT,
    Action,
    Liveness,
    Observed,
    Policy,
    Remembered,
    WorkRecord,
    failure,
    needs_apply,
    remember,
)
from actfleet.infra.lock import LockHeld, ReconcileLock, lock_location
from actfleet.infra.observe import FleetView, fleet_api, observe_fleet, observed_from
from actfleet.infra.plan import plan
from actfleet.infra.release_id import release_id
from actfleet.infra.rollout import ReleaseMemory
from actfleet.infra.terraform_layout import FLEET, WORKERS, held_gce_spec, state_location, worker_address
from actfleet.infra.tpu_states import QR_ACTIVE

SCHEMA_ID = "actfleet.reconcile/v1"

# Outcomes, and the exit code each gives (README "Exit codes": 0 ok, 1 failure).
CONVERGED, REPAIRED, PLANNED, LOCKED, FAILED = "converged", "repaired", "planned", "locked", "failed"


@dataclass
class PassReport:
    fleet: str
    config: str
    dry_run: bool
    started_at: float
    outcome: str = CONVERGED
    seconds: float = 0.0
    actions: list[Action] = field(default_factory=list)
    unreachable: dict[str, str] = field(default_factory=dict)  # zone -> error
    zones: list[str] = field(default_factory=list)
    api_calls: int = 0
    observe_seconds: float = 0.0
    managed: list[str] = field(default_factory=list)  # workers in Terraform's state before the pass
    job: dict[str, Any] = field(default_factory=lambda: {"watched": False, "complete": None, "error": None})
    terraform: dict[str, Any] = field(
        default_factory=lambda: {
            "ran": False,
            "command": None,
            "replace": [],
            "targets": [],
            "seconds": 0.0,
            "error": None,
        }
    )
    # Deleted through the TPU API: orphans, and broken resources Terraform's state does not hold.
    api_deletes: dict[str, Any] = field(default_factory=lambda: {"deleted": [], "failed": {}})
    lock: dict[str, Any] | None = None  # who held the lock this pass (us), and whom we took it over from
    locked_by: dict[str, Any] | None = None  # outcome "locked": who holds it
    # The job's worker records as the boot and heartbeat rules read them.
    workers: dict[str, Any] = field(default_factory=lambda: {"judged": False, "records": 0, "error": None})
    # Replacements counted since the memory began: preemptions apart from errors (by class).
    restarts: dict[str, Any] = field(default_factory=lambda: {"preemptions": 0, "errors": 0, "by_class": {}})
    confirmed: list[str] = field(default_factory=list)  # left out of a listing, found by a GET
    # infra/rollout.py's view: release, halted, wave, waiting_for, old/new release per worker.
    rollout: dict[str, Any] = field(default_factory=lambda: {"release": None})
    drains: dict[str, Any] = field(default_factory=lambda: {"requested": [], "failed": {}})  # drain objects
    errors: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.outcome == FAILED or self.errors else 0

    @property
    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(a.kind for a in self.actions).items()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_ID,
            "fleet": self.fleet,
            "config": self.config,
            "dry_run": self.dry_run,
            "started_at": iso_utc(self.started_at),
            "seconds": round(self.seconds, 3),
            "outcome": self.outcome,
            "exit_code": self.exit_code,
            "lock": self.lock,
            "locked_by": self.locked_by,
            "observe": {
                "zones": self.zones,
                "unreachable": self.unreachable,
                "api_calls": self.api_calls,
                "seconds": round(self.observe_seconds, 3),
            },
            "managed": self.managed,
            "job": self.job,
            "workers": self.workers,
            "counts": self.counts,
            "actions": [_action_dict(a) for a in self.actions],
            "restarts": self.restarts,
            "confirmed": self.confirmed,
            "terraform": {**self.terraform, "seconds": round(self.terraform["seconds"], 3)},
            "api_deletes": self.api_deletes,
            "rollout": self.rollout,
            "drains": self.drains,
            "errors": self.errors,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


def _action_dict(a: Action) -> dict[str, Any]:
    d = asdict(a)
    d["next_attempt"] = iso_utc(a.next_attempt) if a.next_attempt is not None else None
    return d


# The --json report, as a JSON Schema (docs/operations.md explains each field). Stable: fields are only
# ever added; a breaking change gets a new SCHEMA_ID.
_ERROR = {
    "type": ["object", "null"],
    "required": ["code", "message", "class"],
    "properties": {"code": {"type": "string"}, "message": {"type": "string"}, "class": {"enum": list(ERROR_CLASSES)}},
}
_ACTION = {
    "type": "object",
    "required": ["worker", "zone", "kind", "reason", "error", "next_attempt", "cause"],
    "properties": {
        "worker": {"type": "string"},
        "zone": {"type": "string"},
        "kind": {"enum": list(KINDS)},
        "reason": {"type": "string"},
        "error": _ERROR,
        "next_attempt": {"type": ["string", "null"]},
        "cause": {"enum": [None, "preemption", "error", "rollout"]},
    },
}
REPORT_JSON_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": SCHEMA_ID,
    "type": "object",
    "required": [
        "schema",
        "fleet",
        "config",
        "dry_run",
        "started_at",
        "seconds",
        "outcome",
        "exit_code",
        "lock",
        "locked_by",
        "observe",
        "managed",
        "job",
        "workers",
        "counts",
        "actions",
        "restarts",
        "confirmed",
        "terraform",
        "api_deletes",
        "rollout",
        "drains",
        "errors",
    ],
    "properties": {
        "schema": {"const": SCHEMA_ID},
        "fleet": {"type": "string"},
        "config": {"type": "string"},
        "dry_run": {"type": "boolean"},
        "started_at": {"type": "string"},
        "seconds": {"type": "number"},
        "outcome": {"enum": [CONVERGED, REPAIRED, PLANNED, LOCKED, FAILED]},
        "exit_code": {"enum": [0, 1]},
        "lock": {"type": ["object", "null"]},
        "locked_by": {
            "type": ["object", "null"],
            "required": ["holder", "host", "pid", "since", "expires", "command", "describe"],
        },
        "observe": {
            "type": "object",
            "required": ["zones", "unreachable", "api_calls", "seconds"],
            "properties": {
                "zones": {"type": "array", "items": {"type": "string"}},
                "unreachable": {"type": "object", "additionalProperties": {"type": "string"}},
                "api_calls": {"type": "integer"},
                "seconds": {"type": "number"},
            },
        },
        "managed": {"type": "array", "items": {"type": "string"}},
        "job": {"type": "object", "required": ["watched", "complete", "error"]},
        "workers": {"type": "object", "required": ["judged", "records", "error"]},
        "restarts": {"type": "object", "required": ["preemptions", "errors", "by_class"]},
        "confirmed": {"type": "array", "items": {"type": "string"}},
        "counts": {"type": "object", "additionalProperties": {"type": "integer"}},
        "actions": {"type": "array", "items": _ACTION},
        "terraform": {
            "type": "object",
            "required": ["ran", "command", "replace", "targets", "seconds", "error"],
            "properties": {
                "ran": {"type": "boolean"},
                "command": {"enum": [None, "apply", "destroy"]},
                "replace": {"type": "array", "items": {"type": "string"}},
                "targets": {"type": "array", "items": {"type": "string"}},
                "seconds": {"type": "number"},
                "error": {"type": ["string", "null"]},
            },
        },
        "api_deletes": {"type": "object", "required": ["deleted", "failed"]},
        "rollout": {"type": "object", "required": ["release"]},
        "drains": {"type": "object", "required": ["requested", "failed"]},
        "errors": {"type": "array", "items": {"type": "string"}},
    },
}


def reconcile_pass(
    cfg: Config,
    *,
    dry_run: bool = False,
    wait_for_lock: bool = False,
    lock: ReconcileLock | None = None,
    api=None,
    clock: Callable[[], float] = time.time,
    apply: Callable[..., None] | None = None,
    retry_now: bool = False,
) -> PassReport:
    """One pass. `api` (a TpuApi), `lock`, `apply` and `clock` can be injected (tests, benchmarks); by
    default they come from the config. `retry_now` ignores the backoff of failing creates this pass.
    Never raises for expected failures: they are in the report."""
    report = PassReport(fleet=cfg.fleet.id, config=cfg.source, dry_run=dry_run, started_at=clock())
    started = time.perf_counter()
    try:
        if dry_run:
            _observe_decide_act(cfg, report, api, clock, None, apply, retry_now)
        else:
            lock = lock or ReconcileLock.for_config(cfg)
            try:
                lock.acquire(wait=wait_for_lock)
            except LockHeld as e:
                report.outcome = LOCKED
                report.locked_by = e.info.to_json() | {"describe": e.info.describe()}
                return report
            try:
                report.lock = {
                    "holder": lock.info.holder,
                    "pid": lock.info.pid,
                    "where": lock.where,
                    "took_over_from": lock.took_over.to_json() if lock.took_over else None,
                }
                _observe_decide_act(cfg, report, api, clock, lock, apply, retry_now)
            finally:
                lock.release()
    except ActfleetError as e:
        report.outcome = FAILED
        report.errors.append(str(e))
    finally:
        report.seconds = time.perf_counter() - started
    return report


def _observe_decide_act(
    cfg: Config,
    report: PassReport,
    api,
    clock,
    lock: ReconcileLock | None,
    apply: Callable[..., None] | None,
    retry_now: bool = False,
) -> None:
    # -- observe ------------------------------------------------------------------------------------
    triggers = fleet_state_workers(cfg)
    managed = frozenset(triggers)
    report.managed = sorted(managed)
    report.zones = fleet_zones(cfg, managed)
    inputs = observe_inputs(cfg, api, managed=managed)
    api, view = inputs.api, inputs.view
    report.unreachable, report.observe_seconds = inputs.unreachable, view.seconds
    report.api_calls, report.confirmed = inputs.api_calls, inputs.confirmed
    report.job, report.workers = inputs.job, inputs.workers
    report.errors.extend(inputs.errors)

    # -- decide (infra/plan.py: the same plan `actfleet status` shows) --------------------------------
    now = clock()
    policy = Policy.from_config(cfg)
    if retry_now:
        policy = replace(policy, retry_now=True)
    unreachable, job_complete = inputs.unreachable, inputs.job_complete
    p = plan(
        cfg.fleet.workers,
        inputs.observed,
        now,
        policy,
        history=inputs.history,
        unreachable_zones=frozenset(unreachable),
        managed=managed,
        job_complete=job_complete,
        liveness=inputs.liveness,
        release=release_id(cfg),
        releases=inputs.releases,
    )
    actions, history, observed, releases = p.actions, p.history, p.observed, p.releases
    report.actions = actions
    report.rollout = p.rollout
    if p.rollout.get("halted"):
        report.errors.append(p.rollout["halt"])
    acting = [a for a in actions if a.acts]
    _count_restarts(report, history)
    if not acting:
        report.outcome = CONVERGED
        if not report.dry_run:
            memory = remember(history, observed, actions, now, acted=False)
            # A converged pass usually remembers exactly what it read: no write (10,000 workers' worth).
            if memory != inputs.history or releases != inputs.releases:
                save_memory(cfg, memory, report, releases)
        return
    if report.dry_run:
        report.outcome = PLANNED
        return

    # -- act ----------------------------------------------------------------------------------------
    lock.check()
    orphans = [a for a in actions if a.kind == DELETE_ORPHAN]
    # A broken resource Terraform does not manage (state lost it) is deleted here; the apply recreates it.
    strays = [a for a in actions if a.kind == REPLACE and a.worker not in managed]
    # A halted release's broken worker is deleted and not recreated: it stops costing money.
    held = [a for a in actions if a.kind == HOLD and a.worker in observed]
    _delete_through_api(api, orphans + strays + held, view, report)
    _drain_objects(cfg, actions, report)

    apply_errors: dict[str, dict] = {}
    if needs_apply(actions):
        lock.check()
        scaling_to_zero = job_complete and cfg.reconcile.scale_to_zero_when_done
        replace_ = [
            worker_address(a.worker, cfg.fleet.mode)
            for a in actions
            if a.worker in managed and a.kind in (CREATE, REPLACE)
        ]
        # With a zone unreachable, or a worker backing off (Terraform would recreate a tainted one), the
        # apply touches only what this pass decided: nothing in an unseen zone, nothing not yet due.
        holding = any(a.kind == WAIT and a.next_attempt is not None for a in actions)
        targets = (
            [worker_address(a.worker, cfg.fleet.mode) for a in actions if a.kind in APPLY_KINDS]
            if (unreachable or holding) and not scaling_to_zero
            else []
        )
        report.terraform.update(
            ran=True, replace=replace_, targets=targets, command="destroy" if scaling_to_zero else "apply"
        )
        # Every managed worker this pass does not recreate keeps the trigger its state holds, so a config
        # change replaces only this wave (infra/rollout.py); the others' input is updated in place.
        moving = {a.worker for a in actions if a.kind in (CREATE, REPLACE)}
        holds = {n: t for n, t in triggers.items() if n not in moving and t is not None}
        t0 = time.perf_counter()
        try:
            extra = {"holds": holds} if holds else {}
            (apply or terraform_apply)(cfg, replace=replace_, targets=targets, destroy=scaling_to_zero, **extra)
        except ActfleetError as e:
            report.terraform["error"] = str(e)
            report.errors.append(f"terraform {report.terraform['command']} failed: {e}")
            apply_errors = worker_errors(getattr(e, "output", "") or str(e))
        finally:
            report.terraform["seconds"] = time.perf_counter() - t0
    report.outcome = FAILED if report.terraform["error"] or report.api_deletes["failed"] else REPAIRED
    save_memory(cfg, remember(history, observed, actions, now, acted=True, apply_errors=apply_errors), report, releases)


# ----------------------------------------------------------------------------------------------------
# Observing more than the lists: confirmations, worker records, memory
# ----------------------------------------------------------------------------------------------------


@dataclass
class Inputs:
    """What a pass reads before it plans (the observe step). reconcile and `actfleet status` both read them
    through observe_inputs, so both plan (infra/plan.py) on the same facts."""

    api: Any  # the TpuApi observed through (reconcile acts through it)
    managed: frozenset[str]  # as passed in (Terraform's state)
    zones: list[str]  # the configured zones and those of managed workers
    view: FleetView  # the lists as they came
    observed: dict[str, Observed]  # the lists, with what confirming GETs found
    unreachable: dict[str, str]  # zone -> error (lists or confirming GETs failed)
    confirmed: list[str]  # left out of a listing, found by a GET
    api_calls: int
    history: dict[str, Remembered]  # the memory the last pass saved ({} if none or unreadable)
    job: dict[str, Any]  # {"watched", "complete", "error"}
    job_complete: bool
    liveness: Liveness | None  # the job's worker records (None: boot and heartbeat rules off)
    workers: dict[str, Any]  # {"judged", "records", "error"}
    errors: list[str]  # what could not be read, one line each (the pass reports them)
    releases: dict[str, ReleaseMemory] = field(default_factory=dict)  # the rollout's memory (infra/rollout.py)


def fleet_zones(cfg: Config, managed: frozenset[str]) -> list[str]:
    """The zones a pass observes: the configured ones, and those of workers Terraform still manages."""
    return sorted(set(cfg.fleet.zones) | {zone_of(n) for n in managed if zone_of(n)})


def observe_inputs(cfg: Config, api=None, *, managed: frozenset[str], read_job: bool = True) -> Inputs:
    """List every zone, confirm with GETs what a listing left out, and read the memory, whether the job is
    complete and the workers' records. Reads only. `managed` is Terraform's state (managed_workers: its
    caller decides what an unreadable state means). `read_job=False` (`status --no-job`) reads nothing of
    the job: it is then treated as unreadable (not complete, boot and heartbeat not judged) and said so."""
    zones = fleet_zones(cfg, managed)
    if api is None:
        api = fleet_api(cfg.fleet)  # TPU API, or Compute Engine's in gce mode (infra/observe.py)
    errors: list[str] = []
    history, releases, memory_error = load_memory(cfg)
    if memory_error:
        errors.append(memory_error)
    view: FleetView = observe_fleet(api, zones)
    calls_before = api.calls
    observed, unreachable, confirmed = confirm_missing(api, cfg, view, managed, history)
    api_calls = view.api_calls + api.calls - calls_before
    for zone, message in unreachable.items():
        errors.append(f"zone {zone} could not be observed, left alone: {message}")
    job: dict[str, Any] = {"watched": False, "complete": None, "error": None}
    if read_job:
        job_complete = _job_complete(cfg, job)
        liveness = read_liveness(cfg, job_complete if job["watched"] else None)
    else:
        not_read = f"job {cfg.job.name} in {cfg.job.store} not read (--no-job)"
        job.update(watched=cfg.reconcile.watch_job, error=not_read if cfg.reconcile.watch_job else None)
        job_complete = False
        liveness = Liveness(judged=False, error=not_read) if _liveness_rules_on(cfg) else None
    workers: dict[str, Any] = {"judged": False, "records": 0, "error": None}
    if liveness is not None:
        workers = {
            "judged": liveness.judged and liveness.error is None,
            "records": len(liveness.records),
            "error": liveness.error,
            "clock_skew": dict(liveness.clock_skew),
        }
        if liveness.error:
            errors.append(f"{liveness.error}: boot and heartbeat not judged, nothing replaced on that ground")
    return Inputs(
        api,
        managed,
        zones,
        view,
        observed,
        unreachable,
        confirmed,
        api_calls,
        history,
        job,
        job_complete,
        liveness,
        workers,
        errors,
        releases,
    )


def confirm_missing(api, cfg: Config, view: FleetView, managed: frozenset[str], history: dict[str, Remembered]):
    """A listing can leave a resource out while a GET still finds it. Before anything is replaced for
    being gone, GET it: a desired worker whose queued resource is ACTIVE without a listed node, or that is
    absent from the lists although Terraform holds it or the last pass saw it. Returns (observed,
    unreachable, confirmed) with what the GETs found; a zone whose GETs fail is left alone like an unlisted
    one; confirmed names the workers whose node only a GET found."""
    from actfleet.infra.tpu_api import QueuedResource

    observed, unreachable = dict(view.observed), dict(view.unreachable)
    confirmed: list[str] = []
    todo = []
    for w in cfg.fleet.workers:
        if w.zone in unreachable:
            continue
        o = observed.get(w.name)
        if o is not None and o.qr_state == QR_ACTIVE and o.node_state is None:
            todo.append((w, view.queued_resources.get(w.name)))
        elif o is None and (w.name in managed or history.get(w.name, Remembered()).phase not in ("", "absent")):
            todo.append((w, None))
    if not todo:
        return observed, unreachable, confirmed

    def confirm(item):
        w, qr = item
        if qr is None:
            qr = api.get_queued_resource(w.zone, w.name)
        node = api.get_node(w.zone, w.name)
        return w, qr, node

    with ThreadPoolExecutor(max_workers=min(8, len(todo)), thread_name_prefix="reconcile-confirm") as pool:
        futures = [pool.submit(confirm, item) for item in todo]
    for (w, _), fut in zip(todo, futures):
        try:
            _, qr, node = fut.result()
        except ActfleetError as e:
            unreachable.setdefault(w.zone, f"could not confirm {w.name} with a GET: {e}")
            continue
        if node is not None or (qr is not None and w.name not in observed):
            observed[w.name] = observed_from(qr if isinstance(qr, QueuedResource) else None, node, w.zone)
            if node is not None:
                confirmed.append(w.name)
    for zone in set(unreachable) - set(view.unreachable):  # judged nothing in it: leave it all alone
        observed = {n: o for n, o in observed.items() if o.zone != zone}
    return observed, unreachable, confirmed


def _liveness_rules_on(cfg: Config) -> bool:
    return bool(cfg.reconcile.boot_timeout_minutes or cfg.reconcile.heartbeat_timeout_minutes)


# Worker records as last read, per (store, job): a record whose write time has not changed is not read again
# (`reconcile --watch`, and passes in one process; a pass in a fresh process reads every record once).
_RECORDS: dict[tuple[str, str], dict] = {}


def read_liveness(cfg: Config, job_complete: bool | None = None) -> Liveness | None:
    """The job's worker records, as the boot and heartbeat rules read them (the same records `actfleet
    status` shows: actfleet.work_queue.read_worker_records): each heartbeat is the store's time of the
    record's write, a cloud timestamp like the TPU API's creation times the pass already compares with its
    clock, so no worker's clock decides whether it is replaced. Workers whose clock is off the store's by
    more than the bound are listed in `clock_skew`. None when both rules are off."""
    if not _liveness_rules_on(cfg):
        return None
    try:
        from actfleet.store import open_store
        from actfleet.work_queue import CLOCK_SKEW_BOUND_S, job_key, read_worker_records
        from actfleet.work_queue import job_complete as complete_

        store = open_store(cfg.job.store)
        if store.generation(job_key(cfg.job.name)) is None:
            return Liveness(judged=False)  # not prepared: workers have nothing to do yet
        if job_complete if job_complete is not None else complete_(store, cfg.job.name):
            return Liveness(judged=False)  # complete: workers have nothing left to do
        records = read_worker_records(store, cfg.job.name, _RECORDS.setdefault((store.url, cfg.job.name), {}))
    except Exception as e:  # an unreadable store never replaces anything: it is reported
        return Liveness(
            judged=False,
            error=f"worker records of job {cfg.job.name} in {cfg.job.store} could not be read: {one_line(e)}",
        )
    skew = {
        n: r.clock_skew
        for n, r in records.items()
        if r.clock_skew is not None and abs(r.clock_skew) > CLOCK_SKEW_BOUND_S
    }
    return Liveness(
        {name: WorkRecord(r.last_heartbeat, r.state, r.reason) for name, r in records.items()}, clock_skew=skew
    )


MEMORY_KEY = "reconcile.memory.json"
MEMORY_SCHEMA = "actfleet.reconcile-memory/v1"


def memory_location(cfg: Config):
    """(store, key) of the memory between passes: next to the reconcile lock, so whoever may act reads it."""
    store, lock_key = lock_location(cfg)
    folder = lock_key.rpartition("/")[0]
    return store, f"{folder}/{MEMORY_KEY}" if folder else MEMORY_KEY


def load_memory(cfg: Config) -> tuple[dict[str, Remembered], dict[str, ReleaseMemory], str | None]:
    """The memory the last pass saved ({} for none): per worker, and per release (the rollout's failed boots
    and halt); and an error line if it could not be read (then the pass starts afresh: limits count from
    now, no backoff, no halt; nothing is replaced for it)."""
    from actfleet.store import NotFound

    store, key = memory_location(cfg)
    try:
        data = json.loads(store.read(key)[0])
        if data.get("schema") != MEMORY_SCHEMA:
            raise ValueError(f"schema {data.get('schema')!r}, expected {MEMORY_SCHEMA!r}")
        workers = {name: Remembered.from_json(d) for name, d in data["workers"].items()}
        releases = {r: ReleaseMemory.from_json(d) for r, d in data.get("releases", {}).items()}
        return workers, releases, None
    except NotFound:
        return {}, {}, None
    except Exception as e:
        return {}, {}, f"reconcile memory {store.url.rstrip('/')}/{key} unreadable, starting afresh: {one_line(e)}"


def save_memory(
    cfg: Config,
    history: dict[str, Remembered],
    report: PassReport,
    releases: dict[str, ReleaseMemory] | None = None,
) -> None:
    store, key = memory_location(cfg)
    doc = {"schema": MEMORY_SCHEMA, "workers": {n: h.to_json() for n, h in sorted(history.items())}}
    # Only the desired release's memory is kept: an abandoned release's halt must not come back with it.
    current = report.rollout.get("release")
    doc["releases"] = {r: m.to_json() for r, m in sorted((releases or {}).items()) if r == current}
    try:
        store.put(key, json.dumps(doc, indent=1, sort_keys=True).encode())
    except Exception as e:
        report.errors.append(f"reconcile memory could not be saved to {store.url.rstrip('/')}/{key}: {one_line(e)}")


def _count_restarts(report: PassReport, history: dict[str, Remembered]) -> None:
    by_class: Counter = Counter()
    for h in history.values():
        if h.error:
            by_class[h.error.get("class", "unknown")] += 1
    report.restarts = {
        "preemptions": sum(h.preemptions for h in history.values()),
        "errors": sum(h.errors for h in history.values()),
        "by_class": dict(sorted(by_class.items())),
    }


# A provisioner's failure as Terraform prints it: terraform_data.workers["NAME"] (local-exec): actfleet: TPU
# API: queued resource ...: 403 permission denied: <the service's message>
_PROVISIONER_ERROR = re.compile(r'workers\["(?P<name>[^"]+)"\] \(local-exec\): actfleet: (?P<line>.*)$', re.M)
_API_STATUS = re.compile(r": (?P<http>\d{3}) (?P<status>[a-z][a-z ]*): (?P<message>.*)$")


# A provider's failure (gce mode) as Terraform prints it: the diagnostic's summary, then the resource:
#   Error: Error waiting for instance to create: ZONE_RESOURCE_POOL_EXHAUSTED: The zone ... not have enough ...
#
#     with google_compute_instance.workers["NAME"],
_PROVIDER_ERROR = re.compile(
    r'^Error: (?P<line>.+)\n\n\s+with google_compute_instance\.workers\["(?P<name>[^"]+)"\],', re.M
)
_CODE = re.compile(r"\b(?P<code>[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+)\b")  # ZONE_RESOURCE_POOL_EXHAUSTED, QUOTA_EXCEEDED


def worker_errors(output: str) -> dict[str, dict]:
    """Per worker, the error its create- or destroy-time provisioner (or, in gce mode, the provider) printed
    in a failed apply."""
    out = {}
    for m in _PROVISIONER_ERROR.finditer(output):
        line = m["line"].strip()
        api = _API_STATUS.search(line)
        if api:
            out[m["name"]] = failure(api["status"].strip().upper().replace(" ", "_"), api["message"].strip())
        else:
            out.setdefault(m["name"], failure("UNKNOWN", line))
    for m in _PROVIDER_ERROR.finditer(output):
        line = m["line"].strip()
        code = _CODE.search(line)
        out.setdefault(m["name"], failure(code["code"] if code else "UNKNOWN", line))
    return out


def _delete_through_api(api, actions: list[Action], view: FleetView, report: PassReport) -> None:
    if not actions:
        return

    def delete(a: Action) -> None:
        if a.worker in view.queued_resources or view.observed[a.worker].qr_state is not None:
            api.delete_queued_resource(a.zone, a.worker, force=True)
        else:
            api.delete_node(a.zone, a.worker)

    with ThreadPoolExecutor(max_workers=min(8, len(actions)), thread_name_prefix="reconcile-delete") as pool:
        futures = {a.worker: pool.submit(delete, a) for a in actions}
    for name, fut in futures.items():
        try:
            fut.result()
            report.api_deletes["deleted"].append(name)
        except ActfleetError as e:
            report.api_deletes["failed"][name] = str(e)
            report.errors.append(f"could not delete {name}: {e}")


def _drain_objects(cfg: Config, actions: list[Action], report: PassReport) -> None:
    """Write the drain requests this pass asks for (the worker reads them between units), and remove the
    one of each worker a rollout now replaces (its successor must not drain at once)."""
    asks = [a.worker for a in actions if a.kind == DRAIN]
    # Drains are only asked for while the job's records are judged (infra/rollout.py): else none to remove.
    judged = report.workers.get("judged")
    done = [a.worker for a in actions if a.kind == REPLACE and a.cause == ROLLOUT and judged]
    if not asks and not done:
        return
    from actfleet.store import NotFound, open_store
    from actfleet.work_queue import drain_key

    try:
        store = open_store(cfg.job.store)
    except Exception as e:
        for name in asks:
            report.drains["failed"][name] = one_line(e)
        report.errors.append(f"drain requests not written to {cfg.job.store}: {one_line(e)}")
        return

    def one(name: str, ask: bool) -> None:
        key = drain_key(cfg.job.name, name)
        if ask:
            store.put(key, json.dumps({"worker": name, "release": report.rollout.get("release")}).encode())
        else:
            try:
                store.delete(key)
            except NotFound:
                pass  # never asked (not judged when it moved), or already removed

    with ThreadPoolExecutor(max_workers=16, thread_name_prefix="reconcile-drain") as pool:
        futures = {(n, True): pool.submit(one, n, True) for n in asks}
        futures |= {(n, False): pool.submit(one, n, False) for n in done}
    for (name, ask), fut in futures.items():
        try:
            fut.result()
            if ask:
                report.drains["requested"].append(name)
        except Exception as e:
            if ask:  # not told: the drain timeout replaces it anyway
                report.drains["failed"][name] = one_line(e)
                report.errors.append(f"could not ask {name} to drain: {one_line(e)}")


def _job_complete(cfg: Config, job: dict[str, Any]) -> bool:
    """Whether the job's work queue says every unit is done (only when reconcile.watch_job); `job` (the
    report's {"watched", "complete", "error"}) is filled in."""
    if not cfg.reconcile.watch_job:
        return False
    job["watched"] = True
    try:
        from actfleet.store import open_store
        from actfleet.work_queue import job_complete

        complete = job_complete(open_store(cfg.job.store), cfg.job.name)
    except Exception as e:  # an unreadable queue never scales the fleet down; it is reported
        job["error"] = f"could not read job {cfg.job.name} in {cfg.job.store}: {one_line(e)}"
        return False
    job["complete"] = complete
    return complete


# ----------------------------------------------------------------------------------------------------
# Terraform's view: which workers the fleet stack's state holds, and the one apply
# ----------------------------------------------------------------------------------------------------


def managed_workers(cfg: Config) -> frozenset[str]:
    """Worker names the fleet stack's Terraform state holds, read from the state itself (a JSON document
    in the backend) so that a pass with nothing to do never starts terraform. No state yet: none."""
    return frozenset(fleet_state_workers(cfg))


def fleet_state_workers(cfg: Config) -> dict[str, Any]:
    """Per worker the fleet stack's state holds, its `triggers_replace` value (what the rollout holds it
    at: infra/rollout.py), read from the state document itself; None where it has none."""
    where = state_location(cfg, FLEET)
    try:
        if where.startswith("gs://"):
            from actfleet.store import NotFound, open_store, parse_gs

            bucket, key = parse_gs(where, "Terraform state")
            try:
                data = open_store(f"gs://{bucket}").read(key)[0]
            except NotFound:
                return {}
        else:
            try:
                data = Path(where).read_bytes()
            except FileNotFoundError:
                return {}
        state = json.loads(data) if data.strip() else {}
    except (OSError, ValueError) as e:
        raise ActfleetError(f"Terraform state {where}: unreadable: {one_line(e)}") from None
    out: dict[str, Any] = {}
    for res in state.get("resources", []):
        if res.get("mode") == "managed" and res.get("name") == WORKERS:
            for i in res.get("instances", []):
                if isinstance(i.get("index_key"), str):
                    attrs = i.get("attributes") or {}
                    if res.get("type") == "google_compute_instance":
                        out[i["index_key"]] = held_gce_spec(attrs)  # gce mode holds the spec itself
                        continue
                    trigger = attrs.get("triggers_replace")
                    if isinstance(trigger, dict) and set(trigger) == {"value", "type"}:
                        trigger = trigger["value"]  # a dynamic attribute is stored with its type
                    out[i["index_key"]] = trigger
    return out


def terraform_apply(
    cfg: Config,
    *,
    replace: list[str],
    targets: list[str],
    destroy: bool,
    holds: dict[str, Any] | None = None,
    stream: bool = False,
) -> None:
    """The act step's one terraform run on the fleet stack (synthesized through the cache, initialised
    once; infra/terraform.py). Raises ActfleetError with Terraform's error summary on failure. Waits up
    to a minute for Terraform's state lock (an `actfleet deploy` may be finishing)."""
    from actfleet.infra.terraform import fleet_stack

    limit = cfg.rollout.apply_timeout_minutes * 60 or None  # below the timer's TimeoutStartSec
    tf = fleet_stack(
        cfg, stream=stream, lock_timeout="60s", parallelism=cfg.rollout.terraform_parallelism, timeout_s=limit
    )
    if destroy:
        tf.destroy()
    else:
        tf.apply(replace=replace, targets=targets, variables={"holds": holds or {}})


__all__ = [
    "PassReport",
    "reconcile_pass",
    "terraform_apply",
    "managed_workers",
    "observe_inputs",
    "Inputs",
    "REPORT_JSON_SCHEMA",
    "CONVERGED",
    "REPAIRED",
    "PLANNED",
    "LOCKED",
    "FAILED",
    "SCHEMA_ID",
]
