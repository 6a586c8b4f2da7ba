"""rollout: rolling replacement and the circuit breaker, the pure layer over decide (docs/operations.md).

    r = roll(actions, desired, observed, now, policy, release, liveness=..., history=..., releases=...)
    r.actions    decide's actions with this pass's rollout moves and the halt applied
    r.history    per-worker memory with drains asked for and workers moved (the `rolled` mark)
    r.releases   the fleet-level memory: per release, failed boots in a row and whether it is halted
    r.view       what `reconcile --json` shows: old/new release per worker, wave, waiting-for, halted

A worker's *release* is the hash of what its queued-resource request holds (infra/release_id.py), carried on
the node as the label `actfleet-release`. A config change that alters the request gives a new release;
the fleet stack keeps every worker on the release Terraform's state holds unless this pass moves it
(infra/reconcile.py passes those triggers as `-var holds`), so one apply replaces only the current wave.

Rolling (`[rollout] max_unavailable`, a count or "N%" of the desired workers, at least 1):
- A wave is up to max_unavailable old-release workers, still-booting ones first. Each is first told to
  drain (DRAIN: the job store object `drain/{worker}`, which the worker reads between units and then
  exits, record state "drained"); once its record says drained, or `drain_timeout` has passed, or the
  job's records cannot judge it (job not prepared, complete, records off), it is replaced (cause "rollout").
- The next wave starts when every worker of the last one has started work on the new release (a worker
  record since its node was made; READY when records are not judged) and no drain is outstanding.
- Repairs (preemptions, failures) are decide's and are never held back: they come up on the new release.

Circuit breaker (`[rollout] halt_after_failed_boots`, 0 = off): new-release workers replaced because they
never started work (boot timeout), stalled, or stopped for good saying why (a full disk) are failed boots;
this many in a row, with no worker of the release seen working in between (a worker whose record says it
failed is never seen working), halts the release: nothing of it is created (CREATE -> wait) and its
broken workers are deleted without being recreated (HOLD, through the TPU API), so a release that cannot
boot stops costing money; the old release's workers keep running. The halt lasts until the config changes
(a new release) or `reconcile --retry-now`. Within one pass failures count before successes reset them,
so a wave where some workers start is never halted by its stragglers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from actfleet.config import Worker
from actfleet.infra.decide import (
    CREATE,
    DRAIN,
    HEALTHY,
    HOLD,
    PENDING,
    REPLACE,
    ROLLOUT,
    WAIT,
    Action,
    Liveness,
    Observed,
    Policy,
    Remembered,
    worker_failed,
)
from actfleet.infra.release_id import RELEASE_LABEL
from actfleet.infra.tpu_states import NODE_READY, QR_ACTIVE

# "worker-failed": its worker stopped for good saying why (a full disk): a release that fills every disk halts.
BOOT_FAILURE_CLASSES = frozenset({"boot", "stalled", "worker-failed"})
DRAINED_STATES = frozenset({"drained", "stopped", "finished"})


@dataclass(frozen=True)
class ReleaseMemory:
    """One release's memory between passes (saved with the per-worker memory)."""

    failed_in_row: int = 0  # new-release workers that never started (or stalled), since one was seen working
    failed: tuple[str, ...] = ()  # their names, most recent last (the last few)
    halted_at: float | None = None  # when the breaker tripped; None: not halted
    waves: int = 0  # waves started

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "failed": list(self.failed)}

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> "ReleaseMemory":
        kw = {k: d[k] for k in ReleaseMemory.__dataclass_fields__ if k in d}
        if "failed" in kw:
            kw["failed"] = tuple(kw["failed"])
        return ReleaseMemory(**kw)


@dataclass(frozen=True)
class Rolled:
    actions: list[Action]
    history: dict[str, Remembered]
    releases: dict[str, ReleaseMemory]
    view: dict[str, Any] = field(default_factory=dict)


def max_unavailable(spec: int | str, desired: int) -> int:
    """`[rollout] max_unavailable` as a count for a fleet of `desired` workers: N, or "N%" rounded down, at
    least 1 (a rollout always moves)."""
    if isinstance(spec, str) and spec.endswith("%"):
        return max(1, desired * int(spec[:-1]) // 100)
    return max(1, int(spec))


def release_of(o: Observed | None) -> str:
    """The release a worker runs, from its label ('' when unlabelled: made before releases existed)."""
    return "" if o is None else o.labels.get(RELEASE_LABEL, "")


def started_work(w: Worker, o: Observed | None, liveness: Liveness | None) -> bool:
    """Its worker has started work since the node was made (READY when the records are not judged)."""
    if o is None or o.node_state != NODE_READY or o.qr_state not in (None, QR_ACTIVE):
        return False
    if liveness is None or not liveness.judged or liveness.error is not None:
        return True
    rec = liveness.records.get(w.name)
    if worker_failed(rec, o):  # it started, then stopped for good: no proof that the release works
        return False
    return rec is not None and rec.last_heartbeat is not None and (o.created is None or rec.last_heartbeat >= o.created)


def roll(
    actions: Sequence[Action],
    desired: Sequence[Worker],
    observed: Mapping[str, Observed],
    now: float,
    policy: Policy,
    release: str,
    *,
    liveness: Liveness | None = None,
    history: Mapping[str, Remembered] | None = None,
    releases: Mapping[str, ReleaseMemory] | None = None,
) -> Rolled:
    """Apply the rollout and the circuit breaker of `release` (the desired one; '' = off) to decide's actions."""
    history = dict(history or {})
    releases = dict(releases or {})
    actions = list(actions)
    if not release:
        return Rolled(actions, history, releases, {"release": None})
    by_name = {w.name: w for w in desired}
    mem = releases.get(release, ReleaseMemory())

    # -- circuit breaker ---------------------------------------------------------------------------------
    failed = [
        a.worker
        for a in actions
        if a.kind == REPLACE
        and release_of(observed.get(a.worker)) == release
        and (a.error or {}).get("class") in BOOT_FAILURE_CLASSES
    ]
    working = [
        w.name
        for w in desired
        if release_of(observed.get(w.name)) == release and started_work(w, observed.get(w.name), liveness)
    ]
    if policy.retry_now:
        mem = dataclasses.replace(mem, failed_in_row=0, failed=(), halted_at=None)
    if failed:
        mem = dataclasses.replace(
            mem, failed_in_row=mem.failed_in_row + len(failed), failed=(mem.failed + tuple(failed))[-10:]
        )
    if working and mem.halted_at is None:
        mem = dataclasses.replace(mem, failed_in_row=0, failed=())
    limit = policy.halt_after_failed_boots
    if mem.halted_at is None and limit > 0 and mem.failed_in_row >= limit:
        mem = dataclasses.replace(mem, halted_at=now)
    halted = mem.halted_at is not None

    # -- the rollout -------------------------------------------------------------------------------------
    moved: dict[str, Action] = {}
    waiting_for: list[str] = []
    kinds = {a.worker: a.kind for a in actions}
    for name in list(history):
        h = history[name]
        if h.rolled and (h.rolled != release or name not in by_name):
            history[name] = dataclasses.replace(h, rolled="")  # a release since abandoned, or not desired
        elif h.rolled and started_work(by_name[name], observed.get(name), liveness):
            history[name] = dataclasses.replace(h, rolled="")
        elif h.rolled:
            waiting_for.append(name)
    # Workers made before releases existed carry no label: left alone (a repair or -replace moves them).
    old = [
        w
        for w in desired
        if kinds.get(w.name) in (HEALTHY, PENDING) and release_of(observed.get(w.name)) not in ("", release)
    ]
    draining = [w for w in old if history.get(w.name, Remembered()).drain_requested is not None]
    if not halted:
        for w in draining:  # drains asked for by an earlier pass: replace those done
            h = history[w.name]
            if _drained(w, h, now, policy, liveness):
                moved[w.name] = _move(w, observed[w.name], release, "drained" if _said_drained(w, h, liveness) else "")
                history[w.name] = dataclasses.replace(h, drain_requested=None, rolled=release)
            waiting_for.append(w.name)  # replaced now, or still draining: in flight either way
        if not waiting_for:
            candidates = sorted(
                (w for w in old if w.name not in moved and history.get(w.name, Remembered()).drain_requested is None),
                key=lambda w: (kinds[w.name] != PENDING, w.name),  # still-booting ones first: they do no work
            )
            wave = candidates[: max_unavailable(policy.max_unavailable, len(desired))]
            if wave:
                mem = dataclasses.replace(mem, waves=mem.waves + 1)
            for w in wave:
                h = history.get(w.name, Remembered())
                if _judges(liveness) and kinds[w.name] == HEALTHY:
                    moved[w.name] = Action(
                        w.name,
                        w.zone,
                        DRAIN,
                        f"rollout wave {mem.waves} to release {release} (from {release_of(observed[w.name]) or 'unlabelled'}): "
                        "told to drain (finish its unit, then exit)",
                    )
                    history[w.name] = dataclasses.replace(h, drain_requested=now)
                    waiting_for.append(w.name)
                else:
                    moved[w.name] = _move(w, observed[w.name], release, "")
                    history[w.name] = dataclasses.replace(h, rolled=release)
                    waiting_for.append(w.name)

    out = []
    for a in actions:
        if a.worker in moved:
            a = moved[a.worker]
        elif halted and a.worker in by_name and a.kind in (CREATE, REPLACE):
            why = _halt_line(release, mem)
            a = (
                Action(a.worker, a.zone, HOLD, f"{a.reason}; not recreated: {why}", error=a.error, cause=a.cause)
                if a.kind == REPLACE
                else Action(a.worker, a.zone, WAIT, f"{a.reason}; not created: {why}")
            )
        out.append(a)
    releases[release] = mem
    view = {
        "release": release,
        "halted": halted,
        "halt": _halt_line(release, mem) if halted else None,
        "failed_boots_in_row": mem.failed_in_row,
        "failed": list(mem.failed),
        "wave": mem.waves,
        "max_unavailable": max_unavailable(policy.max_unavailable, len(desired)),
        "old": sorted(w.name for w in old if w.name not in moved or moved[w.name].kind == DRAIN),
        "waiting_for": sorted(set(waiting_for)),
        "workers": {
            w.name: {"release": release_of(observed.get(w.name)) or None, "target": release}
            for w in desired
            if observed.get(w.name) is not None
        },
    }
    return Rolled(out, history, releases, view)


def _judges(liveness: Liveness | None) -> bool:
    return liveness is not None and liveness.judged and liveness.error is None


def _said_drained(w: Worker, h: Remembered, liveness: Liveness | None) -> bool:
    rec = liveness.records.get(w.name) if _judges(liveness) else None
    return (
        rec is not None
        and rec.state in DRAINED_STATES
        and rec.last_heartbeat is not None
        and rec.last_heartbeat >= (h.drain_requested or 0)
    )


def _drained(w: Worker, h: Remembered, now: float, policy: Policy, liveness: Liveness | None) -> bool:
    if not _judges(liveness) or _said_drained(w, h, liveness):
        return True
    return now - (h.drain_requested or now) > policy.drain_timeout_s


def _move(w: Worker, o: Observed, release: str, how: str) -> Action:
    frm = release_of(o) or "unlabelled"
    return Action(
        w.name,
        w.zone,
        REPLACE,
        f"rollout to release {release} (from {frm})" + (f": {how}" if how else ""),
        cause=ROLLOUT,
    )


def _halt_line(release: str, mem: ReleaseMemory) -> str:
    names = ", ".join(mem.failed[-3:])
    return (
        f"release {release} halted: {mem.failed_in_row} workers in a row never started work or failed ({names}); "
        "the old release's workers keep running; fix the config or run `actfleet reconcile --retry-now`"
    )
