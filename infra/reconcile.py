"""One reconcile pass: observe -> decide -> act -> report (docs/operations.md).

    report = reconcile_pass(cfg)              # takes the lock, acts, releases it
    report = reconcile_pass(cfg, dry_run=True)  # observes and decides only
    print(report.to_json())

- observe:  list queued resources and nodes in every zone (infra/observe.py), read which workers
            Terraform's state holds (the state file itself: no terraform process), and, when
            `reconcile.watch_job`, whether the job's work queue is complete.
- decide:   infra/decide.py, pure.
- act:      delete orphans through the TPU API; then, only if a worker must be created, replaced or
            removed, exactly ONE `terraform apply` of the fleet stack carrying every -replace= of the pass.
            A pass with nothing to do runs no terraform and never imports cdktf.
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
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from actfleet.config import Config, zone_of
from actfleet.errors import ActfleetError
from actfleet.formatting import iso_utc, one_line
from actfleet.infra.decide import APPLY_KINDS, CREATE, DELETE_ORPHAN, REPLACE, Action, Policy, decide, needs_apply
from actfleet.infra.lock import LockHeld, ReconcileLock
from actfleet.infra.observe import FleetView, observe_fleet
from actfleet.infra.terraform_layout import FLEET, WORKERS, state_location, worker_address

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
    terraform: dict[str, Any] = field(default_factory=lambda: {
        "ran": False, "command": None, "replace": [], "targets": [], "seconds": 0.0, "error": None})
    # Deleted through the TPU API: orphans, and broken resources Terraform's state does not hold.
    api_deletes: dict[str, Any] = field(default_factory=lambda: {"deleted": [], "failed": {}})
    lock: dict[str, Any] | None = None  # who held the lock this pass (us), and whom we took it over from
    locked_by: dict[str, Any] | None = None  # outcome "locked": who holds it
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
            "observe": {"zones": self.zones, "unreachable": self.unreachable, "api_calls": self.api_calls,
                        "seconds": round(self.observe_seconds, 3)},
            "managed": self.managed,
            "job": self.job,
            "counts": self.counts,
            "actions": [asdict(a) for a in self.actions],
            "terraform": {**self.terraform, "seconds": round(self.terraform["seconds"], 3)},
            "api_deletes": self.api_deletes,
            "errors": self.errors,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


# The --json report, as a JSON Schema (docs/operations.md explains each field). Stable: fields are only
# ever added; a breaking change gets a new SCHEMA_ID.
_ACTION = {"type": "object", "required": ["worker", "zone", "kind", "reason"],
           "properties": {"worker": {"type": "string"}, "zone": {"type": "string"},
                          "kind": {"enum": ["healthy", "pending", "wait", "report", "create", "replace", "remove",
                                            "delete-orphan"]},
                          "reason": {"type": "string"}}}
REPORT_JSON_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": SCHEMA_ID,
    "type": "object",
    "required": ["schema", "fleet", "config", "dry_run", "started_at", "seconds", "outcome", "exit_code", "lock",
                 "locked_by", "observe", "managed", "job", "counts", "actions", "terraform", "api_deletes",
                 "errors"],
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
        "locked_by": {"type": ["object", "null"],
                      "required": ["holder", "host", "pid", "since", "expires", "command", "describe"]},
        "observe": {"type": "object", "required": ["zones", "unreachable", "api_calls", "seconds"],
                    "properties": {"zones": {"type": "array", "items": {"type": "string"}},
                                   "unreachable": {"type": "object", "additionalProperties": {"type": "string"}},
                                   "api_calls": {"type": "integer"}, "seconds": {"type": "number"}}},
        "managed": {"type": "array", "items": {"type": "string"}},
        "job": {"type": "object", "required": ["watched", "complete", "error"]},
        "counts": {"type": "object", "additionalProperties": {"type": "integer"}},
        "actions": {"type": "array", "items": _ACTION},
        "terraform": {"type": "object", "required": ["ran", "command", "replace", "targets", "seconds", "error"],
                      "properties": {"ran": {"type": "boolean"}, "command": {"enum": [None, "apply", "destroy"]},
                                     "replace": {"type": "array", "items": {"type": "string"}},
                                     "targets": {"type": "array", "items": {"type": "string"}},
                                     "seconds": {"type": "number"}, "error": {"type": ["string", "null"]}}},
        "api_deletes": {"type": "object", "required": ["deleted", "failed"]},
        "errors": {"type": "array", "items": {"type": "string"}},
    },
}


def reconcile_pass(cfg: Config, *, dry_run: bool = False, wait_for_lock: bool = False,
                   lock: ReconcileLock | None = None, api=None, clock: Callable[[], float] = time.time,
                   apply: Callable[..., None] | None = None) -> PassReport:
    """One pass. `api` (a TpuApi), `lock` and `apply` can be injected (tests, benchmarks); by default they
    come from the config. Never raises for expected failures: they are in the report."""
    report = PassReport(fleet=cfg.fleet.id, config=cfg.source, dry_run=dry_run, started_at=clock())
    started = time.perf_counter()
    try:
        if dry_run:
            _observe_decide_act(cfg, report, api, clock, None, apply)
        else:
            lock = lock or ReconcileLock.for_config(cfg)
            try:
                lock.acquire(wait=wait_for_lock)
            except LockHeld as e:
                report.outcome = LOCKED
                report.locked_by = e.info.to_json() | {"describe": e.info.describe()}
                return report
            try:
                report.lock = {"holder": lock.info.holder, "pid": lock.info.pid, "where": lock.where,
                               "took_over_from": lock.took_over.to_json() if lock.took_over else None}
                _observe_decide_act(cfg, report, api, clock, lock, apply)
            finally:
                lock.release()
    except ActfleetError as e:
        report.outcome = FAILED
        report.errors.append(str(e))
    finally:
        report.seconds = time.perf_counter() - started
    return report


def _observe_decide_act(cfg: Config, report: PassReport, api, clock, lock: ReconcileLock | None,
                        apply: Callable[..., None] | None) -> None:
    # -- observe ------------------------------------------------------------------------------------
    managed = managed_workers(cfg)
    report.managed = sorted(managed)
    zones = sorted(set(cfg.fleet.zones) | {zone_of(n) for n in managed if zone_of(n)})
    report.zones = zones
    if api is None:
        from actfleet.infra.tpu_api import TpuApi

        api = TpuApi.from_config(cfg.fleet)
    view: FleetView = observe_fleet(api, zones)
    report.unreachable, report.api_calls, report.observe_seconds = view.unreachable, view.api_calls, view.seconds
    for zone, message in view.unreachable.items():
        report.errors.append(f"zone {zone} could not be observed, left alone: {message}")
    job_complete = _job_complete(cfg, report)

    # -- decide -------------------------------------------------------------------------------------
    actions = decide(cfg.fleet.workers, view.observed, clock(), Policy.from_config(cfg),
                     unreachable_zones=frozenset(view.unreachable), job_complete=job_complete, managed=managed)
    report.actions = actions
    acting = [a for a in actions if a.acts]
    if not acting:
        report.outcome = CONVERGED
        return
    if report.dry_run:
        report.outcome = PLANNED
        return

    # -- act ----------------------------------------------------------------------------------------
    lock.check()
    orphans = [a for a in actions if a.kind == DELETE_ORPHAN]
    # A broken resource Terraform does not manage (state lost it) is deleted here; the apply recreates it.
    strays = [a for a in actions if a.kind == REPLACE and a.worker not in managed]
    _delete_through_api(api, orphans + strays, view, report)

    if needs_apply(actions):
        lock.check()
        scaling_to_zero = job_complete and cfg.reconcile.scale_to_zero_when_done
        replace = [worker_address(a.worker, cfg.fleet.mode) for a in actions
                   if a.worker in managed and a.kind in (CREATE, REPLACE)]
        # With a zone unreachable, the apply touches only what this pass decided, so it never creates or
        # destroys anything in the zone it could not see.
        targets = [worker_address(a.worker, cfg.fleet.mode) for a in actions if a.kind in APPLY_KINDS] \
            if view.unreachable and not scaling_to_zero else []
        report.terraform.update(ran=True, replace=replace, targets=targets,
                                command="destroy" if scaling_to_zero else "apply")
        t0 = time.perf_counter()
        try:
            (apply or terraform_apply)(cfg, replace=replace, targets=targets, destroy=scaling_to_zero)
        except ActfleetError as e:
            report.terraform["error"] = str(e)
            report.errors.append(f"terraform {report.terraform['command']} failed: {e}")
        finally:
            report.terraform["seconds"] = time.perf_counter() - t0
    report.outcome = FAILED if report.terraform["error"] or report.api_deletes["failed"] else REPAIRED


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


def _job_complete(cfg: Config, report: PassReport) -> bool:
    """Whether the job's work queue says every unit is done (only when reconcile.watch_job)."""
    if not cfg.reconcile.watch_job:
        return False
    report.job["watched"] = True
    try:
        from actfleet.worker.work_queue import job_complete
        from actfleet.store import open_store

        complete = job_complete(open_store(cfg.job.store), cfg.job.name)
    except Exception as e:  # an unreadable queue never scales the fleet down; it is reported
        report.job["error"] = f"could not read job {cfg.job.name} in {cfg.job.store}: {one_line(e)}"
        return False
    report.job["complete"] = complete
    return complete


# ----------------------------------------------------------------------------------------------------
# Terraform's view: which workers the fleet stack's state holds, and the one apply
# ----------------------------------------------------------------------------------------------------


def managed_workers(cfg: Config) -> frozenset[str]:
    """Worker names the fleet stack's Terraform state holds, read from the state itself (a JSON document
    in the backend) so that a pass with nothing to do never starts terraform. No state yet: none."""
    where = state_location(cfg, FLEET)
    try:
        if where.startswith("gs://"):
            from actfleet.store import NotFound, open_store

            root, _, key = where.rpartition("/")
            try:
                data = open_store(root).read(key)[0]
            except NotFound:
                return frozenset()
        else:
            try:
                data = Path(where).read_bytes()
            except FileNotFoundError:
                return frozenset()
        state = json.loads(data) if data.strip() else {}
    except (OSError, ValueError) as e:
        raise ActfleetError(f"Terraform state {where}: unreadable: {one_line(e)}") from None
    names = set()
    for res in state.get("resources", []):
        if res.get("mode") == "managed" and res.get("name") == WORKERS:
            names.update(i["index_key"] for i in res.get("instances", []) if isinstance(i.get("index_key"), str))
    return frozenset(names)


def terraform_apply(cfg: Config, *, replace: list[str], targets: list[str], destroy: bool,
                    stream: bool = False) -> None:
    """The act step's one terraform run on the fleet stack (synthesized through the cache, initialised
    once; infra/terraform.py). Raises ActfleetError with Terraform's error summary on failure. Waits up
    to a minute for Terraform's state lock (an `actfleet deploy` may be finishing)."""
    from actfleet.infra.terraform import fleet_stack

    tf = fleet_stack(cfg, stream=stream, lock_timeout="60s")
    if destroy:
        tf.destroy()
    else:
        tf.apply(replace=replace, targets=targets)




__all__ = ["PassReport", "reconcile_pass", "terraform_apply", "managed_workers",
           "REPORT_JSON_SCHEMA", "CONVERGED", "REPAIRED", "PLANNED", "LOCKED", "FAILED", "SCHEMA_ID"]
