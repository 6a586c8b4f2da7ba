"""plan: the one plan of a pass, settle -> history -> decide (docs/operations.md).

    p = plan(cfg.fleet.workers, observed, now, policy, history=..., managed=..., job_complete=...,
             liveness=..., unreachable_zones=...)
    p.actions    one Action per worker (decide's), in decide's order
    p.verdicts   worker name -> its Action
    p.history    the memory with the last acting pass's creates judged (settle): what remember() builds on
    p.observed   the observation with each `since` set to when the worker entered its state (with_history)

`actfleet reconcile` acts on this plan and `actfleet status` shows it (each worker's `health` is its
planned action's kind): both call this function, on inputs both read the same way
(infra/reconcile.py: observe_inputs), so the two cannot answer differently on the same world
(tests/test_plan.py proves it on random worlds).

Pure like decide: the observation, the remembered history, the managed set, the job-complete and liveness
facts, the policy and the clock (`now`) are arguments; the I/O that gathers them stays with the callers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from actfleet.config import Worker
from actfleet.infra.decide import Action, Liveness, Observed, Policy, Remembered, decide, settle, with_history
from actfleet.infra.rollout import ReleaseMemory, roll


@dataclass(frozen=True)
class Plan:
    actions: list[Action]
    history: dict[str, Remembered]
    observed: dict[str, Observed]
    releases: dict[str, ReleaseMemory] = field(default_factory=dict)  # the rollout's fleet-level memory
    rollout: dict[str, Any] = field(default_factory=dict)  # infra/rollout.py's view (reconcile --json)

    @property
    def verdicts(self) -> dict[str, Action]:
        return {a.worker: a for a in self.actions}


def plan(
    desired: Sequence[Worker],
    observed: Mapping[str, Observed],
    now: float,
    policy: Policy,
    *,
    history: Mapping[str, Remembered],
    unreachable_zones: frozenset[str] = frozenset(),
    managed: Iterable[str] = (),
    job_complete: bool = False,
    liveness: Liveness | None = None,
    release: str = "",
    releases: Mapping[str, ReleaseMemory] | None = None,
) -> Plan:
    """Judge the last pass's creates (settle), count time in state from the memory (with_history), decide,
    then roll (infra/rollout.py: waves and the circuit breaker of `release`, the desired one; "" = off).
    `observed` is the raw observation (each `since` the API's creation time)."""
    history = settle(history, observed, policy, unreachable_zones)
    observed = with_history(observed, history, now)
    actions = decide(
        desired,
        observed,
        now,
        policy,
        unreachable_zones=unreachable_zones,
        job_complete=job_complete,
        managed=managed,
        liveness=liveness,
        history=history,
    )
    if job_complete and policy.scale_to_zero:
        release = ""  # scaling to zero: nothing to roll
    r = roll(actions, desired, observed, now, policy, release, liveness=liveness, history=history, releases=releases)
    return Plan(r.actions, r.history, observed, r.releases, r.view)


__all__ = ["Plan", "plan"]
