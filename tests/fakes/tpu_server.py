"""A fake Cloud TPU v2 API on loopback, speaking the REST JSON that `google.cloud.tpu_v2` sends.

It models what actfleet depends on, and nothing else:

- queued resources: ACCEPTED -> PROVISIONING -> ACTIVE after configurable delays (0 = instant), creating
  their node (CREATING while provisioning, READY when ACTIVE) from the node spec, with its labels,
  metadata, service account and spot scheduling; a zone in stockout holds new QRs in
  WAITING_FOR_RESOURCES until the stockout ends;
- preemption: node PREEMPTED and its queued resource SUSPENDING for `suspend_delay` seconds, then SUSPENDED
  (initiator SERVICE);
- delete (QR with `force`, or node) as long-running operations, optionally taking `delete_delay` seconds;
  a delete can be made to get stuck (`stick_delete`: the operation succeeds but the queued resource stays
  FAILED or SUSPENDED, so only a second delete removes it), as Google warns real ones do;
- FAILED queued resources that explain themselves in `state.failedData.error` {code, message}, and zones
  whose creates keep failing (`fail_creates`: refused with 403/400/429, or accepted and then FAILED);
- node states set by hand (`set_node_state`: REPAIRING, TERMINATED, PREEMPTED, ...), and a node left out of
  the next list answers while a GET still finds it (`hide_from_lists`);
- list pagination (pageSize/pageToken, the server's own page size when none is asked), 404/409/400 the way
  the real API answers them, enums as integers when the client asks `$alt=json;enum-encoding=int`;
- fault injection per zone / method / path regex: an HTTP status for the next N calls (or forever), or a
  delay before answering;
- a call log (method, path, zone, resource id, status, time).
- scale: resources indexed by zone and name, each one's JSON cached until it changes, lifecycle steps taken
  from a heap of due times; no call costs in proportion to the fleet (tests/test_tpu_fake_scale.py counts).

Bodies are parsed and written with the client library's own protobuf types, so a field the real API does
not know is a 400 here too.

Use it in-process:

    with FakeTpuServer.start(port=0, provision_delay=0.5) as fake:
        api = TpuApi("my-project", fake.url)
        fake.preempt("us-central1-a", "tpu-us-central1-a-0")
        fake.calls(method="GET")

from another process (terraform provisioners, a person) through the control endpoints under `/_fake/`
(docs/tpu-api.md lists them), or by hand:

    python -m tests.fakes.tpu_server --port 8470 --provision-delay 5
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import re
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator
from urllib.parse import parse_qs, urlsplit

from google.cloud.tpu_v2.types import cloud_tpu
from google.longrunning import operations_pb2
from google.protobuf import empty_pb2, json_format, timestamp_pb2
from google.rpc import status_pb2

QRState = cloud_tpu.QueuedResourceState.State
Initiator = cloud_tpu.QueuedResourceState.StateInitiator
NodeState = cloud_tpu.Node.State

# /v2/projects/{project}/locations/{zone}/{collection}[/{id}][:verb]
PATH_RE = re.compile(
    r"^/v2/projects/(?P<project>[^/]+)/locations/(?P<zone>[^/]+)"
    r"(?:/(?P<collection>queuedResources|nodes|operations)(?:/(?P<id>[^/:]+))?)?$"
)

# Queued-resource states that time alone never changes.
_SETTLED = frozenset({QRState.ACTIVE, QRState.SUSPENDED, QRState.FAILED, QRState.DELETING})

# google.rpc.Code numbers by name, and the HTTP status the real API answers each with.
RPC_CODES = {
    "INVALID_ARGUMENT": 3,
    "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6,
    "PERMISSION_DENIED": 7,
    "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9,
    "INTERNAL": 13,
    "UNAVAILABLE": 14,
}
RPC_HTTP = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "RESOURCE_EXHAUSTED": 429,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
}

HTTP_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ALREADY_EXISTS",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    501: "NOT_IMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
FAULT_MESSAGES = {
    403: "The caller does not have permission (injected by the fake)",
    429: "Quota exceeded for quota metric 'Read requests' (injected by the fake)",
    500: "Internal error encountered (injected by the fake)",
    503: "The service is currently unavailable (injected by the fake)",
}


class ApiError(Exception):
    """An error answer in Google's JSON error format."""

    def __init__(self, code: int, message: str, status: str | None = None):
        super().__init__(message)
        self.code = code
        self.status = status or HTTP_STATUS_NAMES.get(code, "UNKNOWN")
        self.message = message

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message, "status": self.status}}


@dataclass
class Fault:
    """Answer `status` (or wait `delay` seconds, then answer normally) to matching calls."""

    status: int | None = 503
    count: int | None = 1  # None = forever
    zone: str | None = None
    method: str | None = None
    path: str | None = None  # a regex searched in "path?query" of the request
    delay: float = 0.0

    def matches(self, method: str, target: str, zone: str | None) -> bool:
        return (
            (self.zone is None or self.zone == zone)
            and (self.method is None or self.method.upper() == method)
            and (self.path is None or re.search(self.path, target) is not None)
        )


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    zone: str | None
    resource: str | None  # the queued resource / node / operation id, when the path names one
    status: int
    time: float  # time.time() when the answer was sent
    query: str = ""  # the raw query string, e.g. "%24alt=json%3Benum-encoding%3Dint&pageToken=3"


@dataclass
class _QR:
    message: cloud_tpu.QueuedResource
    state_since: float
    project: str
    zone: str
    state: Any = None  # mirrors message.state.state: proto-plus reads are too slow for advance() at scale
    fail_with: tuple[str, str] | None = None  # (code, message): FAILED instead of PROVISIONING when accepted
    stuck_deletes: int = 0  # deletes still to be accepted without effect (the QR stays as it was)
    owner: Any = None  # the FakeTpuState holding it: told of every state change (to schedule the next)

    @property
    def id(self) -> str:
        return self.message.name.rsplit("/", 1)[1]

    def set_state(self, state, now: float, initiator=Initiator.SERVICE, error: tuple[str, str] | None = None) -> None:
        self.message.state = cloud_tpu.QueuedResourceState(state=state, state_initiator=initiator)
        if state == QRState.FAILED and error is not None:
            code, message = error
            self.message.state.failed_data = cloud_tpu.QueuedResourceState.FailedData(
                error=status_pb2.Status(code=RPC_CODES.get(code, 2), message=message)
            )
        self.state = state
        self.state_since = now
        if self.owner is not None:
            self.owner._state_changed(self)


@dataclass
class _Op:
    name: str
    done_at: float  # monotonic time at which the operation completes
    response: Any  # a protobuf message (the QR, or Empty)
    target: str
    verb: str
    on_done: Any = None  # callable run once when the operation completes (the actual delete)
    finished: bool = False


class _Index(dict):
    """full name -> resource, also bucketed by parent ("projects/p/locations/z") with each bucket's names
    kept sorted on demand, so a zone's list pages never scan (or sort) the other zones' resources.

    Every way the fake (or a test) changes the dict goes through here: set, del, pop, clear."""

    def __init__(self, on_add=None, on_remove=None):
        super().__init__()
        self.buckets: dict[str, dict[str, Any]] = {}
        self._sorted: dict[str, list[str]] = {}
        self._on_add, self._on_remove = on_add, on_remove

    @staticmethod
    def parent_of(name: str) -> str:
        return name.rsplit("/", 2)[0]

    def __setitem__(self, name: str, value: Any) -> None:
        if name in self:
            self._unindex(name)
        super().__setitem__(name, value)
        parent = self.parent_of(name)
        self.buckets.setdefault(parent, {})[name] = value
        self._sorted.pop(parent, None)
        if self._on_add:
            self._on_add(name, value)

    def _unindex(self, name: str) -> None:
        parent = self.parent_of(name)
        value = self.buckets[parent].pop(name)
        self._sorted.pop(parent, None)
        if self._on_remove:
            self._on_remove(name, value)

    def __delitem__(self, name: str) -> None:
        super().__delitem__(name)  # KeyError first, as a dict's
        self._unindex(name)

    def pop(self, name: str, *default: Any) -> Any:
        if name not in self:
            return super().pop(name, *default)
        value = super().pop(name)
        self._unindex(name)
        return value

    def clear(self) -> None:
        for name in list(self):
            del self[name]

    def sorted_names(self, parent: str) -> list[str]:
        names = self._sorted.get(parent)
        if names is None:
            names = self._sorted[parent] = sorted(self.buckets.get(parent, ()))
        return names

    def parents_in(self, zone: str) -> list[str]:
        return [p for p in self.buckets if p.endswith(f"/locations/{zone}")]


@dataclass
class FakeSettings:
    accept_delay: float = 0.0  # ACCEPTED -> PROVISIONING (or WAITING_FOR_RESOURCES in a stockout)
    provision_delay: float = 0.0  # PROVISIONING -> ACTIVE
    delete_delay: float = 0.0  # how long a delete's operation runs before the resource is gone
    suspend_delay: float = 0.0  # how long a preempted queued resource stays SUSPENDING before SUSPENDED
    page_size: int = 50  # the server's page size when the client asks none (or more)
    zones: tuple[str, ...] | None = None  # known zones; None = any zone exists
    # The real API answers a stored queued resource's tpu.nodeSpec[].parent with the project NUMBER
    # ("projects/123456789012/locations/..."), whatever the request said; "" keeps the request's parent.
    project_number: str = ""
    # Seconds every API answer takes (the real API's: ~0.2-0.5 s a read, more for a create): for benchmarks.
    latency: float = 0.0


class FakeTpuState:
    """The fake's model, independent of HTTP. Callers hold `lock` and call `advance()` before looking."""

    def __init__(self, settings: FakeSettings | None = None):
        self.settings = settings or FakeSettings()
        self.lock = threading.RLock()
        self.in_flight = 0  # API requests being answered right now
        self.clear()

    def clear(self) -> None:
        """Forget everything but the settings (the caller holds the lock, or nobody else has the state)."""
        # Indexed so that no call costs in proportion to the whole fleet (tests/test_tpu_fake_scale.py):
        # by parent (a zone's lists), QRs' next transitions by due time (advance), nodes by their QR.
        self.due: list[tuple[float, int, str]] = []  # a heap: (when, tie-break, QR full name) to step
        self._due_ids = itertools.count()
        self.qr_nodes: dict[str, set[str]] = {}  # QR full name -> its nodes' full names
        self.qrs: dict[str, _QR] = _Index(self._qr_added, self._qr_removed)  # full name -> QR
        self.nodes: dict[str, cloud_tpu.Node] = _Index(self._node_added, self._node_removed)  # full name -> node
        self.ops: dict[str, _Op] = {}
        self.pending_ops: list[tuple[float, int, _Op]] = []  # a heap of operations not done yet
        # Each resource's JSON as last encoded, (full name, int enums) -> (the object, its dict); dropped
        # whenever the resource changes, so a converged fleet is listed without encoding anything again.
        self.json_cache: dict[tuple[str, bool], tuple[Any, dict]] = {}
        # What calls cost, for the scale regression test: "scanned" resources looked at by list pages and
        # lifecycle steps, "encoded" resources turned into JSON.
        self.counters: Counter = Counter()
        self.stockout: set[str] = set()
        self.failing_creates: dict[str, tuple[str, str, str]] = {}  # zone -> (how, code, message)
        self.hidden: dict[str, int] = {}  # node full name -> node lists still to leave it out of
        self.qr_deletes: list[tuple[str, str]] = []  # (queued resource id, its state when a delete arrived)
        self.faults: list[Fault] = []
        self.log: list[Call] = []
        self.max_in_flight = 0  # the most answered at once: proves a client's calls overlap
        self._op_ids = itertools.count(1)
        self._node_ids = itertools.count(1000)

    # -------------------------------------------------------------- the lifecycle clock

    def advance(self) -> None:
        """Move queued resources and operations along by the time that has passed. Lazy, and exact: only
        what is due is touched (a heap of due times), and a transition is dated when it was due, not when
        a call noticed it."""
        now = time.monotonic()
        s = self.settings
        while self.due and self.due[0][0] <= now:
            _, _, name = heapq.heappop(self.due)
            self.counters["scanned"] += 1
            qr = self.qrs.get(name)
            if qr is not None:
                self._step(qr, now, s)
        while self.pending_ops and self.pending_ops[0][0] <= now:
            _, _, op = heapq.heappop(self.pending_ops)
            op.finished = True
            if op.on_done:
                op.on_done()

    def _schedule(self, qr: _QR, at: float | None = None) -> None:
        """Put the QR's next time-driven transition on the heap (a stale entry costs one no-op step)."""
        s = self.settings
        if at is None:
            at = {
                QRState.ACCEPTED: s.accept_delay,
                QRState.SUSPENDING: s.suspend_delay,
                QRState.PROVISIONING: s.provision_delay,
            }.get(qr.state)
            if at is None:
                return  # settled, or WAITING_FOR_RESOURCES (scheduled when its zone's stockout ends)
            at += qr.state_since
        heapq.heappush(self.due, (at, next(self._due_ids), qr.message.name))

    def reschedule_all(self) -> None:
        """After the delays or a stockout changed: every unsettled QR's due time again (rare: O(fleet))."""
        now = time.monotonic()
        for qr in self.qrs.values():
            if qr.state == QRState.WAITING_FOR_RESOURCES and qr.zone not in self.stockout:
                self._schedule(qr, now)
            elif qr.state not in _SETTLED:
                self._schedule(qr)

    def _step(self, qr: _QR, now: float, s: "FakeSettings") -> None:
        # A loop, because with zero delays a QR passes several states in one step.
        while True:
            st, since = qr.state, qr.state_since
            age = now - since
            if st == QRState.ACCEPTED and age >= s.accept_delay and qr.fail_with is not None:
                qr.set_state(QRState.FAILED, since + s.accept_delay, Initiator.SERVICE, qr.fail_with)
            elif st == QRState.SUSPENDING and age >= s.suspend_delay:
                qr.set_state(QRState.SUSPENDED, since + s.suspend_delay, Initiator.SERVICE)
            elif st == QRState.ACCEPTED and age >= s.accept_delay:
                if qr.zone in self.stockout:
                    qr.set_state(QRState.WAITING_FOR_RESOURCES, since + s.accept_delay)
                else:
                    qr.set_state(QRState.PROVISIONING, since + s.accept_delay)
                    self._make_node(qr, NodeState.CREATING)
            elif st == QRState.WAITING_FOR_RESOURCES and qr.zone not in self.stockout:
                qr.set_state(QRState.PROVISIONING, now)  # when the stockout ended is not recorded: now
                self._make_node(qr, NodeState.CREATING)
            elif st == QRState.PROVISIONING and age >= s.provision_delay:
                qr.set_state(QRState.ACTIVE, since + s.provision_delay)
                for node in self._nodes_of(qr):
                    node.state = NodeState.READY
                    node.health = cloud_tpu.Node.Health.HEALTHY
                    self.node_changed(node.name)
            else:
                break

    # -------------------------------------------------------------- the indexes' upkeep

    def _state_changed(self, qr: _QR) -> None:
        self.json_cache.pop((qr.message.name, False), None)
        self.json_cache.pop((qr.message.name, True), None)
        if qr.message.name in self.qrs:
            self._schedule(qr)

    def _qr_added(self, name: str, qr: _QR) -> None:
        qr.owner = self
        self._schedule(qr)

    def _qr_removed(self, name: str, qr: _QR) -> None:
        self.json_cache.pop((name, False), None)
        self.json_cache.pop((name, True), None)

    def _node_added(self, name: str, node) -> None:
        if node.queued_resource:
            self.qr_nodes.setdefault(node.queued_resource, set()).add(name)
        self.node_changed(name)

    def _node_removed(self, name: str, node) -> None:
        owned = self.qr_nodes.get(node.queued_resource)
        if owned is not None:
            owned.discard(name)
            if not owned:
                del self.qr_nodes[node.queued_resource]
        self.node_changed(name)

    def node_changed(self, name: str) -> None:
        """Drop a node's cached JSON: every change to a node's fields must call this."""
        self.json_cache.pop((name, False), None)
        self.json_cache.pop((name, True), None)

    def _json(self, kind, name: str, obj, int_enums: bool) -> dict:
        hit = self.json_cache.get((name, int_enums))
        if hit is not None and hit[0] is obj:
            return hit[1]
        self.counters["encoded"] += 1
        out = _to_dict(kind, obj.message if kind is cloud_tpu.QueuedResource else obj, int_enums)
        self.json_cache[(name, int_enums)] = (obj, out)
        return out

    def _make_node(self, qr: _QR, state) -> None:
        for spec in qr.message.tpu.node_spec:
            name = f"projects/{qr.project}/locations/{qr.zone}/nodes/{spec.node_id}"
            node = cloud_tpu.Node.deserialize(cloud_tpu.Node.serialize(spec.node))  # a copy
            node.name = name
            node.state = state
            node.queued_resource = qr.message.name
            node.create_time = _now_ts()
            node.id = next(self._node_ids)
            node.api_version = cloud_tpu.Node.ApiVersion.V2
            if cloud_tpu.QueuedResource.pb(qr.message).HasField("spot"):
                node.scheduling_config = cloud_tpu.SchedulingConfig(spot=True)
            self.nodes[name] = node

    def _nodes_of(self, qr: _QR) -> list[cloud_tpu.Node]:
        return [self.nodes[n] for n in sorted(self.qr_nodes.get(qr.message.name, ()))]

    # -------------------------------------------------------------- API operations

    def list(
        self, project: str, zone: str, collection: str, page_size: int, page_token: str, int_enums: bool = False
    ) -> dict:
        self._check_zone(project, zone)
        parent = f"projects/{project}/locations/{zone}"
        if collection == "queuedResources":
            index, kind = self.qrs, cloud_tpu.QueuedResource
            names = index.sorted_names(parent)
        else:
            index, kind = self.nodes, cloud_tpu.Node
            names = index.sorted_names(parent)
            hidden = [n for n in self.hidden if n.startswith(parent + "/")]
            if hidden:
                # A node can be left out of a listing while a GET still finds it (eventual consistency).
                self.counters["scanned"] += len(names)
                names = [n for n in names if not self.hidden.get(n)]
        size = min(page_size, self.settings.page_size) if page_size > 0 else self.settings.page_size
        try:
            start = int(page_token or "0")
        except ValueError:
            raise ApiError(400, f"Invalid page token {page_token!r}")
        page = names[start : start + size]
        self.counters["scanned"] += len(page)
        out = {collection: [self._json(kind, n, index[n], int_enums) for n in page]}
        if start + size < len(names):
            out["nextPageToken"] = str(start + size)
        elif collection == "nodes":  # the listing is complete: one fewer to hide from
            for name in [n for n in self.hidden if n.startswith(parent + "/")]:
                self.hidden[name] -= 1
                if self.hidden[name] <= 0:
                    del self.hidden[name]
        return out

    def get(self, project: str, zone: str, collection: str, rid: str) -> tuple[type, Any]:
        self._check_zone(project, zone)
        name = f"projects/{project}/locations/{zone}/{collection}/{rid}"
        if collection == "queuedResources" and name in self.qrs:
            return cloud_tpu.QueuedResource, self.qrs[name].message
        if collection == "nodes" and name in self.nodes:
            return cloud_tpu.Node, self.nodes[name]
        raise ApiError(404, f"Resource '{name}' was not found")

    def create_qr(self, project: str, zone: str, qr_id: str, body: dict) -> _Op:
        self._check_zone(project, zone)
        if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", qr_id or ""):
            raise ApiError(400, f"Invalid queued resource id {qr_id!r}")
        name = f"projects/{project}/locations/{zone}/queuedResources/{qr_id}"
        if name in self.qrs:
            raise ApiError(409, f"Resource '{name}' already exists")
        try:
            message = cloud_tpu.QueuedResource.from_json(json.dumps(body), ignore_unknown_fields=False)
        except Exception as e:  # json_format.ParseError and friends: the real API answers 400
            raise ApiError(400, f"Invalid JSON payload received. {_one_line(e)}")
        specs = list(message.tpu.node_spec)
        if not specs:
            raise ApiError(400, "QueuedResource.tpu.node_spec must have at least one entry")
        for spec in specs:
            if spec.parent != f"projects/{project}/locations/{zone}":
                raise ApiError(400, f"node_spec.parent {spec.parent!r} must be projects/{project}/locations/{zone}")
            if not spec.node_id:
                raise ApiError(400, "node_spec.node_id is required (multi-node specs are not modelled)")
            if not spec.node.accelerator_type or not spec.node.runtime_version:
                raise ApiError(400, "node_spec.node.accelerator_type and runtime_version are required")
            if f"{spec.parent}/nodes/{spec.node_id}" in self.nodes:
                raise ApiError(409, f"Node '{spec.parent}/nodes/{spec.node_id}' already exists")
        failing = self.failing_creates.get(zone)
        if failing is not None and failing[0] == "refuse":
            raise ApiError(RPC_HTTP.get(failing[1], 400), failing[2], failing[1])
        message.name = name
        message.create_time = _now_ts()
        if self.settings.project_number:
            for spec in message.tpu.node_spec:
                spec.parent = f"projects/{self.settings.project_number}/locations/{zone}"
        qr = _QR(message=message, state_since=0, project=project, zone=zone)
        if failing is not None:  # accepted, then FAILED explaining why (state.failed_data.error)
            qr.fail_with = (failing[1], failing[2])
        qr.set_state(QRState.ACCEPTED, time.monotonic(), Initiator.USER)
        self.qrs[name] = qr
        self.advance()
        return self._op(project, zone, cloud_tpu.QueuedResource.pb(qr.message), name, "create", 0.0)

    def delete_qr(self, project: str, zone: str, qr_id: str, force: bool) -> _Op:
        self._check_zone(project, zone)
        name = f"projects/{project}/locations/{zone}/queuedResources/{qr_id}"
        qr = self.qrs.get(name)
        if qr is None:
            raise ApiError(404, f"Resource '{name}' was not found")
        self.qr_deletes.append((qr_id, qr.state.name))
        if self._nodes_of(qr) and not force:
            raise ApiError(
                400, f"Queued resource '{name}' has nodes; delete them first or pass force=true", "FAILED_PRECONDITION"
            )
        if qr.stuck_deletes > 0 and qr.state in (QRState.FAILED, QRState.SUSPENDED):
            # Accepted, and the operation even succeeds, but the queued resource stays where it was.
            qr.stuck_deletes -= 1
            return self._op(project, zone, empty_pb2.Empty(), name, "delete", self.settings.delete_delay)
        qr.set_state(QRState.DELETING, time.monotonic(), Initiator.USER)

        def finish():
            for node in self._nodes_of(qr):
                self.nodes.pop(node.name, None)
            self.qrs.pop(name, None)

        return self._op(project, zone, empty_pb2.Empty(), name, "delete", self.settings.delete_delay, finish)

    def delete_node(self, project: str, zone: str, node_id: str) -> _Op:
        self._check_zone(project, zone)
        name = f"projects/{project}/locations/{zone}/nodes/{node_id}"
        node = self.nodes.get(name)
        if node is None:
            raise ApiError(404, f"Resource '{name}' was not found")
        node.state = NodeState.DELETING
        self.node_changed(name)

        def finish():
            self.nodes.pop(name, None)
            qr = self.qrs.get(node.queued_resource)
            # Deleting a queued resource's node leaves the QR SUSPENDED, holding its quota until deleted.
            if qr is not None and qr.state not in (QRState.DELETING, QRState.SUSPENDED):
                qr.set_state(QRState.SUSPENDED, time.monotonic(), Initiator.USER)

        return self._op(project, zone, empty_pb2.Empty(), name, "delete", self.settings.delete_delay, finish)

    def get_operation(self, project: str, zone: str, op_id: str) -> dict:
        name = f"projects/{project}/locations/{zone}/operations/{op_id}"
        if name not in self.ops:
            raise ApiError(404, f"Operation '{name}' was not found")
        return self._op_dict(self.ops[name])

    def _op(self, project, zone, response, target, verb, delay, on_done=None) -> _Op:
        name = f"projects/{project}/locations/{zone}/operations/operation-{next(self._op_ids)}"
        op = _Op(
            name=name, done_at=time.monotonic() + delay, response=response, target=target, verb=verb, on_done=on_done
        )
        self.ops[name] = op
        heapq.heappush(self.pending_ops, (op.done_at, next(self._due_ids), op))
        self.advance()
        return op

    def _op_dict(self, op: _Op) -> operations_pb2.Operation:
        msg = operations_pb2.Operation(name=op.name, done=op.finished)
        meta = cloud_tpu.OperationMetadata(target=op.target, verb=op.verb, api_version="v2")
        msg.metadata.Pack(cloud_tpu.OperationMetadata.pb(meta))
        if op.finished:
            msg.response.Pack(op.response)
        return msg

    def _check_zone(self, project: str, zone: str) -> None:
        if self.settings.zones is not None and zone not in self.settings.zones:
            raise ApiError(404, f"Location 'projects/{project}/locations/{zone}' was not found")

    # -------------------------------------------------------------- test controls (no call log entry)

    def preempt(self, zone: str, qr_or_node_id: str) -> None:
        """A spot preemption: the node goes PREEMPTED and its queued resource SUSPENDING, then SUSPENDED
        `suspend_delay` seconds later (at once with the default 0)."""
        nodes = {}
        for parent in self.nodes.parents_in(zone) + self.qrs.parents_in(zone):
            node = self.nodes.get(f"{parent}/nodes/{qr_or_node_id}")
            if node is not None:
                nodes[node.name] = node
            for name in self.qr_nodes.get(f"{parent}/queuedResources/{qr_or_node_id}", ()):
                nodes[name] = self.nodes[name]
        nodes = [nodes[n] for n in sorted(nodes)]
        if not nodes:
            raise KeyError(f"no node {qr_or_node_id!r} in zone {zone}")
        now = time.monotonic()
        for node in nodes:
            node.state = NodeState.PREEMPTED
            node.health = cloud_tpu.Node.Health.HEALTH_UNSPECIFIED
            self.node_changed(node.name)
            if node.queued_resource in self.qrs:
                self.qrs[node.queued_resource].set_state(QRState.SUSPENDING, now, Initiator.SERVICE)
        self.advance()

    def _qr(self, zone: str, qr_id: str, project: str | None = None) -> _QR:
        for parent in self.qrs.parents_in(zone):
            qr = self.qrs.get(f"{parent}/queuedResources/{qr_id}")
            if qr is not None and (project is None or qr.project == project):
                return qr
        raise KeyError(f"no queued resource {qr_id!r} in zone {zone}")

    def _node(self, zone: str, node_id: str, project: str | None = None) -> cloud_tpu.Node:
        for parent in self.nodes.parents_in(zone):
            node = self.nodes.get(f"{parent}/nodes/{node_id}")
            if node is not None and (project is None or parent.startswith(f"projects/{project}/")):
                return node
        raise KeyError(f"no node {node_id!r} in zone {zone}")

    def stick_delete(self, zone: str, qr_id: str, times: int = 1) -> None:
        """The next `times` deletes of this FAILED or SUSPENDED queued resource are accepted and their
        operations succeed, but it stays (Google's advice, recorded in axlearn: re-delete such ones)."""
        self._qr(zone, qr_id).stuck_deletes = times

    def set_node_state(self, zone: str, node_id: str, state: str, health: str | None = None) -> None:
        """Put a node in any state (REPAIRING, TERMINATED, PREEMPTED, UNKNOWN, HIDDEN, ...), and optionally
        health (HEALTHY, TIMEOUT, UNHEALTHY_MAINTENANCE, ...), its queued resource untouched."""
        node = self._node(zone, node_id)
        node.state = NodeState[state]
        if health is not None:
            node.health = cloud_tpu.Node.Health[health]
        self.node_changed(node.name)

    def hide_from_lists(self, zone: str, node_id: str, lists: int = 1) -> None:
        """Leave the node out of the next `lists` complete node listings of its zone; GET still finds it."""
        self.hidden[self._node(zone, node_id).name] = lists

    def fail_creates(
        self, zone: str, code: str | None = "PERMISSION_DENIED", message: str = "", how: str = "refuse"
    ) -> None:
        """Make every create in `zone` fail until called with code=None: `how="refuse"` answers the POST
        with the code's HTTP status (PERMISSION_DENIED 403, INVALID_ARGUMENT 400, RESOURCE_EXHAUSTED 429);
        `how="fail"` accepts it and the queued resource turns FAILED with state.failedData.error."""
        if code is None:
            self.failing_creates.pop(zone, None)
            return
        if how not in ("refuse", "fail") or code not in RPC_CODES:
            raise ValueError(f"fail_creates: how must be refuse|fail and code one of {', '.join(RPC_CODES)}")
        self.failing_creates[zone] = (how, code, message or f"{code} (injected by the fake)")

    def create_qr_direct(
        self,
        zone: str,
        qr_id: str,
        *,
        project: str = "fake-project",
        labels: dict | None = None,
        state: str = "ACTIVE",
        accelerator_type: str = "v5litepod-8",
        runtime_version: str = "v2-alpha-tpuv5-lite",
        error: tuple[str, str] | list | None = None,
    ) -> None:
        """Plant a queued resource (and its node, unless the state precedes provisioning) behind
        everybody's back: an orphan, or a resource made outside Terraform."""
        parent = f"projects/{project}/locations/{zone}"
        node = cloud_tpu.Node(accelerator_type=accelerator_type, runtime_version=runtime_version, labels=labels or {})
        message = cloud_tpu.QueuedResource(
            name=f"{parent}/queuedResources/{qr_id}",
            create_time=_now_ts(),
            tpu=cloud_tpu.QueuedResource.Tpu(
                node_spec=[cloud_tpu.QueuedResource.Tpu.NodeSpec(parent=parent, node_id=qr_id, node=node)]
            ),
            spot=cloud_tpu.QueuedResource.Spot(),
        )
        qr = _QR(message=message, state_since=0, project=project, zone=zone)
        target = QRState[state]
        qr.set_state(
            target,
            time.monotonic(),
            Initiator.USER,
            tuple(error)
            if error
            else ("RESOURCE_EXHAUSTED", "There is no more capacity in the zone")
            if state == "FAILED"
            else None,
        )
        self.qrs[message.name] = qr
        node_state = {
            QRState.ACTIVE: NodeState.READY,
            QRState.PROVISIONING: NodeState.CREATING,
            QRState.SUSPENDED: NodeState.PREEMPTED,
            QRState.SUSPENDING: NodeState.PREEMPTED,
        }.get(target)
        if node_state is not None:
            self._make_node(qr, node_state)
            if node_state == NodeState.READY:
                for n in self._nodes_of(qr):
                    n.health = cloud_tpu.Node.Health.HEALTHY
                    self.node_changed(n.name)

    def delete_direct(self, zone: str, qr_or_node_id: str, project: str | None = None) -> bool:
        """Make a queued resource and its node (or a lone node) vanish, as if deleted elsewhere."""
        found = False
        for parent in self.qrs.parents_in(zone):
            qr = self.qrs.get(f"{parent}/queuedResources/{qr_or_node_id}")
            if qr is not None and (project is None or qr.project == project):
                for node in self._nodes_of(qr):
                    self.nodes.pop(node.name, None)
                del self.qrs[qr.message.name]
                found = True
        for parent in self.nodes.parents_in(zone):
            name = f"{parent}/nodes/{qr_or_node_id}"
            if name in self.nodes and (project is None or name.startswith(f"projects/{project}/")):
                del self.nodes[name]
                found = True
        return found

    def snapshot(self, int_enums: bool = False) -> dict:
        return {
            "queuedResources": [_to_dict(cloud_tpu.QueuedResource, q.message, int_enums) for q in self.qrs.values()],
            "nodes": [_to_dict(cloud_tpu.Node, n, int_enums) for n in self.nodes.values()],
            "stockout": sorted(self.stockout),
            "failingCreates": {z: list(v) for z, v in self.failing_creates.items()},
            "hidden": dict(self.hidden),
            "faults": [asdict(f) for f in self.faults],
            "settings": {**asdict(self.settings), "zones": list(self.settings.zones or []) or None},
            "maxInFlight": self.max_in_flight,
        }

    def take_faults(self, method: str, target: str, zone: str | None) -> tuple[float, int | None]:
        """(seconds to wait, status to answer or None) for a request: every matching delay adds up, the
        first matching status wins; each matching fault uses up one of its count."""
        delay, status = 0.0, None
        for fault in self.faults:
            if not fault.matches(method, target, zone) or fault.count == 0:
                continue
            if fault.status is not None and status is not None:
                continue  # a later status fault keeps its count for the next request
            if fault.count is not None:
                fault.count -= 1
            delay += fault.delay
            status = status or fault.status
        return delay, status


# ----------------------------------------------------------------------------------------------------
# HTTP
# ----------------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the real client expects
    disable_nagle_algorithm = True  # headers and body go out separately: no 40 ms delayed-ACK stall
    server: "_Server"

    def log_message(self, format, *args):  # quiet: the call log is the record
        pass

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_DELETE(self):
        self._handle("DELETE")

    def do_PATCH(self):
        self._handle("PATCH")

    def _handle(self, method: str) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        fake: FakeTpuServer = self.server.fake
        if url.path.startswith("/_fake/"):
            status, body = fake._control(method, url.path, query, raw)
            self._send(status, body)
            return
        m = PATH_RE.match(url.path)
        zone = m["zone"] if m else None
        rid = m["id"] if m else None
        int_enums = "enum-encoding=int" in query.get("$alt", "")
        with fake.state.lock:
            fake.state.in_flight += 1
            fake.state.max_in_flight = max(fake.state.max_in_flight, fake.state.in_flight)
            delay, fault_status = fake.state.take_faults(method, f"{url.path}?{url.query}", zone)
            delay += fake.state.settings.latency
        try:
            if delay:
                time.sleep(delay)
            if fault_status:
                err = ApiError(fault_status, FAULT_MESSAGES.get(fault_status, "Injected fault"))
                status, body = err.code, err.body()
            else:
                try:
                    with fake.state.lock:
                        fake.state.advance()
                        status, body = 200, self._route(fake.state, method, m, query, raw, int_enums)
                except ApiError as e:
                    status, body = e.code, e.body()
        finally:
            with fake.state.lock:
                fake.state.in_flight -= 1
        with fake.state.lock:
            fake.state.log.append(Call(method, url.path, zone, rid, status, time.time(), url.query))
        self._send(status, body)

    def _route(self, state: FakeTpuState, method, m, query, raw, int_enums) -> dict:
        if m is None:
            raise ApiError(404, f"The requested URL {self.path.split('?')[0]} was not found on this server")
        project, zone, coll, rid = m["project"], m["zone"], m["collection"], m["id"]
        if coll in ("queuedResources", "nodes") and rid is None and method == "GET":
            return state.list(
                project, zone, coll, int(query.get("pageSize") or 0), query.get("pageToken", ""), int_enums
            )
        if coll in ("queuedResources", "nodes") and rid and method == "GET":
            kind, msg = state.get(project, zone, coll, rid)
            return _to_dict(kind, msg, int_enums)
        if coll == "queuedResources" and rid is None and method == "POST":
            try:
                body = json.loads(raw or b"{}")
            except ValueError as e:
                raise ApiError(400, f"Invalid JSON payload received. {e}")
            op = state.create_qr(project, zone, query.get("queuedResourceId", ""), body)
            return _msg_dict(state._op_dict(op), int_enums)
        if coll == "queuedResources" and rid and method == "DELETE":
            op = state.delete_qr(project, zone, rid, query.get("force", "").lower() == "true")
            return _msg_dict(state._op_dict(op), int_enums)
        if coll == "nodes" and rid and method == "DELETE":
            return _msg_dict(state._op_dict(state.delete_node(project, zone, rid)), int_enums)
        if coll == "operations" and rid and method == "GET":
            return _msg_dict(state.get_operation(project, zone, rid), int_enums)
        raise ApiError(404, f"{method} {self.path.split('?')[0]} is not modelled by the fake TPU API")

    def _send(self, status: int, body: Any) -> None:
        data = json.dumps(body, separators=(",", ":")).encode()  # compact: 10,000 workers list in MBs
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # keep-alive handler threads must not hold up shutdown
    fake: "FakeTpuServer"


class FakeTpuServer:
    """The fake TPU API, served from a thread. Start it with `FakeTpuServer.start(...)`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, **settings: Any):
        if "zones" in settings and settings["zones"] is not None:
            settings["zones"] = tuple(settings["zones"])
        self.state = FakeTpuState(FakeSettings(**settings))
        self._httpd = _Server((host, port), _Handler)
        self._httpd.fake = self
        self._thread: threading.Thread | None = None

    @classmethod
    def start(cls, host: str = "127.0.0.1", port: int = 0, **settings: Any) -> "FakeTpuServer":
        """Bind (port 0 = ephemeral), serve from a daemon thread; use as a context manager to stop it."""
        fake = cls(host, port, **settings)
        fake._thread = threading.Thread(
            target=fake._httpd.serve_forever, args=(0.05,), name="fake-tpu-api", daemon=True
        )  # quick to stop
        fake._thread.start()
        return fake

    def __enter__(self) -> "FakeTpuServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    # -------------------------------------------------------------- in-process controls

    def preempt(self, zone: str, qr_or_node_id: str) -> None:
        with self.state.lock:
            self.state.advance()
            self.state.preempt(zone, qr_or_node_id)

    def stick_delete(self, zone: str, qr_id: str, times: int = 1) -> None:
        with self.state.lock:
            self.state.advance()
            self.state.stick_delete(zone, qr_id, times)

    def set_node_state(self, zone: str, node_id: str, state: str, health: str | None = None) -> None:
        with self.state.lock:
            self.state.advance()
            self.state.set_node_state(zone, node_id, state, health)

    def hide_from_lists(self, zone: str, node_id: str, lists: int = 1) -> None:
        with self.state.lock:
            self.state.hide_from_lists(zone, node_id, lists)

    def fail_creates(
        self, zone: str, code: str | None = "PERMISSION_DENIED", message: str = "", how: str = "refuse"
    ) -> None:
        with self.state.lock:
            self.state.advance()
            self.state.fail_creates(zone, code, message, how)

    def set_stockout(self, zone: str, on: bool = True) -> None:
        with self.state.lock:
            self.state.advance()
            (self.state.stockout.add if on else self.state.stockout.discard)(zone)
            self.state.reschedule_all()  # QRs WAITING_FOR_RESOURCES there provision now

    def fail(
        self,
        zone: str | None = None,
        status: int | None = 503,
        count: int | None = 1,
        *,
        method: str | None = None,
        path: str | None = None,
        delay: float = 0.0,
    ) -> Fault:
        """Answer the next `count` matching calls (None = forever) with `status`, or delay them."""
        fault = Fault(status=status, count=count, zone=zone, method=method, path=path, delay=delay)
        with self.state.lock:
            self.state.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self.state.lock:
            self.state.faults.clear()

    def configure(self, **settings: Any) -> None:
        """Change delays, page size or known zones on a running fake."""
        with self.state.lock:
            self.state.advance()
            for k, v in settings.items():
                if not hasattr(self.state.settings, k):
                    raise KeyError(f"unknown fake setting {k!r}")
                setattr(self.state.settings, k, tuple(v) if k == "zones" and v is not None else v)
            self.state.reschedule_all()  # new delays: new due times

    def create_qr_direct(self, zone: str, qr_id: str, **kw: Any) -> None:
        with self.state.lock:
            self.state.advance()
            self.state.create_qr_direct(zone, qr_id, **kw)

    def delete_direct(self, zone: str, qr_or_node_id: str, project: str | None = None) -> bool:
        with self.state.lock:
            return self.state.delete_direct(zone, qr_or_node_id, project)

    def calls(
        self, method: str | None = None, zone: str | None = None, path: str | None = None, status: int | None = None
    ) -> list[Call]:
        """The API calls answered so far (control endpoints excluded), oldest first, filtered."""
        with self.state.lock:
            log = list(self.state.log)
        return [
            c
            for c in log
            if (method is None or c.method == method.upper())
            and (zone is None or c.zone == zone)
            and (path is None or re.search(path, c.path))
            and (status is None or c.status == status)
        ]

    def qr_deletes(self) -> list[tuple[str, str]]:
        """(queued resource id, its state when the delete arrived) for every delete answered so far."""
        with self.state.lock:
            return list(self.state.qr_deletes)

    def reset(self) -> None:
        """Forget every resource, operation, fault, stockout and call; keep the settings."""
        with self.state.lock:
            self.state.clear()

    def clear_calls(self) -> None:
        with self.state.lock:
            self.state.log.clear()
            self.state.max_in_flight = 0

    @property
    def max_in_flight(self) -> int:
        """The most API requests the fake has answered at the same time (since start or clear_calls)."""
        return self.state.max_in_flight

    def queued_resource_state(self, zone: str, qr_id: str, project: str | None = None) -> str | None:
        """The state name of a queued resource as the fake holds it now (None if absent)."""
        with self.state.lock:
            self.state.advance()
            try:
                return self.state._qr(zone, qr_id, project).state.name
            except KeyError:
                return None

    def snapshot(self) -> dict:
        with self.state.lock:
            self.state.advance()
            return self.state.snapshot()

    # -------------------------------------------------------------- the same controls over HTTP

    def _control(self, method: str, path: str, query: dict, raw: bytes) -> tuple[int, Any]:
        try:
            args = json.loads(raw) if raw else {}
            if not isinstance(args, dict):
                raise ValueError("the body must be a JSON object")
            name = path[len("/_fake/") :]
            if name == "calls" and method == "GET":
                return 200, {
                    "calls": [
                        asdict(c) for c in self.calls(**{k: query[k] for k in query if k in ("method", "zone", "path")})
                    ]
                }
            if name == "calls" and method == "DELETE":
                self.clear_calls()
                return 200, {}
            if name == "state" and method == "GET":
                return 200, self.snapshot()
            if method != "POST":
                return 405, {"error": f"{method} /_fake/{name}: use POST"}
            if name == "preempt":
                self.preempt(args["zone"], args["id"])
            elif name == "stockout":
                self.set_stockout(args["zone"], bool(args.get("on", True)))
            elif name == "fail":
                self.fail(**{k: args[k] for k in ("zone", "status", "count", "method", "path", "delay") if k in args})
            elif name == "stick-delete":
                self.stick_delete(args["zone"], args["id"], int(args.get("times", 1)))
            elif name == "node-state":
                self.set_node_state(args["zone"], args["id"], args["state"], args.get("health"))
            elif name == "hide":
                self.hide_from_lists(args["zone"], args["id"], int(args.get("lists", 1)))
            elif name == "fail-creates":
                self.fail_creates(
                    args["zone"],
                    args.get("code", "PERMISSION_DENIED"),
                    args.get("message", ""),
                    args.get("how", "refuse"),
                )
            elif name == "clear-faults":
                self.clear_faults()
            elif name == "reset":
                self.reset()
            elif name == "create-qr":
                self.create_qr_direct(args.pop("zone"), args.pop("id"), **args)
            elif name == "delete":
                if not self.delete_direct(args["zone"], args["id"], args.get("project")):
                    return 404, {"error": f"nothing named {args['id']!r} in {args['zone']}"}
            elif name == "config":
                self.configure(**args)
            else:
                return 404, {"error": f"unknown control endpoint /_fake/{name}"}
            return 200, {"ok": True}
        except (KeyError, TypeError, ValueError) as e:
            return 400, {"error": f"/_fake control: bad request: {_one_line(e)}"}


# ----------------------------------------------------------------------------------------------------
# Encoding helpers
# ----------------------------------------------------------------------------------------------------


def _to_dict(kind, message, int_enums: bool = False) -> dict:
    return json_format.MessageToDict(kind.pb(message), use_integers_for_enums=int_enums)


def _msg_dict(message, int_enums: bool) -> dict:
    return json_format.MessageToDict(message, use_integers_for_enums=int_enums)


def _now_ts() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.GetCurrentTime()
    return ts


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


# ----------------------------------------------------------------------------------------------------
# pytest fixture and command line
# ----------------------------------------------------------------------------------------------------

try:
    import pytest
except ImportError:  # the command line does not need pytest
    pytest = None

if pytest is not None:

    @pytest.fixture
    def fake_tpu(monkeypatch) -> Iterator[FakeTpuServer]:
        """A fresh fake TPU API on an ephemeral port; ACTFLEET_TPU_ENDPOINT points at it for the test."""
        with FakeTpuServer.start(port=0) as fake:
            monkeypatch.setenv("ACTFLEET_TPU_ENDPOINT", fake.url)
            yield fake


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tests.fakes.tpu_server", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8470, help="0 = pick a free port (the URL is printed)")
    p.add_argument("--accept-delay", type=float, default=0.0, help="seconds a QR stays ACCEPTED")
    p.add_argument("--provision-delay", type=float, default=0.0, help="seconds a QR stays PROVISIONING")
    p.add_argument("--delete-delay", type=float, default=0.0, help="seconds a delete operation runs")
    p.add_argument("--suspend-delay", type=float, default=0.0, help="seconds a preempted QR stays SUSPENDING")
    p.add_argument("--page-size", type=int, default=50, help="the server's largest page")
    p.add_argument("--zones", default="", help="comma-separated known zones (default: any zone exists)")
    a = p.parse_args(argv)
    fake = FakeTpuServer.start(
        a.host,
        a.port,
        accept_delay=a.accept_delay,
        provision_delay=a.provision_delay,
        delete_delay=a.delete_delay,
        suspend_delay=a.suspend_delay,
        page_size=a.page_size,
        zones=tuple(z for z in a.zones.split(",") if z) or None,
    )
    print(fake.url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        fake.stop()


if __name__ == "__main__":
    sys.exit(main())
