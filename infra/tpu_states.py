"""TPU state names, as google.cloud.tpu_v2 spells them (QueuedResourceState.State and Node.State), and the
groups actfleet treats alike. Defined once: the client (infra/tpu_api.py), decide and observe read them here.
Stdlib only, like decide: `actfleet status` imports it without the Google client.
(tests/fakes/tpu_server.py keeps the proto enums themselves: it models the real API.)
"""

from __future__ import annotations

# --- Queued-resource states ----------------------------------------------------------------------------
QR_ACTIVE = "ACTIVE"
QR_SUSPENDING = "SUSPENDING"  # waited for: Google advises never to force-delete during suspension
QR_SUSPENDED = "SUSPENDED"
QR_FAILED = "FAILED"
QR_DELETING = "DELETING"
QR_PROVISIONING = frozenset({"CREATING", "ACCEPTED", "PROVISIONING", "WAITING_FOR_RESOURCES"})
# Hold quota and never recover, so they are replaced; a delete of one can get stuck, so it is re-deleted.
QR_BROKEN = frozenset({QR_SUSPENDED, QR_FAILED})

# --- Node states ---------------------------------------------------------------------------------------
NODE_READY = "READY"
NODE_CREATING = "CREATING"
NODE_PREEMPTED = "PREEMPTED"
NODE_TERMINATED = "TERMINATED"
NODE_DELETING = "DELETING"
NODE_BROKEN = frozenset({NODE_PREEMPTED, NODE_TERMINATED, "STOPPED"})  # spot TPUs never restart: replace
NODE_STARTING = frozenset({NODE_CREATING, "STARTING", "RESTARTING", "REPAIRING", "REIMAGING", "UNHIDING"})
NODE_GOING = frozenset({NODE_DELETING, "STOPPING", "HIDING"})
# Not usable and not coming back by themselves: UNKNOWN follows a failed repair (the API keeps such a node
# from being marked READY), HIDDEN is a node hidden away (actfleet never hides one). Replaced after a grace.
NODE_LOST = frozenset({"UNKNOWN", "HIDDEN"})

# --- Node health (Node.Health), reported beside a READY state -------------------------------------------
HEALTH_UNRESPONSIVE = frozenset({"TIMEOUT"})  # the node does not answer its health checks: replaced if it lasts
HEALTH_MAINTENANCE = "UNHEALTHY_MAINTENANCE"  # a maintenance event: waited for (it ends READY or TERMINATED)
