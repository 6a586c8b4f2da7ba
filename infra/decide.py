"""decide: the pure heart of reconcile (docs/operations.md).

    actions = decide(desired, observed, now, policy, unreachable_zones=..., job_complete=..., managed=...)

A function of its arguments only: no I/O, no clock, no cloud imports. Like a Kubernetes controller's
reconcile function it is level-triggered: it looks at where the fleet *is* and says, per worker, what
would bring it to where it *should be*. Running it twice on the same world gives the same answer, and
once its actions are carried out, deciding again asks for nothing more (tests/test_decide.py proves both).

Every desired worker gets exactly one Action; every resource that carries this fleet's label but is not
desired gets one too, as does every name Terraform still manages that is no longer desired.

Kinds (what the actor does with each):
  healthy        nothing; queued resource ACTIVE and node READY (or, with no queued resource, node READY),
                 and (when the job's worker records are read) its worker heartbeating
  pending        nothing; on its way up (queued, provisioning, creating, repairing) within the provisioning
                 limit, or READY with its worker still booting within the boot timeout
  wait           nothing this pass; suspending (never force-deleted), being deleted/stopped, its zone could
                 not be observed, or its last create failed and it is backing off
  report         nothing, but a person should look (provisioning past the limit with policy "report", a
                 state actfleet does not understand, a same-named resource without this fleet's label)
  create         desired and absent: the Terraform apply creates it
  replace        broken (QR SUSPENDED/FAILED, node PREEMPTED/TERMINATED/STOPPED, node gone, provisioning past
                 the limit with policy "replace", a READY node whose worker never started work, stalled,
                 or stopped for good saying why: its record's state "failed" with a reason, e.g. a full disk):
                 the apply recreates it (-replace=)
  remove         no longer desired (taken out of the config, or the job is done and the fleet scales to
                 zero) but still managed by Terraform: the apply destroys it
  delete-orphan  carries this fleet's label, not desired, not in Terraform's state: deleted through the TPU
                 API (it holds quota and Terraform does not know it)

The local process fleet (`actfleet local`) drives the same function: a running process is observed as
qr_state "ACTIVE" / node_state "READY", an exited one as node_state "PREEMPTED", a missing one as absent.

Memory between passes (the controller's only state besides the cloud) is a `Remembered` per worker: when
it entered its observed state (so limits count from there, not from the queued resource's creation), and
the backoff of its failing creates. `settle` and `with_history` (before deciding: infra/plan.py runs them
with decide) and `remember` (after acting) are the pure halves; infra/reconcile.py loads and saves it next
to the reconcile lock.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from actfleet.config import Config, Worker, zone_of

# TPU state names and groups are defined once, in infra/tpu_states.py.
from actfleet.infra.tpu_states import (
    HEALTH_MAINTENANCE,
    HEALTH_UNRESPONSIVE,
    NODE_BROKEN,
    NODE_CREATING,
    NODE_DELETING,
    NODE_GOING,
    NODE_LOST,
    NODE_PREEMPTED,
    NODE_READY,
    NODE_STARTING,
    NODE_TERMINATED,
    QR_ACTIVE,
    QR_BROKEN,
    QR_DELETING,
    QR_FAILED,
    QR_PROVISIONING,
    QR_SUSPENDING,
)

FLEET_LABEL = "actfleet-fleet"

# --- Action kinds ------------------------------------------------------------------------------------
HEALTHY, PENDING, WAIT, REPORT = "healthy", "pending", "wait", "report"
CREATE, REPLACE, REMOVE, DELETE_ORPHAN = "create", "replace", "remove", "delete-orphan"
# Added by the rollout layer (infra/rollout.py): told to drain before a rollout replaces it (through the job
# store), and a broken worker of a halted release deleted without being recreated (through the TPU API).
DRAIN, HOLD = "drain", "hold"
KINDS = (HEALTHY, PENDING, WAIT, REPORT, CREATE, REPLACE, REMOVE, DELETE_ORPHAN, DRAIN, HOLD)
APPLY_KINDS = frozenset({CREATE, REPLACE, REMOVE})  # carried out by the one terraform apply

# Why a worker was replaced, counted apart as SkyPilot counts recoveries from preemptions and restarts on
# errors; and what kind of error (the first word an operator needs: fix a permission, or wait for capacity).
PREEMPTION, ERROR, ROLLOUT = "preemption", "error", "rollout"  # ROLLOUT: moved to the new release
ERROR_CLASSES = ("permission", "invalid-argument", "quota", "boot", "stalled", "worker-failed", "unknown")
API_KINDS = frozenset({DELETE_ORPHAN, HOLD})  # carried out through the TPU API
STORE_KINDS = frozenset({DRAIN})  # carried out through the job's store
ACTING_KINDS = APPLY_KINDS | API_KINDS | STORE_KINDS


@dataclass(frozen=True)
class Observed:
    """What the cloud says about one resource name in one zone (queued resource and/or node)."""

    name: str
    zone: str
    qr_state: str | None  # None: no queued resource of that name (vm mode, or deleted)
    node_state: str | None  # None: no node of that name (not provisioned yet, or deleted)
    labels: Mapping[str, str] = field(default_factory=dict)
    since: float | None = None  # epoch seconds it entered its current state (with_history); None: unknown
    created: float | None = None  # the node's create time (a worker record older than it is a past life's)
    initiator: str = ""  # the queued resource's state initiator: "SERVICE" for a preemption, "USER", ""
    error_code: str = ""  # a FAILED queued resource's state.failed_data.error: google.rpc code name
    error_message: str = ""
    health: str = ""  # the node's Node.Health name ("HEALTHY", "TIMEOUT", "UNHEALTHY_MAINTENANCE"; "" unreported)


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
    boot_timeout_s: float = 30 * 60  # READY this long with no worker record since the node was made: replace
    heartbeat_timeout_s: float = 15 * 60  # a worker record older than this on a READY node: replace
    backoff_base_s: float = 5 * 60  # a failed create waits this long before the next, doubling...
    backoff_max_s: float = 60 * 60  # ...up to this
    retry_now: bool = False  # `reconcile --retry-now`: ignore the backoff (and a rollout's halt) this pass
    # [rollout] (infra/rollout.py): workers moved to a new release at a time (a count or "N%"), how long a
    # worker told to drain is given before it is replaced anyway, failed boots in a row that halt a release.
    max_unavailable: int | str = "10%"
    drain_timeout_s: float = 15 * 60
    halt_after_failed_boots: int = 3

    @staticmethod
    def from_config(cfg: Config) -> "Policy":
        return Policy(
            fleet_id=cfg.fleet.id,
            provision_timeout_s=cfg.reconcile.provision_timeout_minutes * 60.0,
            on_provision_timeout=cfg.reconcile.on_provision_timeout,
            scale_to_zero=cfg.reconcile.scale_to_zero_when_done,
            boot_timeout_s=cfg.reconcile.boot_timeout_minutes * 60.0,
            heartbeat_timeout_s=cfg.reconcile.heartbeat_timeout_minutes * 60.0,
            max_unavailable=cfg.rollout.max_unavailable,
            drain_timeout_s=cfg.rollout.drain_timeout_minutes * 60.0,
            halt_after_failed_boots=cfg.rollout.halt_after_failed_boots,
        )

    def backoff(self, failures: int) -> float:
        """Seconds to wait after the `failures`-th failed create in a row: 5 min, 10, 20, 40, 60, 60, ..."""
        return min(self.backoff_max_s, self.backoff_base_s * 2 ** max(0, failures - 1))


@dataclass(frozen=True)
class WorkRecord:
    """What a worker last wrote about itself in the job's store (workers/{id}.json)."""

    last_heartbeat: float | None
    state: str = "unknown"  # the worker's own: starting, idle, working, waiting, finished, stopped, ...
    reason: str | None = None  # with state "failed": why it stopped for good ("disk full: ..."; the worker's own)


@dataclass(frozen=True)
class Liveness:
    """The job's worker records, for the boot and heartbeat rules. `judged` is False when the job is not
    prepared or already complete (a worker then has nothing to do, so silence proves nothing); `error`
    is set when the store could not be read (then nobody is replaced on that ground)."""

    records: Mapping[str, WorkRecord] = field(default_factory=dict)
    judged: bool = True
    error: str | None = None
    clock_skew: Mapping[str, float] = field(default_factory=dict)  # worker -> s off the store's clock (reported)


@dataclass(frozen=True)
class Remembered:
    """One worker's memory between passes (persisted next to the reconcile lock)."""

    phase: str = ""  # the observed state it was in (phase()), and...
    since: float | None = None  # ...when it entered it
    attempts: int = 0  # creates that failed in a row
    next_attempt: float | None = None  # not before this epoch second (backoff), when attempts > 0
    last_attempt: float | None = None  # a create/replace asked for by the last acting pass, not yet judged
    pending_error: dict | None = None  # what the last apply said about that create, if it failed there
    error: dict | None = None  # the last failure: {"code", "message", "class"}
    preemptions: int = 0  # replacements caused by preemption, ever
    errors: int = 0  # replacements and failed creates caused by errors, ever
    drain_requested: float | None = None  # when a rollout told it to drain (infra/rollout.py)
    rolled: str = ""  # the release a rollout moved it to, until its worker starts work there

    def to_json(self) -> dict:
        # By hand, not dataclasses.asdict (which deep-copies every field): 10,000 workers a pass.
        return {k: getattr(self, k) for k in _REMEMBERED_FIELDS}

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> "Remembered":
        return Remembered(**{k: d[k] for k in _REMEMBERED_FIELDS if k in d})


_REMEMBERED_FIELDS = tuple(Remembered.__dataclass_fields__)


@dataclass(frozen=True)
class Action:
    worker: str
    zone: str
    kind: str  # one of KINDS
    reason: str
    error: dict | None = None  # {"code", "message", "class"}: the failure behind a replace or a backoff
    next_attempt: float | None = None  # a backing-off create's next attempt (epoch seconds)
    cause: str | None = None  # a replace's cause: PREEMPTION or ERROR

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
    liveness: Liveness | None = None,
    history: Mapping[str, Remembered] | None = None,
) -> list[Action]:
    """One Action per desired worker (in `desired` order), then one per undesired name (sorted).

    observed:          name -> Observed, for every resource listed in the zones that answered.
    unreachable_zones: zones whose API calls failed this pass; nothing in them is judged or touched.
    job_complete:      the work queue reports every unit done; with policy.scale_to_zero nothing is desired.
    managed:           names Terraform's state holds (so an undesired one is removed by the apply, not
                       deleted as an orphan). Empty for fleets that are not Terraform-managed.
    liveness:          the job's worker records (boot and heartbeat rules); None: those rules are off.
    history:           each worker's memory (backoff of failing creates); None: no backoff.
    """
    managed = frozenset(managed)
    history = history or {}
    scaling_to_zero = job_complete and policy.scale_to_zero
    wanted = [] if scaling_to_zero else list(desired)
    wanted_names = {w.name for w in wanted}
    actions = [
        _decide_desired(w, observed.get(w.name), now, policy, unreachable_zones, liveness, history.get(w.name))
        for w in wanted
    ]

    why_undesired = "job complete: scaling to zero" if scaling_to_zero else "no longer in the config"
    undesired = sorted(({n for n, o in observed.items() if _ours(o, policy)} | managed) - wanted_names)
    for name in undesired:
        o = observed.get(name)
        zone = o.zone if o else zone_of(name)
        if zone in unreachable_zones:
            actions.append(Action(name, zone, WAIT, f"zone {zone} could not be observed; left alone"))
        elif o and (o.qr_state == QR_DELETING or o.node_state == NODE_DELETING):
            actions.append(Action(name, zone, WAIT, "being deleted"))
        elif o and o.qr_state == QR_SUSPENDING:
            actions.append(Action(name, zone, WAIT, "queued resource SUSPENDING: waited for, never force-deleted"))
        elif name in managed:
            where = f" ({_state(o)})" if o else " (already gone from the cloud)"
            actions.append(Action(name, zone, REMOVE, why_undesired + "; Terraform destroys it" + where))
        else:
            actions.append(
                Action(
                    name,
                    zone,
                    DELETE_ORPHAN,
                    f"labelled {FLEET_LABEL}={policy.fleet_id} but not desired and not in "
                    f"Terraform's state ({_state(o)}): it holds quota",
                )
            )
    return actions


def _decide_desired(
    w: Worker,
    o: Observed | None,
    now: float,
    policy: Policy,
    unreachable_zones: frozenset[str],
    liveness: Liveness | None,
    h: Remembered | None,
) -> Action:
    def act(kind: str, reason: str, **kw) -> Action:
        return Action(w.name, w.zone, kind, reason, **kw)

    def backing_off() -> bool:
        return (
            h is not None
            and h.attempts > 0
            and h.next_attempt is not None
            and now < h.next_attempt
            and not policy.retry_now
        )

    def backoff_wait(what: str) -> Action:
        err = h.error or {}
        why = f" ({err.get('code', '?')}: {err.get('message', '')})" if err else ""
        return act(
            WAIT,
            f"{what}; create failed {h.attempts} time{'s' if h.attempts > 1 else ''}{why}; "
            f"next attempt at {_iso(h.next_attempt)}",
            error=h.error,
            next_attempt=h.next_attempt,
        )

    if w.zone in unreachable_zones:
        return act(WAIT, f"zone {w.zone} could not be observed; left alone this pass")
    if o is None or (o.qr_state is None and o.node_state is None):
        if backing_off():
            return backoff_wait("absent")
        retry = (
            f" (retrying a create that failed {h.attempts} time{'s' if h.attempts > 1 else ''})"
            if h is not None and h.attempts
            else ""
        )
        return act(CREATE, "desired but absent from the cloud" + retry, error=h.error if retry else None)
    if not _ours(o, policy):
        return act(
            REPORT,
            f"a resource named {w.name} exists without label {FLEET_LABEL}={policy.fleet_id}: not ours, left alone",
        )
    qr, node = o.qr_state, o.node_state

    if qr == QR_SUSPENDING:
        return act(WAIT, "queued resource SUSPENDING: waited for (never force-deleted); replaced once SUSPENDED")
    # Broken for good: spot TPUs are never restarted, suspended/failed QRs hold quota until deleted.
    if qr == QR_FAILED:
        err = failure(o.error_code or "UNKNOWN", o.error_message or "no reason given")
        if backing_off():
            return backoff_wait(f"queued resource FAILED: {err['code']}: {err['message']}")
        return act(REPLACE, f"queued resource FAILED: {err['code']}: {err['message']}", error=err, cause=ERROR)
    if qr in QR_BROKEN:
        preempted = node == NODE_PREEMPTED or o.initiator == "SERVICE"
        return act(
            REPLACE,
            f"queued resource {qr}"
            + (" (preempted)" if preempted and node != NODE_PREEMPTED else f", node {node}" if node else ""),
            cause=PREEMPTION if preempted else ERROR,
        )
    if node in NODE_BROKEN:
        return act(REPLACE, f"node {node}", cause=PREEMPTION if node in (NODE_PREEMPTED, NODE_TERMINATED) else ERROR)
    if node in NODE_LOST:
        # Not READY again by itself (UNKNOWN: a failed repair; HIDDEN: hidden away): replaced after a grace,
        # so a state seen once in passing does not cost a worker.
        if o.since is not None and now - o.since > policy.node_grace_s:
            return act(
                REPLACE,
                f"node {node} for {_minutes(now - o.since)}: not usable, replaced",
                cause=ERROR,
                error=failure(f"NODE_{node}", f"the node has been {node} for {_minutes(now - o.since)}"),
            )
        return act(PENDING, f"node {node}: replaced if it stays so past {_minutes(policy.node_grace_s)}")
    if qr == QR_DELETING or node in NODE_GOING:
        return act(
            WAIT,
            f"{'queued resource' if qr == QR_DELETING else 'node'} "
            f"{qr if qr == QR_DELETING else node}; recreated once it is gone",
        )

    if qr in QR_PROVISIONING or (qr in (None, QR_ACTIVE) and node in NODE_STARTING):
        return _provisioning(w, o, now, policy, f"queued resource {qr}" if qr in QR_PROVISIONING else f"node {node}")
    if qr == QR_ACTIVE and node is None:
        # Reconcile confirms with a GET before it gets here: a node missing from one listing is not gone.
        if o.since is not None and now - o.since > policy.node_grace_s:
            return act(
                REPLACE,
                "queued resource ACTIVE but its node is gone",
                cause=ERROR,
                error=failure("NODE_GONE", "the queued resource is ACTIVE but has no node"),
            )
        return act(PENDING, "queued resource ACTIVE, node not listed yet")
    if qr in (None, QR_ACTIVE) and node == NODE_READY:
        return _ready(w, o, now, policy, liveness)
    return act(REPORT, f"unexpected state ({_state(o)}): left alone")


def _ready(w: Worker, o: Observed, now: float, policy: Policy, liveness: Liveness | None) -> Action:
    """A READY node: healthy, unless the job's worker records say its worker never started or stalled."""
    ready = "node READY" if o.qr_state is None else "queued resource ACTIVE, node READY"
    if liveness is not None and liveness.error is not None:  # never replace on records we could not read
        return Action(w.name, w.zone, HEALTHY, ready + "; worker records unreadable, not judged")
    unhealthy = _unhealthy(w, o, now, policy, liveness)
    if unhealthy is not None:
        return unhealthy
    if liveness is None or not liveness.judged:
        return Action(w.name, w.zone, HEALTHY, ready)
    rec = liveness.records.get(w.name)
    wrote = (
        rec is not None and rec.last_heartbeat is not None and (o.created is None or rec.last_heartbeat >= o.created)
    )
    if not wrote:
        if policy.boot_timeout_s > 0 and o.since is not None and now - o.since > policy.boot_timeout_s:
            return Action(
                w.name,
                w.zone,
                REPLACE,
                f"never started work: READY for {_minutes(now - o.since)} with no worker record since "
                f"the node was created (boot timeout {_minutes(policy.boot_timeout_s)})",
                cause=ERROR,
                error=failure("BOOT_TIMEOUT", "no worker record since the node was created", "boot"),
            )
        return Action(w.name, w.zone, PENDING, ready + ", worker not started yet")
    failed = _failed(w, rec, o)
    if failed is not None:
        return failed
    if rec.state == "finished":
        return Action(w.name, w.zone, HEALTHY, ready + ", worker finished")
    if rec.state == "drained":  # it exited between units when a rollout asked: the rollout replaces it
        return Action(w.name, w.zone, HEALTHY, ready + ", worker drained for a rollout")
    age = now - rec.last_heartbeat
    if policy.heartbeat_timeout_s > 0 and age > policy.heartbeat_timeout_s:
        return Action(
            w.name,
            w.zone,
            REPLACE,
            f"stalled: last heartbeat {_minutes(age)} ago (heartbeat timeout {_minutes(policy.heartbeat_timeout_s)})",
            cause=ERROR,
            error=failure("STALLED", f"last heartbeat {_minutes(age)} ago", "stalled"),
        )
    return Action(w.name, w.zone, HEALTHY, ready)


def worker_failed(rec: WorkRecord | None, o: Observed) -> bool:
    """The worker on this node stopped for good and said why (state "failed" with a reason, written since this
    node was made: a past life's record under the same name says nothing about a fresh VM). Without the
    node's creation time, only a record written since the node entered its state counts."""
    made = o.created if o.created is not None else o.since
    return (
        rec is not None
        and rec.state == "failed"
        and bool(rec.reason)
        and rec.last_heartbeat is not None
        and made is not None
        and rec.last_heartbeat >= made
    )


def _failed(w: Worker, rec: WorkRecord, o: Observed) -> Action | None:
    """A worker that stopped for good (exit 74, a full disk: systemd does not restart it) is replaced: a new VM
    has a fresh disk. Class "worker-failed": the release's circuit breaker counts it as a failed boot."""
    if not worker_failed(rec, o):
        return None
    return Action(
        w.name,
        w.zone,
        REPLACE,
        f"worker failed: {rec.reason}",
        cause=ERROR,
        error=failure("WORKER_FAILED", rec.reason, "worker-failed"),
    )


def _unhealthy(w: Worker, o: Observed, now: float, policy: Policy, liveness: Liveness | None) -> Action | None:
    """A READY node whose health is not good: under maintenance it is waited for (pending); unresponsive it
    is replaced once that has lasted the heartbeat timeout, unless its worker's records say it works (they
    are the better witness). None: health says nothing against it."""
    if o.health == HEALTH_MAINTENANCE:
        return Action(w.name, w.zone, PENDING, "node READY but under maintenance (UNHEALTHY_MAINTENANCE): waited for")
    if o.health not in HEALTH_UNRESPONSIVE:
        return None
    if liveness is not None and liveness.judged and liveness.error is None:
        rec = liveness.records.get(w.name)
        if (
            rec is not None
            and rec.last_heartbeat is not None
            and now - rec.last_heartbeat <= policy.heartbeat_timeout_s
        ):
            return None  # its worker heartbeats: the boot and heartbeat rules judge it
    limit = policy.heartbeat_timeout_s or policy.boot_timeout_s
    if limit > 0 and o.since is not None and now - o.since > limit:
        return Action(
            w.name,
            w.zone,
            REPLACE,
            f"node READY but health {o.health} for {_minutes(now - o.since)} (limit {_minutes(limit)})",
            cause=ERROR,
            error=failure(f"HEALTH_{o.health}", f"node health {o.health} for {_minutes(now - o.since)}", "stalled"),
        )
    return Action(w.name, w.zone, PENDING, f"node READY but health {o.health}: replaced if it lasts {_minutes(limit)}")


def _provisioning(w: Worker, o: Observed, now: float, policy: Policy, what: str) -> Action:
    if o.since is None or now - o.since <= policy.provision_timeout_s:
        return Action(w.name, w.zone, PENDING, what)
    waited = f"{what} for {_minutes(now - o.since)}, over the {_minutes(policy.provision_timeout_s)} limit"
    if policy.on_provision_timeout == "replace":
        return Action(w.name, w.zone, REPLACE, waited, cause=ERROR)
    return Action(w.name, w.zone, REPORT, waited + ' (on_provision_timeout = "report")')


def _ours(o: Observed, policy: Policy) -> bool:
    return o.labels.get(FLEET_LABEL) == policy.fleet_id


def _state(o: Observed | None) -> str:
    if o is None:
        return "absent"
    return f"queued resource {o.qr_state or '-'}, node {o.node_state or '-'}"


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


# ----------------------------------------------------------------------------------------------------
# Errors: what failed, and of which kind
# ----------------------------------------------------------------------------------------------------


def classify(code: str, message: str = "") -> str:
    """The kind of a failure from its google.rpc code name (or HTTP status words) and message."""
    text = f"{code} {message}".lower()
    if "permission" in text or "forbidden" in text or "403" in code:
        return "permission"
    if (
        "quota" in text
        or "exhausted" in text
        or "capacity" in text
        or "stockout" in text
        or "not enough resources" in text
        or "429" in code
    ):
        return "quota"
    if (
        "invalid" in text
        or "not offered" in text
        or "not supported" in text
        or "failed precondition" in text
        or "failed_precondition" in text
        or "400" in code
    ):
        return "invalid-argument"
    return "unknown"


def failure(code: str, message: str, cls: str | None = None) -> dict:
    """{"code", "message", "class"}: how a failure travels in actions, the report and the memory. The class
    is one of ERROR_CLASSES (the report's JSON schema lists the same)."""
    cls = cls or classify(code, message)
    if cls not in ERROR_CLASSES:
        raise ValueError(f"error class {cls!r} is not one of {', '.join(ERROR_CLASSES)}")
    return {"code": code, "message": message, "class": cls}


# ----------------------------------------------------------------------------------------------------
# Memory between passes: the two pure halves (reconcile does the I/O)
# ----------------------------------------------------------------------------------------------------


def phase(o: Observed | None) -> str:
    """The state a worker is in, as time-in-state counts it. The steps of provisioning are one phase
    (the provisioning limit bounds them together); anything else is its exact pair of states, so a long-
    lived node entering REPAIRING starts a fresh clock."""
    if o is None or (o.qr_state is None and o.node_state is None):
        return "absent"
    if o.qr_state in QR_PROVISIONING or (o.qr_state in (None, QR_ACTIVE) and o.node_state == NODE_CREATING):
        return "provisioning"
    health = f"/{o.health}" if o.health in HEALTH_UNRESPONSIVE or o.health == HEALTH_MAINTENANCE else ""
    return f"{o.qr_state or '-'}/{o.node_state or '-'}{health}"  # bad health starts a fresh clock


def with_history(
    observed: Mapping[str, Observed], history: Mapping[str, Remembered], now: float
) -> dict[str, Observed]:
    """`observed` with each `since` set to when the worker entered its phase: remembered when the phase is
    unchanged; else now, except a first sighting while provisioning, which counts from the creation time
    the API gave (a resource starts in that phase)."""
    out = {}
    for name, o in observed.items():
        h = history.get(name)
        ph = phase(o)
        if h is not None and h.phase == ph and h.since is not None:
            since = h.since
        elif h is None and ph == "provisioning" and o.since is not None:
            since = o.since
        else:
            since = now
        out[name] = dataclasses.replace(o, since=since)
    return out


def settle(
    history: Mapping[str, Remembered],
    observed: Mapping[str, Observed],
    policy: Policy,
    unreachable_zones: frozenset[str] = frozenset(),
) -> dict[str, Remembered]:
    """Judge the creates the last acting pass asked for, from what is observed now: one that left the
    worker absent or FAILED failed (the backoff grows); one that left anything else took (it resets)."""
    out = dict(history)
    for name, h in history.items():
        if h.last_attempt is None:
            continue
        o = observed.get(name)
        if o is not None and o.zone in unreachable_zones or (o is None and zone_of(name) in unreachable_zones):
            continue  # not seen this pass: judge it next time
        if o is None or (o.qr_state is None and o.node_state is None) or o.qr_state == QR_FAILED:
            if o is not None and o.qr_state == QR_FAILED and o.error_code:
                err = failure(o.error_code, o.error_message or "no reason given")
            else:
                err = h.pending_error or failure("UNKNOWN", "the create did not take effect")
            attempts = h.attempts + 1
            out[name] = dataclasses.replace(
                h,
                attempts=attempts,
                last_attempt=None,
                pending_error=None,
                next_attempt=h.last_attempt + policy.backoff(attempts),
                error=err,
                errors=h.errors + 1,
            )
        else:
            out[name] = dataclasses.replace(
                h, attempts=0, next_attempt=None, last_attempt=None, pending_error=None, error=None
            )
    return out


def remember(
    history: Mapping[str, Remembered],
    observed: Mapping[str, Observed],
    actions: Sequence[Action],
    now: float,
    *,
    acted: bool,
    apply_errors: Mapping[str, dict] | None = None,
) -> dict[str, Remembered]:
    """The memory after a pass: each observed worker's phase and since (from with_history), and, when the
    pass acted, the creates it asked for (judged by settle() next pass) and the replacements it counted.
    Workers neither desired nor observed are forgotten."""
    apply_errors = apply_errors or {}
    out: dict[str, Remembered] = {}
    by_name = {a.worker: a for a in actions}
    for name in sorted(set(observed) | set(by_name)):
        h = history.get(name, Remembered())
        o, a = observed.get(name), by_name.get(name)
        ph, since = phase(o), o.since if o is not None else None
        if h.phase != ph or h.since != since:  # a converged pass copies nothing (10,000 workers)
            h = dataclasses.replace(h, phase=ph, since=since)
        if acted and a is not None and a.kind in (CREATE, REPLACE):
            h = dataclasses.replace(
                h,
                last_attempt=now,
                pending_error=apply_errors.get(name),
                preemptions=h.preemptions + (a.cause == PREEMPTION),
                errors=h.errors + (a.cause == ERROR),
            )
        out[name] = h
    return out


def needs_apply(actions: Iterable[Action]) -> bool:
    """True when the pass must run the one terraform apply."""
    return any(a.kind in APPLY_KINDS for a in actions)
