"""decide: the pure heart of reconcile (docs/operations.md).

    actions = decide(desired, observed, now, policy, unreachable_zones=..., job_complete=..., managed=...)

A function of its arguments only: no I/O, no clock, no cloud imports. Like a Kubernetes controller's
reconcile function it is level-triggered: it looks at where the fleet *is* and says, per worker, what
would bring it to where it *should be*. Running it twice on the same world gives the same answer, and
once its actions are carried out, deciding again asks for nothing more (tests/test_decide.py proves both).

Every desired worker gets exactly one Action; every resource that carries this fleet's label but is not
desired gets one too, as does every name Terraform still manages that is no longer desired.

Kinds (what the actor does with each):
  healthy        nothing; queued resource ACTIVE and node READY (or, with no queued resource, node READY)
  pending        nothing; on its way up (queued, provisioning, creating) within the provisioning limit
  wait           nothing this pass; being deleted/stopped, or its zone could not be observed
  report         nothing, but a person should look (provisioning past the limit with policy "report", a
                 state actfleet does not understand, a same-named resource without this fleet's label)
  create         desired and absent: the Terraform apply creates it
  replace        broken (QR SUSPENDING/SUSPENDED/FAILED, node PREEMPTED/TERMINATED/STOPPED, provisioning past
                 the limit with policy "replace"): the apply recreates it (-replace=)
  remove         no longer desired (taken out of the config, or the job is done and the fleet scales to
                 zero) but still managed by Terraform: the apply destroys it
  delete-orphan  carries this fleet's label, not desired, not in Terraform's state: deleted through the TPU
                 API (it holds quota and Terraform does not know it)

The local process fleet (`actfleet local`) drives the same function: a running process is observed as
qr_state "ACTIVE" / node_state "READY", an exited one as node_state "PREEMPTED", a missing one as absent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from actfleet.config import Config, Worker, zone_of

FLEET_LABEL = "actfleet-fleet"

# --- Queued-resource states (google.cloud.tpu_v2 QueuedResourceState.State names) -------------------
QR_BROKEN = frozenset({"SUSPENDING", "SUSPENDED", "FAILED"})  # hold quota, never recover: replace
QR_PROVISIONING = frozenset({"CREATING", "ACCEPTED", "PROVISIONING", "WAITING_FOR_RESOURCES"})
QR_ACTIVE = "ACTIVE"
QR_DELETING = "DELETING"

# --- Node states (google.cloud.tpu_v2 Node.State names) ----------------------------------------------
NODE_READY = "READY"
NODE_BROKEN = frozenset({"PREEMPTED", "TERMINATED", "STOPPED"})  # spot TPUs never restart: replace
NODE_STARTING = frozenset({"CREATING", "STARTING", "RESTARTING", "REPAIRING", "REIMAGING", "UNHIDING"})
NODE_GOING = frozenset({"DELETING", "STOPPING", "HIDING"})

# --- Action kinds ------------------------------------------------------------------------------------
HEALTHY, PENDING, WAIT, REPORT = "healthy", "pending", "wait", "report"
CREATE, REPLACE, REMOVE, DELETE_ORPHAN = "create", "replace", "remove", "delete-orphan"
KINDS = (HEALTHY, PENDING, WAIT, REPORT, CREATE, REPLACE, REMOVE, DELETE_ORPHAN)
APPLY_KINDS = frozenset({CREATE, REPLACE, REMOVE})  # carried out by the one terraform apply
API_KINDS = frozenset({DELETE_ORPHAN})  # carried out through the TPU API
ACTING_KINDS = APPLY_KINDS | API_KINDS


@dataclass(frozen=True)
class Observed:
    """What the cloud says about one resource name in one zone (queued resource and/or node)."""

    name: str
    zone: str
    qr_state: str | None  # None: no queued resource of that name (vm mode, or deleted)
    node_state: str | None  # None: no node of that name (not provisioned yet, or deleted)
    labels: Mapping[str, str] = field(default_factory=dict)
    since: float | None = None  # epoch seconds it entered its current state (or was created); None: unknown


@dataclass(frozen=True)
class Policy:
    """The knobs decide() reads, from [fleet] and [reconcile] in fleet.toml."""

    fleet_id: str
    provision_timeout_s: float = 120 * 60
    on_provision_timeout: str = "report"  # "report" | "replace"
    scale_to_zero: bool = False  # when the job is complete, remove every worker
    # An ACTIVE queued resource whose node is not listed (yet) is given this long before it is called
    # broken: the two lists are read one after the other, so a just-activated QR may miss its node.
    node_grace_s: float = 120.0

    @staticmethod
    def from_config(cfg: Config) -> "Policy":
        return Policy(
            fleet_id=cfg.fleet.id,
            provision_timeout_s=cfg.reconcile.provision_timeout_minutes * 60.0,
            on_provision_timeout=cfg.reconcile.on_provision_timeout,
            scale_to_zero=cfg.reconcile.scale_to_zero_when_done,
        )


@dataclass(frozen=True)
class Action:
    worker: str
    zone: str
    kind: str  # one of KINDS
    reason: str

    @property
    def acts(self) -> bool:
        """True when carrying this action out changes the cloud."""
        return self.kind in ACTING_KINDS


def decide(
    desired: Sequence[Worker],
    observed: Mapping[str, Observed],
    now: float,
    policy: Policy,
    unreachable_zones: frozenset[str] = frozenset(),
    job_complete: bool = False,
    managed: Iterable[str] = (),
) -> list[Action]:
    """One Action per desired worker (in `desired` order), then one per undesired name (sorted).

    observed:          name -> Observed, for every resource listed in the zones that answered.
    unreachable_zones: zones whose API calls failed this pass; nothing in them is judged or touched.
    job_complete:      the work queue reports every unit done; with policy.scale_to_zero nothing is desired.
    managed:           names Terraform's state holds (so an undesired one is removed by the apply, not
                       deleted as an orphan). Empty for fleets that are not Terraform-managed.
    """
    managed = frozenset(managed)
    scaling_to_zero = job_complete and policy.scale_to_zero
    wanted = [] if scaling_to_zero else list(desired)
    wanted_names = {w.name for w in wanted}
    actions = [_decide_desired(w, observed.get(w.name), now, policy, unreachable_zones) for w in wanted]

    why_undesired = "job complete: scaling to zero" if scaling_to_zero else "no longer in the config"
    undesired = sorted(({n for n, o in observed.items() if _ours(o, policy)} | managed) - wanted_names)
    for name in undesired:
        o = observed.get(name)
        zone = o.zone if o else zone_of(name)
        if zone in unreachable_zones:
            actions.append(Action(name, zone, WAIT, f"zone {zone} could not be observed; left alone"))
        elif o and (o.qr_state == QR_DELETING or o.node_state == "DELETING"):
            actions.append(Action(name, zone, WAIT, "being deleted"))
        elif name in managed:
            where = f" ({_state(o)})" if o else " (already gone from the cloud)"
            actions.append(Action(name, zone, REMOVE, why_undesired + "; Terraform destroys it" + where))
        else:
            actions.append(Action(name, zone, DELETE_ORPHAN,
                                  f"labelled {FLEET_LABEL}={policy.fleet_id} but not desired and not in "
                                  f"Terraform's state ({_state(o)}): it holds quota"))
    return actions


def _decide_desired(w: Worker, o: Observed | None, now: float, policy: Policy,
                    unreachable_zones: frozenset[str]) -> Action:
    def act(kind: str, reason: str) -> Action:
        return Action(w.name, w.zone, kind, reason)

    if w.zone in unreachable_zones:
        return act(WAIT, f"zone {w.zone} could not be observed; left alone this pass")
    if o is None or (o.qr_state is None and o.node_state is None):
        return act(CREATE, "desired but absent from the cloud")
    if not _ours(o, policy):
        return act(REPORT, f"a resource named {w.name} exists without label {FLEET_LABEL}={policy.fleet_id}: "
                           f"not ours, left alone")
    qr, node = o.qr_state, o.node_state

    # Broken for good: spot TPUs are never restarted, suspended/failed QRs hold quota until deleted.
    if qr in QR_BROKEN:
        return act(REPLACE, f"queued resource {qr}")
    if node in NODE_BROKEN:
        return act(REPLACE, f"node {node}")
    if qr == QR_DELETING or node in NODE_GOING:
        return act(WAIT, f"{'queued resource' if qr == QR_DELETING else 'node'} "
                         f"{qr if qr == QR_DELETING else node}; recreated once it is gone")

    if qr in QR_PROVISIONING or (qr in (None, QR_ACTIVE) and node in NODE_STARTING):
        return _provisioning(w, o, now, policy, f"queued resource {qr}" if qr in QR_PROVISIONING
                             else f"node {node}")
    if qr == QR_ACTIVE and node is None:
        if o.since is not None and now - o.since > policy.node_grace_s:
            return act(REPLACE, "queued resource ACTIVE but its node is gone")
        return act(PENDING, "queued resource ACTIVE, node not listed yet")
    if qr in (None, QR_ACTIVE) and node == NODE_READY:
        return act(HEALTHY, "node READY" if qr is None else "queued resource ACTIVE, node READY")
    return act(REPORT, f"unexpected state ({_state(o)}): left alone")


def _provisioning(w: Worker, o: Observed, now: float, policy: Policy, what: str) -> Action:
    if o.since is None or now - o.since <= policy.provision_timeout_s:
        return Action(w.name, w.zone, PENDING, what)
    waited = f"{what} for {_minutes(now - o.since)}, over the {_minutes(policy.provision_timeout_s)} limit"
    if policy.on_provision_timeout == "replace":
        return Action(w.name, w.zone, REPLACE, waited)
    return Action(w.name, w.zone, REPORT, waited + " (on_provision_timeout = \"report\")")


def _ours(o: Observed, policy: Policy) -> bool:
    return o.labels.get(FLEET_LABEL) == policy.fleet_id


def _state(o: Observed | None) -> str:
    if o is None:
        return "absent"
    return f"queued resource {o.qr_state or '-'}, node {o.node_state or '-'}"


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


def needs_apply(actions: Iterable[Action]) -> bool:
    """True when the pass must run the one terraform apply."""
    return any(a.kind in APPLY_KINDS for a in actions)
