"""observe: what the cloud holds for a fleet, as decide() reads it (docs/operations.md).

    view = observe_fleet(TpuApi.from_config(cfg.fleet), zones)
    view.observed       name -> Observed (queued resource and node merged by name)
    view.unreachable    zone -> error line, for zones whose API calls failed after retries

The TPU client lists every zone in parallel with retries and pagination; this module only merges its
answer. It imports no cdktf and no Terraform: `actfleet status` and a converged reconcile pass stop here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Mapping

from actfleet.infra.decide import Observed

if TYPE_CHECKING:
    from actfleet.config import FleetConfig
    from actfleet.infra.tpu_api import Node, QueuedResource, TpuApi, ZoneError, ZoneView


@dataclass(frozen=True)
class FleetView:
    observed: dict[str, Observed]
    unreachable: dict[str, str]  # zone -> the error that made it unreachable
    queued_resources: dict[str, "QueuedResource"] = field(default_factory=dict)
    nodes: dict[str, "Node"] = field(default_factory=dict)
    api_calls: int = 0  # HTTP requests this observation made (retries and pages included)
    seconds: float = 0.0


def observe_fleet(api: "TpuApi", zones: Iterable[str]) -> FleetView:
    zones = sorted(set(zones))
    calls_before, started = api.calls, time.perf_counter()
    answer = api.observe(zones)
    observed, unreachable, qrs, nodes = merge(answer)
    return FleetView(observed, unreachable, qrs, nodes, api.calls - calls_before, time.perf_counter() - started)


def merge(answer: Mapping[str, "ZoneView | ZoneError"]):
    """Per-zone lists -> (observed by name, unreachable zones, queued resources by name, nodes by name).

    A queued resource and the node it made share the worker's name; a node whose queued resource is gone
    (or that was made without one, in vm mode) is observed on its own.
    """
    observed: dict[str, Observed] = {}
    unreachable: dict[str, str] = {}
    qrs: dict[str, QueuedResource] = {}
    nodes: dict[str, Node] = {}
    for zone, view in sorted(answer.items()):
        if not hasattr(view, "queued_resources"):
            unreachable[zone] = getattr(view, "message", str(view))
            continue
        zone_nodes = {n.name: n for n in view.nodes}
        node_of_qr = {n.queued_resource: n for n in view.nodes if n.queued_resource}
        for qr in view.queued_resources:
            node = node_of_qr.get(qr.name) or next((zone_nodes[i] for i in qr.node_ids if i in zone_nodes), None)
            if node is not None:
                zone_nodes.pop(node.name, None)
                nodes[qr.name] = node
            qrs[qr.name] = qr
            observed[qr.name] = observed_from(qr, node, zone)
        for node in zone_nodes.values():  # nodes without a queued resource
            nodes[node.name] = node
            observed[node.name] = observed_from(None, node, zone)
    return observed, unreachable, qrs, nodes


def observed_from(qr: "QueuedResource | None", node: "Node | None", zone: str) -> Observed:
    """One worker's Observed from its queued resource and/or node. Labels come from the queued resource's
    node spec, or from the node when there is none. `since` is the creation time here: with_history()
    (infra/decide.py) replaces it with when the worker entered its state."""
    assert qr is not None or node is not None
    name = qr.name if qr is not None else node.name
    return Observed(
        name=name,
        zone=zone,
        qr_state=qr.state if qr else None,
        node_state=node.state if node else None,
        labels=dict((qr.labels if qr else None) or (node.labels if node else {})),
        since=qr.create_time if qr is not None else node.create_time,
        created=node.create_time if node is not None else None,
        initiator=qr.state_initiator if qr is not None else "",
        error_code=qr.error_code if qr is not None else "",
        error_message=qr.error_message if qr is not None else "",
        health=node.health if node is not None else "",
    )


def fleet_api(fleet: "FleetConfig"):
    """The client a fleet is observed (and its API deletes made) through, by fleet.mode: Compute Engine's
    for "gce" (infra/compute_api.py, the same observe/get_node/delete_node shape), the TPU API's otherwise."""
    if fleet.mode == "gce":
        from actfleet.infra.compute_api import ComputeApi

        return ComputeApi.from_config(fleet)
    from actfleet.infra.tpu_api import TpuApi

    return TpuApi.from_config(fleet)
