"""Compute Engine instance statuses (gce mode), as google.cloud.compute_v1 spells them (Instance.Status), and
how each maps into the TPU node-state vocabulary decide() reads (infra/tpu_states.py). Defined once: the
client (infra/compute_api.py) maps here, decide stays as it is, so rollout, halt, health, backoff and the
provisioning and boot limits judge a gce worker by the same rules as a queued or vm one.
Stdlib only, like decide: `actfleet status` imports it without the Google client.

    RUNNING                                    -> READY       ready: liveness from the worker records
    PROVISIONING, STAGING, PENDING (flex-start) -> CREATING    starting: the provisioning limit counts from
                                                              creationTimestamp, as for a queued resource
    REPAIRING                                  -> REPAIRING   starting, on a fresh clock (its own phase)
    STOPPING, SUSPENDING, PENDING_STOP,
    DEPROVISIONING                             -> STOPPING    going: waited for
    TERMINATED                                 -> TERMINATED  broken: replaced, counted as a preemption
                                                              (a spot instance preempted with action STOP)
    SUSPENDED, STOPPED                         -> STOPPED     broken: replaced, counted as an error
    (absent)                                   -> created;    labelled but not desired -> orphan (decide)

A status newer than the installed library is passed on as "GCE_<status>", which decide reports ("unexpected
state") rather than guessing: it can collide with no TPU state name.
"""

from __future__ import annotations

from actfleet.infra.tpu_states import NODE_CREATING, NODE_READY, NODE_TERMINATED

RUNNING = "RUNNING"
TERMINATED = "TERMINATED"
STARTING = frozenset({"PROVISIONING", "STAGING", "PENDING"})
REPAIRING = "REPAIRING"
GOING = frozenset({"STOPPING", "SUSPENDING", "PENDING_STOP", "DEPROVISIONING"})
BROKEN = frozenset({TERMINATED, "SUSPENDED", "STOPPED"})
STATUSES = frozenset({RUNNING, REPAIRING}) | STARTING | GOING | BROKEN  # every Instance.Status but UNDEFINED

# Spot scheduling (Scheduling.instanceTerminationAction): what Compute Engine does to a preempted instance.
STOP, DELETE = "STOP", "DELETE"

_NODE_STATE = {
    RUNNING: NODE_READY,
    REPAIRING: "REPAIRING",
    TERMINATED: NODE_TERMINATED,
    "SUSPENDED": "STOPPED",
    "STOPPED": "STOPPED",
    **{s: NODE_CREATING for s in STARTING},
    **{s: "STOPPING" for s in GOING},
}
UNKNOWN_PREFIX = "GCE_"


def node_state(status: str) -> str:
    """The TPU node-state name decide reads for an instance status: 'RUNNING' -> 'READY'."""
    return _NODE_STATE.get(status, UNKNOWN_PREFIX + status)
