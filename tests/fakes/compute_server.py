"""A fake Compute Engine API v1 (instances) on loopback, speaking the REST JSON `google.cloud.compute_v1` sends.

It models what actfleet's gce mode depends on (issue 25), and nothing else:

- instances: insert -> PROVISIONING -> STAGING -> RUNNING after configurable delays (0 = instant); the whole
  Instance body is parsed with compute_v1's own protobuf types (an unknown field is a 400 here too), stored
  and returned, with the fields the service fills in (id, selfLink, zone, creationTimestamp, status,
  fingerprints, full machineType/network URLs, nic0 and its networkIP, natIP on an access config);
- long-running zone operations: insert, delete, setLabels, setMetadata, setMachineType (stopped instances
  only), start and stop answer an Operation
  (PENDING, then RUNNING, then DONE; `operations/{op}` GET and `operations/{op}/wait` POST, which blocks
  until done or two minutes, like the real one); errors land in operation.error.errors[] plus
  httpErrorStatusCode/httpErrorMessage, which google-cloud-compute's ExtendedOperation raises from;
- stockout: an insert into a zone in stockout is accepted, the instance shows PROVISIONING, then the
  operation ends DONE with ZONE_RESOURCE_POOL_EXHAUSTED (503 SERVICE UNAVAILABLE) and the instance is gone,
  as the real API reports it (operation.error.errors[0].code, seen in public operation dumps);
- spot preemption honours scheduling.instanceTerminationAction: STOP leaves the instance TERMINATED (with
  lastStopTimestamp), DELETE removes it; either way through STOPPING for `stop_delay` seconds;
- statuses set by hand (`set_status`: any Instance.Status name: REPAIRING, SUSPENDED, ...);
- lists: per zone (`zones/{z}/instances`) and aggregated (`aggregated/instances`, items keyed "zones/{z}",
  an empty scope answered with the NO_RESULTS_ON_PAGE warning), maxResults (<= 500, the real cap; default
  500) and pageToken, `filter` with `field = value`, `field != value`, `field:*` terms joined by AND or
  juxtaposition (labels.KEY, name, status, scheduling.provisioningModel, ...; OR is refused with a 400, not
  silently misread); a zone set unreachable fails its own list with 503 and is an UNREACHABLE scope (and in
  `unreachables`) of the aggregated list;
- 404 (notFound), 409 (alreadyExists), 412 (a stale label or metadata fingerprint) in Compute's error
  shape ({"error": {"code", "message", "errors": [{"domain", "reason", "message"}]}});
- fault injection per zone / method / path regex (an HTTP status for the next N calls, or a delay), a global
  `latency`, and a call log (method, path, zone, instance, status, time).

Use it in-process:

    with FakeComputeServer.start(port=0, provision_delay=0.5) as fake:
        client = compute_v1.InstancesClient(transport="rest", client_options={"api_endpoint": fake.url},
                                            credentials=AnonymousCredentials())
        fake.preempt("us-central1-a", "tpu-us-central1-a-0")
        fake.calls(method="GET")

from another process (a Terraform provider stand-in, a person) through the control endpoints under
`/_fake/` (see `_control`), or by hand:

    python -m tests.fakes.compute_server --port 8471 --provision-delay 5
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator
from urllib.parse import parse_qs, urlsplit

from google.cloud.compute_v1.types import compute
from google.protobuf import json_format

from tests.fakes.tpu_server import FAULT_MESSAGES, Call, Fault

API_ROOT = "https://www.googleapis.com/compute/v1"  # what the real API writes into selfLink and friends

# /compute/v1/projects/{project}/zones/{zone}/{instances|operations}[/{id}[/{verb}]] and the aggregated list
PATH_RE = re.compile(
    r"^/compute/v1/projects/(?P<project>[^/]+)/(?:"
    r"zones/(?P<zone>[^/]+)/(?P<collection>instances|operations)(?:/(?P<id>[^/]+)(?:/(?P<verb>[A-Za-z]+))?)?"
    r"|aggregated/(?P<aggregated>instances))$"
)

STATUSES = frozenset(s.name for s in compute.Instance.Status if s.name != "UNDEFINED_STATUS")
MAX_RESULTS = 500  # the real API's cap and default for maxResults
WAIT_CAP = 120.0  # operations.wait returns after at most two minutes, done or not

REASONS = {400: "invalid", 404: "notFound", 409: "alreadyExists", 412: "conditionNotMet", 429: "rateLimitExceeded"}
STOCKOUT_CODE = "ZONE_RESOURCE_POOL_EXHAUSTED"


class ApiError(Exception):
    """An error answer in Compute Engine's JSON error format."""

    def __init__(self, code: int, message: str, reason: str | None = None):
        super().__init__(message)
        self.code, self.message = code, message
        self.reason = reason or REASONS.get(code, "backendError")

    def body(self) -> dict:
        return {
            "error": {
                "code": self.code,
                "message": self.message,
                "errors": [{"message": self.message, "domain": "global", "reason": self.reason}],
            }
        }


@dataclass
class _Instance:
    body: dict  # the REST JSON the API answers (camelCase), as stored
    project: str
    zone: str
    status_since: float  # monotonic
    # (monotonic time, status) steps still to happen; status None = the instance disappears
    plan: list[tuple[float, str | None]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.body["name"]

    @property
    def status(self) -> str:
        return self.body["status"]


@dataclass
class _Op:
    body: dict
    project: str
    zone: str
    start_at: float  # monotonic: PENDING -> RUNNING
    done_at: float  # monotonic: RUNNING -> DONE
    on_done: Any = None  # callable run once when the operation completes; may return an error tuple
    error: tuple[int, str, str, str] | None = None  # (http status, http message, code, message)


@dataclass
class FakeSettings:
    provision_delay: float = 0.0  # PROVISIONING -> STAGING
    stage_delay: float = 0.0  # STAGING -> RUNNING (the insert operation is DONE then)
    delete_delay: float = 0.0  # STOPPING before a deleted instance is gone
    stop_delay: float = 0.0  # STOPPING before a stopped / preempted instance is TERMINATED (or gone)
    op_delay: float = 0.0  # how long a setLabels/setMetadata operation runs
    page_size: int = MAX_RESULTS  # the server's largest page (the real one: 500)
    zones: tuple[str, ...] | None = None  # known zones; None = any zone exists
    latency: float = 0.0  # seconds added to every API answer


class FakeComputeState:
    """Everything the fake holds; every method runs under `lock`."""

    def __init__(self, settings: FakeSettings | None = None):
        self.settings = settings or FakeSettings()
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.clear()

    def clear(self) -> None:
        self.instances: dict[tuple[str, str, str], _Instance] = {}
        self.by_zone: dict[tuple[str, str], dict[str, _Instance]] = {}  # (project, zone) -> name -> instance
        self.ops: dict[tuple[str, str, str], _Op] = {}
        self.moving: set[tuple[str, str, str]] = set()  # instances with steps planned
        self.pending_ops: set[tuple[str, str, str]] = set()
        self.faults: list[Fault] = []
        self.stockout: dict[str, str] = {}  # zone -> the error code its inserts end in
        self.unreachable: set[str] = set()
        self.log: list[Call] = []
        self.ids = itertools.count(1000000000000000001)
        self.ips = itertools.count(2)
        self.in_flight = self.max_in_flight = 0

    # -------------------------------------------------------------- time

    def advance(self) -> None:
        now = time.monotonic()
        for key in list(self.moving):
            inst = self.instances.get(key)
            if inst is None:
                self.moving.discard(key)
                continue
            while inst.plan and inst.plan[0][0] <= now:
                at, status = inst.plan.pop(0)
                if status is None:
                    del self.instances[key]
                    del self.by_zone[key[:2]][key[2]]
                    break
                self._set_status(inst, status, at)
            if not inst.plan:
                self.moving.discard(key)
        for key in list(self.pending_ops):
            op = self.ops[key]
            if op.body["status"] == "PENDING" and now >= op.start_at:
                op.body.update(status="RUNNING", startTime=_ts(), progress=0)
            if now >= op.done_at:
                self.pending_ops.discard(key)
                error = op.on_done() if op.on_done is not None else None
                op.body.update(status="DONE", endTime=_ts(), progress=100)
                op.body.setdefault("startTime", op.body["endTime"])
                if error or op.error:
                    status, http_message, code, message = error or op.error
                    op.body["error"] = {"errors": [{"code": code, "message": message}]}
                    op.body.update(httpErrorStatusCode=status, httpErrorMessage=http_message)
                self.changed.notify_all()

    def _set_status(self, inst: _Instance, status: str, at: float | None = None) -> None:
        old = inst.body.get("status")
        inst.body["status"] = status
        inst.status_since = time.monotonic() if at is None else at
        if status == "RUNNING" and old != "RUNNING":
            inst.body["lastStartTimestamp"] = _ts()
        if status == "TERMINATED" and old != "TERMINATED":
            inst.body["lastStopTimestamp"] = _ts()
        if status == "SUSPENDED" and old != "SUSPENDED":
            inst.body["lastSuspendedTimestamp"] = _ts()

    def _plan(self, inst: _Instance, steps: list[tuple[float, str | None]]) -> None:
        """Replace the instance's planned steps with `steps` (delays from now); a 0-delay step runs now."""
        now = time.monotonic()
        inst.plan, t = [], now
        for delay, status in steps:
            t += delay
            inst.plan.append((t, status))
        key = (inst.project, inst.zone, inst.name)
        self.moving.add(key)
        self.advance()

    # -------------------------------------------------------------- instances

    def _check_zone(self, project: str, zone: str) -> None:
        known = self.settings.zones
        if known is not None and zone not in known:
            raise ApiError(400, f"Invalid value for field 'zone': '{zone}'. Unknown zone.")

    def _get(self, project: str, zone: str, name: str) -> _Instance:
        self._check_zone(project, zone)
        inst = self.instances.get((project, zone, name))
        if inst is None:
            raise ApiError(404, f"The resource 'projects/{project}/zones/{zone}/instances/{name}' was not found")
        return inst

    def insert(self, project: str, zone: str, raw: bytes) -> _Op:
        self._check_zone(project, zone)
        body = _parse(compute.Instance, raw)
        name = body.get("name", "")
        if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", name):
            raise ApiError(
                400,
                f"Invalid value for field 'resource.name': '{name}'. Must be a match of regex "
                "'(?:[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?)'",
            )
        if not body.get("machineType"):
            raise ApiError(400, "Invalid value for field 'resource.machineType': ''. Machine type is required.")
        if (project, zone, name) in self.instances:
            raise ApiError(409, f"The resource 'projects/{project}/zones/{zone}/instances/{name}' already exists")
        self._fill(body, project, zone)
        inst = _Instance(body, project, zone, time.monotonic())
        key = (project, zone, name)
        self.instances[key] = inst
        self.by_zone.setdefault((project, zone), {})[name] = inst
        s = self.settings
        if zone in self.stockout:
            # Accepted, seen PROVISIONING, then gone: the operation carries the stockout.
            self._plan(inst, [(s.provision_delay, None)])
            error = (
                503,
                "SERVICE UNAVAILABLE",
                self.stockout[zone],
                f"The zone 'projects/{project}/zones/{zone}' does not have enough resources available to fulfill "
                "the request.  Try a different zone, or try again later.",
            )
            return self._op(project, zone, "insert", inst, s.provision_delay, error=error)
        self._plan(inst, [(s.provision_delay, "STAGING"), (s.stage_delay, "RUNNING")])
        return self._op(project, zone, "insert", inst, s.provision_delay + s.stage_delay)

    def _fill(self, body: dict, project: str, zone: str) -> None:
        """What the service writes into a new instance."""
        region = zone.rsplit("-", 1)[0]
        iid = str(next(self.ids))
        link = f"{API_ROOT}/projects/{project}/zones/{zone}/instances/{body['name']}"
        body.update(
            kind="compute#instance",
            id=iid,
            creationTimestamp=_ts(),
            zone=f"{API_ROOT}/projects/{project}/zones/{zone}",
            selfLink=link,
            status="PROVISIONING",
            labelFingerprint=_fingerprint(body.get("labels", {})),
            fingerprint=_fingerprint(iid),
            cpuPlatform="Unknown CPU Platform",
        )
        body["machineType"] = _expand(body["machineType"], project, f"zones/{zone}/machineTypes/")
        md = body.setdefault("metadata", {})
        md.update(kind="compute#metadata", fingerprint=_fingerprint(md.get("items", [])))
        for i, disk in enumerate(body.get("disks", [])):
            disk.setdefault("deviceName", f"persistent-disk-{i}")
            disk.setdefault("boot", i == 0)
            disk.setdefault("autoDelete", True)
            disk.setdefault("type", "PERSISTENT")
            disk.setdefault("mode", "READ_WRITE")
            disk.update(kind="compute#attachedDisk", index=i)
            disk.setdefault("source", f"{API_ROOT}/projects/{project}/zones/{zone}/disks/{body['name']}")
            # initializeParams is input only in the real API (its disk is a separate resource); kept here so
            # a provider stand-in can read back what it sent.
        for i, nic in enumerate(body.get("networkInterfaces", [])):
            nic.update(kind="compute#networkInterface", name=f"nic{i}", fingerprint=_fingerprint(nic))
            nic["network"] = _expand(nic.get("network") or "default", project, "global/networks/")
            if nic.get("subnetwork"):
                nic["subnetwork"] = _expand(nic["subnetwork"], project, f"regions/{region}/subnetworks/")
            n = next(self.ips)
            nic.setdefault("networkIP", f"10.128.{n // 250}.{n % 250 + 2}")
            for ac in nic.get("accessConfigs", []):
                ac.update(kind="compute#accessConfig", type=ac.get("type", "ONE_TO_ONE_NAT"))
                ac.setdefault("name", "External NAT")
                ac.setdefault("natIP", f"34.0.{n // 250}.{n % 250 + 2}")
                ac.setdefault("networkTier", "PREMIUM")
        for sa in body.get("serviceAccounts", []):
            sa.setdefault("scopes", [])
        sched = body.setdefault("scheduling", {})
        spot = sched.get("provisioningModel") == "SPOT" or sched.get("preemptible", False)
        sched.setdefault("automaticRestart", not spot)
        sched.setdefault("onHostMaintenance", "TERMINATE" if spot else "MIGRATE")
        sched.setdefault("preemptible", False)
        sched.setdefault("provisioningModel", "STANDARD")

    def delete(self, project: str, zone: str, name: str) -> _Op:
        inst = self._get(project, zone, name)
        if not (inst.plan and inst.plan[-1][1] is None):  # a second delete of a dying instance changes nothing
            self._set_status(inst, "STOPPING")
            self._plan(inst, [(self.settings.delete_delay, None)])
        return self._op(project, zone, "delete", inst, self.settings.delete_delay)

    def stop(self, project: str, zone: str, name: str) -> _Op:
        inst = self._get(project, zone, name)
        if inst.status not in ("TERMINATED", "STOPPING"):
            self._set_status(inst, "STOPPING")
            self._plan(inst, [(self.settings.stop_delay, "TERMINATED")])
        return self._op(project, zone, "stop", inst, self.settings.stop_delay)

    def start(self, project: str, zone: str, name: str) -> _Op:
        inst = self._get(project, zone, name)
        s = self.settings
        if inst.status == "TERMINATED":
            if zone in self.stockout:
                error = (
                    503,
                    "SERVICE UNAVAILABLE",
                    self.stockout[zone],
                    f"The zone 'projects/{project}/zones/{zone}' "
                    "does not have enough resources available to fulfill the request.",
                )
                return self._op(project, zone, "start", inst, s.provision_delay, error=error)
            self._set_status(inst, "PROVISIONING")
            self._plan(inst, [(s.provision_delay, "STAGING"), (s.stage_delay, "RUNNING")])
        elif inst.status != "RUNNING":
            raise ApiError(
                400, f"The resource 'projects/{project}/zones/{zone}/instances/{name}' is not ready", "resourceNotReady"
            )
        return self._op(project, zone, "start", inst, s.provision_delay + s.stage_delay)

    def set_labels(self, project: str, zone: str, name: str, raw: bytes) -> _Op:
        inst = self._get(project, zone, name)
        req = _parse(compute.InstancesSetLabelsRequest, raw)
        if req.get("labelFingerprint", "") != inst.body["labelFingerprint"]:
            raise ApiError(412, "Labels fingerprint either invalid or resource labels have changed")
        labels = req.get("labels", {})

        def done():
            inst.body["labels"] = labels
            if not labels:
                inst.body.pop("labels", None)
            inst.body["labelFingerprint"] = _fingerprint(labels)

        return self._op(project, zone, "setLabels", inst, self.settings.op_delay, on_done=done)

    def set_metadata(self, project: str, zone: str, name: str, raw: bytes) -> _Op:
        inst = self._get(project, zone, name)
        md = _parse(compute.Metadata, raw)
        if md.get("fingerprint", "") != inst.body["metadata"]["fingerprint"]:
            raise ApiError(412, "Supplied fingerprint does not match current metadata fingerprint.")
        items = md.get("items", [])

        def done():
            inst.body["metadata"] = {"kind": "compute#metadata", "fingerprint": _fingerprint(items)}
            if items:
                inst.body["metadata"]["items"] = items

        return self._op(project, zone, "setMetadata", inst, self.settings.op_delay, on_done=done)

    def set_machine_type(self, project: str, zone: str, name: str, raw: bytes) -> _Op:
        """Only on a stopped instance, as the real API insists (a provider stops, sets, starts)."""
        inst = self._get(project, zone, name)
        req = _parse(compute.InstancesSetMachineTypeRequest, raw)
        if inst.status != "TERMINATED":
            raise ApiError(
                400,
                f"The resource 'projects/{project}/zones/{zone}/instances/{name}' is not ready: the instance must "
                "be stopped to change its machine type",
                "resourceNotReady",
            )
        machine = _expand(req.get("machineType", ""), project, f"zones/{zone}/machineTypes/")

        def done():
            inst.body["machineType"] = machine

        return self._op(project, zone, "setMachineType", inst, self.settings.op_delay, on_done=done)

    # -------------------------------------------------------------- lists

    def list_zone(self, project: str, zone: str, query: dict) -> dict:
        self._check_zone(project, zone)
        if zone in self.unreachable:
            raise ApiError(503, "The service is currently unavailable (zone unreachable in the fake)", "backendError")
        match = _filter(query.get("filter", ""))
        here = self.by_zone.get((project, zone), {})
        items = [here[n].body for n in sorted(here) if match(here[n].body)]
        page, token = self._page(items, query)
        out: dict = {
            "kind": "compute#instanceList",
            "id": f"projects/{project}/zones/{zone}/instances",
            "selfLink": f"{API_ROOT}/projects/{project}/zones/{zone}/instances",
            "items": page,
        }
        if token:
            out["nextPageToken"] = token
        return out

    def aggregated(self, project: str, query: dict) -> dict:
        """Every zone's instances in one list, scopes keyed "zones/{z}". A zone set unreachable answers
        as a scope with the UNREACHABLE warning and is named in `unreachables` (compute_v1's Warning.Code
        documents UNREACHABLE as "A given scope cannot be reached"; how often the real API answers so rather
        than failing the whole call is not something the docs say: a whole-call failure is a `fail(path=
        "aggregated")`)."""
        match = _filter(query.get("filter", ""))
        down = sorted(self.unreachable)
        rows = [
            (z, here[n].body)
            for (p, z), here in sorted(self.by_zone.items())
            if p == project and z not in self.unreachable
            for n in sorted(here)
            if match(here[n].body)
        ]
        page, token = self._page(rows, query)
        items: dict[str, dict] = {}
        for z, b in page:
            items.setdefault(f"zones/{z}", {"instances": []})["instances"].append(b)
        for z in down:
            items[f"zones/{z}"] = {"warning": _warning("UNREACHABLE", f"Scope 'zones/{z}' is unreachable.", z)}
        for z in self.settings.zones or ():
            items.setdefault(
                f"zones/{z}",
                {
                    "warning": _warning(
                        "NO_RESULTS_ON_PAGE", f"There are no results for scope 'zones/{z}' on this page.", z
                    )
                },
            )
        out: dict = {
            "kind": "compute#instanceAggregatedList",
            "id": f"projects/{project}/aggregated/instances",
            "selfLink": f"{API_ROOT}/projects/{project}/aggregated/instances",
            "items": dict(sorted(items.items())),
        }
        if token:
            out["nextPageToken"] = token
        if down:
            out["unreachables"] = [f"zones/{z}" for z in down]
        return out

    def _page(self, rows: list, query: dict) -> tuple[list, str]:
        try:
            size = int(query.get("maxResults") or MAX_RESULTS)
            start = int(query.get("pageToken") or 0)
        except ValueError:
            raise ApiError(400, "Invalid value for maxResults or pageToken") from None
        if not 0 <= size <= MAX_RESULTS:
            raise ApiError(400, f"Invalid value for field 'maxResults': '{size}'. Must be in the range [0, 500].")
        size = min(size or MAX_RESULTS, self.settings.page_size)
        end = start + size
        return rows[start:end], (str(end) if end < len(rows) else "")

    # -------------------------------------------------------------- operations

    def _op(self, project, zone, kind, inst: _Instance, delay: float, on_done=None, error=None) -> _Op:
        now = time.monotonic()
        name = f"operation-{int(time.time() * 1000)}-{next(self.ids):x}"
        body = {
            "kind": "compute#operation",
            "id": str(next(self.ids)),
            "name": name,
            "zone": f"{API_ROOT}/projects/{project}/zones/{zone}",
            "operationType": kind,
            "targetLink": inst.body["selfLink"],
            "targetId": inst.body["id"],
            "status": "PENDING",
            "user": "fake@example.iam.gserviceaccount.com",
            "progress": 0,
            "insertTime": _ts(),
            "selfLink": f"{API_ROOT}/projects/{project}/zones/{zone}/operations/{name}",
        }
        op = _Op(body, project, zone, now, now + delay, on_done, error)
        self.ops[(project, zone, name)] = op
        self.pending_ops.add((project, zone, name))
        self.advance()
        return op

    def get_op(self, project: str, zone: str, name: str) -> _Op:
        self._check_zone(project, zone)
        op = self.ops.get((project, zone, name))
        if op is None:
            raise ApiError(404, f"The resource 'projects/{project}/zones/{zone}/operations/{name}' was not found")
        return op

    def wait_op(self, project: str, zone: str, name: str) -> _Op:
        """Block (releasing the lock) until the operation is done or WAIT_CAP passes; the caller holds `lock`."""
        op = self.get_op(project, zone, name)
        deadline = time.monotonic() + WAIT_CAP
        while op.body["status"] != "DONE" and time.monotonic() < deadline:
            self.changed.wait(timeout=max(0.0, min(op.done_at - time.monotonic(), deadline - time.monotonic())) + 0.001)
            self.advance()
        return op

    # -------------------------------------------------------------- controls

    def preempt(self, zone: str, name: str, project: str | None = None) -> None:
        """Preempt a spot (or preemptible) instance: STOPPING, then TERMINATED (action STOP) or gone (DELETE)."""
        inst = self._find(zone, name, project)
        sched = inst.body.get("scheduling", {})
        if sched.get("provisioningModel") != "SPOT" and not sched.get("preemptible"):
            raise ValueError(f"{name} is not a spot or preemptible instance: Compute Engine never preempts it")
        action = sched.get("instanceTerminationAction") or "STOP"  # STOP is the API's default for spot
        self._set_status(inst, "STOPPING")
        self._plan(inst, [(self.settings.stop_delay, None if action == "DELETE" else "TERMINATED")])

    def set_status(self, zone: str, name: str, status: str, project: str | None = None) -> None:
        if status not in STATUSES:
            raise ValueError(f"unknown instance status {status!r} (one of {', '.join(sorted(STATUSES))})")
        inst = self._find(zone, name, project)
        inst.plan = []
        self._set_status(inst, status)

    def _find(self, zone: str, name: str, project: str | None) -> _Instance:
        for (p, z), here in self.by_zone.items():
            if z == zone and name in here and (project is None or p == project):
                return here[name]
        raise KeyError(f"no instance {name!r} in {zone}")

    def insert_direct(self, zone: str, name: str, project: str = "test-project", **body: Any) -> None:
        """An instance made outside the API (another tool, a person), RUNNING at once."""
        body = {"name": name, "machineType": "ct5lp-hightpu-4t", **body}
        op = self.insert(project, zone, json.dumps(body).encode())
        inst = self.instances[(project, zone, name)]
        inst.plan = []
        self._set_status(inst, "RUNNING")
        self.pending_ops.discard((project, zone, op.body["name"]))
        op.body.update(status="DONE", progress=100, endTime=_ts())

    def snapshot(self) -> dict:
        return {
            "instances": [
                {"project": p, "zone": z, "name": n, "status": i.status, "labels": i.body.get("labels", {})}
                for (p, z, n), i in sorted(self.instances.items())
            ],
            "stockout": sorted(self.stockout),
            "unreachable": sorted(self.unreachable),
        }

    def take_faults(self, method: str, target: str, zone: str | None) -> tuple[float, int | None]:
        delay, status = 0.0, None
        for fault in self.faults:
            if not fault.matches(method, target, zone) or fault.count == 0:
                continue
            if fault.status is not None and status is not None:
                continue
            if fault.count is not None:
                fault.count -= 1
            delay += fault.delay
            status = status or fault.status
        return delay, status


# ----------------------------------------------------------------------------------------------------
# HTTP
# ----------------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: "_Server"

    def log_message(self, format, *args):
        pass

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_DELETE(self):
        self._handle("DELETE")

    def do_PATCH(self):
        self._handle("PATCH")

    def do_PUT(self):
        self._handle("PUT")

    def _handle(self, method: str) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        fake: FakeComputeServer = self.server.fake
        if url.path.startswith("/_fake/"):
            self._send(*fake._control(method, url.path, query, raw))
            return
        m = PATH_RE.match(url.path)
        zone = m["zone"] if m else None
        rid = m["id"] if m else None
        state = fake.state
        with state.lock:
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
            delay, fault_status = state.take_faults(method, f"{url.path}?{url.query}", zone)
            delay += state.settings.latency
        try:
            if delay:
                time.sleep(delay)
            if fault_status:
                err = ApiError(fault_status, FAULT_MESSAGES.get(fault_status, "Injected fault"))
                status, body = err.code, err.body()
            else:
                try:
                    with state.lock:
                        state.advance()
                        status, body = 200, self._route(state, method, m, query, raw)
                except ApiError as e:
                    status, body = e.code, e.body()
        finally:
            with state.lock:
                state.in_flight -= 1
        with state.lock:
            state.log.append(Call(method, url.path, zone, rid, status, time.time(), url.query))
        self._send(status, body)

    def _route(self, state: FakeComputeState, method, m, query, raw) -> dict:
        if m is None:
            raise ApiError(404, f"The requested URL {self.path.split('?')[0]} was not found on this server")
        project, zone, coll, rid, verb = m["project"], m["zone"], m["collection"], m["id"], m["verb"]
        if m["aggregated"] and method == "GET":
            return state.aggregated(project, query)
        if coll == "instances":
            if rid is None and method == "GET":
                return state.list_zone(project, zone, query)
            if rid is None and method == "POST":
                return state.insert(project, zone, raw).body
            if rid and verb is None and method == "GET":
                return state._get(project, zone, rid).body
            if rid and verb is None and method == "DELETE":
                return state.delete(project, zone, rid).body
            if rid and method == "POST" and verb in ("setLabels", "setMetadata"):
                fn = state.set_labels if verb == "setLabels" else state.set_metadata
                return fn(project, zone, rid, raw).body
            if rid and method == "POST" and verb == "setMachineType":
                return state.set_machine_type(project, zone, rid, raw).body
            if rid and method == "POST" and verb in ("stop", "start"):
                return (state.stop if verb == "stop" else state.start)(project, zone, rid).body
        if coll == "operations" and rid:
            if verb is None and method == "GET":
                return state.get_op(project, zone, rid).body
            if verb == "wait" and method == "POST":
                return state.wait_op(project, zone, rid).body
        raise ApiError(404, f"{method} {self.path.split('?')[0]} is not modelled by the fake Compute Engine API")

    def _send(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    fake: "FakeComputeServer"


class FakeComputeServer:
    """The fake Compute Engine API, served from a thread. Start it with `FakeComputeServer.start(...)`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, **settings: Any):
        if settings.get("zones") is not None:
            settings["zones"] = tuple(settings["zones"])
        self.state = FakeComputeState(FakeSettings(**settings))
        self._httpd = _Server((host, port), _Handler)
        self._httpd.fake = self

    @classmethod
    def start(cls, host: str = "127.0.0.1", port: int = 0, **settings: Any) -> "FakeComputeServer":
        fake = cls(host, port, **settings)
        threading.Thread(target=fake._httpd.serve_forever, args=(0.05,), name="fake-compute-api", daemon=True).start()
        return fake

    def __enter__(self) -> "FakeComputeServer":
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

    def _locked(self, fn, *a, **kw):
        with self.state.lock:
            self.state.advance()
            return fn(*a, **kw)

    def preempt(self, zone: str, name: str, project: str | None = None) -> None:
        self._locked(self.state.preempt, zone, name, project)

    def set_status(self, zone: str, name: str, status: str, project: str | None = None) -> None:
        self._locked(self.state.set_status, zone, name, status, project)

    def set_stockout(self, zone: str, on: bool = True, code: str = STOCKOUT_CODE) -> None:
        """Inserts (and starts) in `zone` end in `code`: ZONE_RESOURCE_POOL_EXHAUSTED, or the
        ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS the real API also answers (both seen in public reports)."""
        with self.state.lock:
            self.state.advance()
            if on:
                self.state.stockout[zone] = code
            else:
                self.state.stockout.pop(zone, None)

    def set_unreachable(self, zone: str, on: bool = True) -> None:
        """The zone's list answers 503; aggregatedList answers it as an UNREACHABLE scope."""
        self._locked((self.state.unreachable.add if on else self.state.unreachable.discard), zone)

    def insert_direct(self, zone: str, name: str, project: str = "test-project", **body: Any) -> None:
        self._locked(self.state.insert_direct, zone, name, project, **body)

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
        """Answer the next `count` matching calls (None = forever) with `status`, or delay them. An
        aggregated list names no zone: match it with path="aggregated"."""
        fault = Fault(status=status, count=count, zone=zone, method=method, path=path, delay=delay)
        with self.state.lock:
            self.state.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self.state.lock:
            self.state.faults.clear()

    def configure(self, **settings: Any) -> None:
        with self.state.lock:
            self.state.advance()
            for k, v in settings.items():
                if not hasattr(self.state.settings, k):
                    raise KeyError(f"unknown fake setting {k!r}")
                setattr(self.state.settings, k, tuple(v) if k == "zones" and v is not None else v)

    def status_of(self, zone: str, name: str, project: str | None = None) -> str | None:
        """The instance's status as the fake holds it now (None if absent)."""
        with self.state.lock:
            self.state.advance()
            try:
                return self.state._find(zone, name, project).status
            except KeyError:
                return None

    def instance(self, zone: str, name: str, project: str | None = None) -> dict:
        """A copy of the instance's stored JSON."""
        with self.state.lock:
            self.state.advance()
            return json.loads(json.dumps(self.state._find(zone, name, project).body))

    def calls(
        self, method: str | None = None, zone: str | None = None, path: str | None = None, status: int | None = None
    ) -> list[Call]:
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

    def reset(self) -> None:
        with self.state.lock:
            self.state.clear()

    def clear_calls(self) -> None:
        with self.state.lock:
            self.state.log.clear()
            self.state.max_in_flight = 0

    @property
    def max_in_flight(self) -> int:
        return self.state.max_in_flight

    def snapshot(self) -> dict:
        return self._locked(self.state.snapshot)

    # -------------------------------------------------------------- the same controls over HTTP

    def _control(self, method: str, path: str, query: dict, raw: bytes) -> tuple[int, Any]:
        try:
            args = json.loads(raw) if raw else {}
            if not isinstance(args, dict):
                raise ValueError("the body must be a JSON object")
            name = path[len("/_fake/") :]
            if name == "calls" and method == "GET":
                keep = {k: query[k] for k in query if k in ("method", "zone", "path")}
                return 200, {"calls": [asdict(c) for c in self.calls(**keep)]}
            if name == "calls" and method == "DELETE":
                self.clear_calls()
                return 200, {}
            if name == "state" and method == "GET":
                return 200, self.snapshot()
            if method != "POST":
                return 405, {"error": f"{method} /_fake/{name}: use POST"}
            if name == "preempt":
                self.preempt(args["zone"], args["name"], args.get("project"))
            elif name == "status":
                self.set_status(args["zone"], args["name"], args["status"], args.get("project"))
            elif name == "stockout":
                self.set_stockout(args["zone"], bool(args.get("on", True)), args.get("code", STOCKOUT_CODE))
            elif name == "unreachable":
                self.set_unreachable(args["zone"], bool(args.get("on", True)))
            elif name == "fail":
                self.fail(**{k: args[k] for k in ("zone", "status", "count", "method", "path", "delay") if k in args})
            elif name == "clear-faults":
                self.clear_faults()
            elif name == "reset":
                self.reset()
            elif name == "insert":
                self.insert_direct(args.pop("zone"), args.pop("name"), **args)
            elif name == "config":
                self.configure(**args)
            else:
                return 404, {"error": f"unknown control endpoint /_fake/{name}"}
            return 200, {"ok": True}
        except (KeyError, TypeError, ValueError, ApiError) as e:
            return 400, {"error": f"/_fake control: bad request: {' '.join(str(e).split())}"}


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------


def _parse(kind, raw: bytes) -> dict:
    """A request body checked against compute_v1's message type (unknown fields are a 400, as for real),
    back as camelCase JSON."""
    try:
        msg = json_format.Parse(raw or b"{}", kind.pb(kind()), ignore_unknown_fields=False)
    except json_format.ParseError as e:
        raise ApiError(400, f"Invalid JSON payload received. {' '.join(str(e).split())}") from None
    return json_format.MessageToDict(msg)


def _warning(code: str, message: str, zone: str) -> dict:
    return {"code": code, "message": message, "data": [{"key": "scope", "value": f"zones/{zone}"}]}


def _expand(value: str, project: str, prefix: str) -> str:
    """'ct5lp-hightpu-4t' or 'zones/z/machineTypes/ct5lp-hightpu-4t' -> the full URL the API answers."""
    if value.startswith(("https://", "http://")):
        return value
    if value.startswith("projects/"):
        return f"{API_ROOT}/{value}"
    if "/" in value:
        return f"{API_ROOT}/projects/{project}/{value}"
    return f"{API_ROOT}/projects/{project}/{prefix}{value}"


def _fingerprint(value: Any) -> str:
    import base64
    import hashlib

    return base64.b64encode(hashlib.sha256(json.dumps(value, sort_keys=True).encode()).digest()[:8]).decode()


def _ts() -> str:
    """An RFC 3339 timestamp with offset, as Compute Engine writes them ('2026-12-03T09:12:01.123-08:00')."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


_TERM = re.compile(r'\s*\(?\s*([A-Za-z][\w.-]*)\s*(!=|=|:)\s*("(?:[^"\\]|\\.)*"|[^\s()]+)\s*\)?\s*')


def _filter(text: str):
    """Compute Engine's list filter, the part actfleet uses: `labels.k = "v"`, `name != x`, `labels.k:*`,
    terms joined by AND or by juxtaposition, each optionally parenthesised. Anything else is a 400."""
    text = text.strip()
    if not text:
        return lambda body: True
    terms, pos = [], 0
    while pos < len(text):
        m = _TERM.match(text, pos)
        if not m:
            raise ApiError(400, f"Invalid list filter expression '{text}' (the fake models `field = value` AND ...)")
        terms.append((m[1], m[2], json.loads(m[3]) if m[3].startswith('"') else m[3]))
        pos = m.end()
        rest = text[pos:]
        if rest.upper().startswith("OR "):
            raise ApiError(400, f"OR in list filter '{text}' is not modelled by the fake")
        if rest.upper().startswith("AND "):
            pos += 4

    def value_of(body: dict, path: str):
        v: Any = body
        for part in path.split("."):
            if not isinstance(v, dict) or part not in v:
                return None
            v = v[part]
        return v

    def match(body: dict) -> bool:
        for field_, op, want in terms:
            have = value_of(body, field_)
            if op == ":":
                if want != "*":
                    raise ApiError(400, f"':' only as ':*' is modelled by the fake ('{field_}:{want}')")
                if have is None:
                    return False
                continue
            text_have = None if have is None else (str(have).lower() if isinstance(have, bool) else str(have))
            if (text_have == want) != (op == "="):
                return False
        return True

    return match


# ----------------------------------------------------------------------------------------------------
# pytest fixture and command line
# ----------------------------------------------------------------------------------------------------

try:
    import pytest
except ImportError:
    pytest = None

if pytest is not None:

    @pytest.fixture
    def fake_compute(monkeypatch) -> Iterator[FakeComputeServer]:
        """A fresh fake Compute Engine API; ACTFLEET_COMPUTE_ENDPOINT points at it for the test."""
        with FakeComputeServer.start(port=0) as fake:
            monkeypatch.setenv("ACTFLEET_COMPUTE_ENDPOINT", fake.url)
            yield fake


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tests.fakes.compute_server", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8471, help="0 = pick a free port (the URL is printed)")
    p.add_argument("--provision-delay", type=float, default=0.0, help="seconds an instance stays PROVISIONING")
    p.add_argument("--stage-delay", type=float, default=0.0, help="seconds an instance stays STAGING")
    p.add_argument("--delete-delay", type=float, default=0.0, help="seconds a deleted instance stays STOPPING")
    p.add_argument("--stop-delay", type=float, default=0.0, help="seconds a stopped/preempted one stays STOPPING")
    p.add_argument("--page-size", type=int, default=MAX_RESULTS, help="the server's largest page")
    p.add_argument("--zones", default="", help="comma-separated known zones (default: any zone exists)")
    p.add_argument("--latency", type=float, default=0.0, help="seconds added to every API answer")
    a = p.parse_args(argv)
    fake = FakeComputeServer.start(
        a.host,
        a.port,
        provision_delay=a.provision_delay,
        stage_delay=a.stage_delay,
        delete_delay=a.delete_delay,
        stop_delay=a.stop_delay,
        page_size=a.page_size,
        zones=tuple(z for z in a.zones.split(",") if z) or None,
        latency=a.latency,
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
