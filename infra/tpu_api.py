"""The Cloud TPU v2 API as actfleet uses it: observe queued resources and nodes, create and delete them.

Built on `google.cloud.tpu_v2` over REST (imported lazily: `actfleet status` must start quickly). What leaves
this module is plain frozen dataclasses with state names as strings, never proto objects.

- Every HTTP call is retried with jittered exponential backoff on 429, 5xx, timeouts and dropped
  connections; 400/403/404 (and a 5xx that outlasts the retries) end in a one-line `ActfleetError`
  naming the resource, e.g.
  "TPU API: queued resource projects/p/locations/us-central1-a/queuedResources/tpu-us-central1-a-0:
  403 permission denied: ...".
- Lists page through `nextPageToken`, each page retried on its own.
- `observe(zones)` lists every zone in parallel; one zone's failure is reported for that zone only.
- create/delete are idempotent, so Terraform provisioners and reconcile can rerun them freely.
- `calls` counts HTTP requests made (retries and operation polls included), for benchmarks.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, TypeVar

from actfleet.endpoints import check_endpoint
from actfleet.errors import ActfleetError, InputError, PrerequisiteError
from actfleet.formatting import one_line
from actfleet.infra.tpu_states import QR_BROKEN, QR_DELETING, QR_SUSPENDING
from actfleet.retry import backoff

if TYPE_CHECKING:
    from actfleet.config import FleetConfig

T = TypeVar("T")

DEFAULT_RETRIES = 6  # attempts after the first; full-jitter sleeps under 0.5, 1, 2, 4, 8, 16 s (<= 31.5 s)
DEFAULT_TIMEOUT = 30.0  # seconds per HTTP request
DEFAULT_OPERATION_TIMEOUT = 900.0  # seconds to wait for a long-running operation
OBSERVE_THREADS = 32  # lists in flight at once (two per zone: queued resources and nodes)


# ----------------------------------------------------------------------------------------------------
# Observations (what callers see)
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueuedResource:
    """A queued resource. `name` is its short id (for actfleet, the worker name); `path` the full name.
    Labels are the node spec's node labels: v2 queued resources carry none of their own."""

    name: str
    zone: str
    state: str  # "ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE", "SUSPENDED", "FAILED", ...
    state_initiator: str  # "USER" | "SERVICE" | "STATE_INITIATOR_UNSPECIFIED"
    labels: dict[str, str]
    node_ids: tuple[str, ...]
    create_time: float | None  # seconds since the epoch
    path: str = ""
    # A FAILED queued resource explains itself in state.failed_data.error: its google.rpc code name
    # ("PERMISSION_DENIED", "RESOURCE_EXHAUSTED", ...) and message; "" otherwise.
    error_code: str = ""
    error_message: str = ""


# Queued-resource states (infra/tpu_states.py) a delete or create treats specially: SUSPENDING is waited
# for, never force-deleted (Google's advice, recorded in axlearn's TPU code); FAILED and SUSPENDED (QR_BROKEN)
# hold quota until deleted, and a delete of one can get stuck, so it is re-deleted.
DELETE_ATTEMPTS = 4  # deletes sent to one queued resource that stays FAILED/SUSPENDED before giving up


@dataclass(frozen=True)
class Node:
    """A TPU VM (node). `queued_resource` is the short id of the queued resource that made it, if any."""

    name: str
    zone: str
    state: str  # "CREATING", "READY", "PREEMPTED", "TERMINATED", "DELETING", ...
    labels: dict[str, str]
    create_time: float | None
    health: str = ""  # "HEALTHY", "UNHEALTHY_MAINTENANCE", ... ("" when unreported)
    queued_resource: str = ""
    path: str = ""


@dataclass(frozen=True)
class ZoneView:
    queued_resources: tuple[QueuedResource, ...]
    nodes: tuple[Node, ...]


@dataclass(frozen=True)
class ZoneError:
    message: str


# ----------------------------------------------------------------------------------------------------
# The client
# ----------------------------------------------------------------------------------------------------


class TpuApi:
    """One project's TPU API. Thread-safe: each thread gets its own underlying client."""

    def __init__(
        self,
        project: str,
        endpoint: str = "",
        *,
        retries: int = DEFAULT_RETRIES,
        timeout: float = DEFAULT_TIMEOUT,
        initial_backoff: float = 0.5,
        max_backoff: float = 16.0,
        operation_timeout: float = DEFAULT_OPERATION_TIMEOUT,
        page_size: int = 0,
        on_wait: Callable[[str, float], None] | None = None,
        on_note: Callable[[str], None] | None = None,
    ):
        self.project = project
        # Refused before any client exists: an https endpoint would be sent application default credentials.
        self.endpoint = check_endpoint(endpoint, "TPU API endpoint").rstrip("/")
        self.retries = retries
        self.timeout = timeout
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self.operation_timeout = operation_timeout
        self.page_size = page_size  # 0 = the server's default
        self.on_wait = on_wait  # called (what, seconds so far) after each poll of a running operation
        self.on_note = on_note  # called with a line worth telling a person (a stuck delete sent again)
        self._local = threading.local()
        self._count_lock = threading.Lock()
        self._calls = 0
        # One pool for the life of the client: its threads keep their TpuClient and HTTP connections, so a
        # `reconcile --watch` pass does not build 32 clients and open 32 connections again every time.
        self._pool: ThreadPoolExecutor | None = None

    @classmethod
    def from_config(cls, fleet: "FleetConfig", **kwargs: Any) -> "TpuApi":
        """The fleet's project, at `fleet.endpoint()` (ACTFLEET_TPU_ENDPOINT over fleet.tpu_endpoint)."""
        return cls(fleet.project, fleet.endpoint(), **kwargs)

    @property
    def calls(self) -> int:
        """HTTP requests made so far, each retry and operation poll included."""
        return self._calls

    def parent(self, zone: str) -> str:
        return f"projects/{self.project}/locations/{zone}"

    def qr_path(self, zone: str, qr_id: str) -> str:
        return f"{self.parent(zone)}/queuedResources/{qr_id}"

    def node_path(self, zone: str, node_id: str) -> str:
        return f"{self.parent(zone)}/nodes/{node_id}"

    # -------------------------------------------------------------- observe

    def list_queued_resources(self, zone: str) -> tuple[QueuedResource, ...]:
        pages = self._json_pages(f"list queued resources in {self.parent(zone)}", "queuedResources", zone)
        return tuple(_queued_resource_json(qr, zone) for page in pages for qr in page.get("queuedResources", ()))

    def list_nodes(self, zone: str) -> tuple[Node, ...]:
        pages = self._json_pages(f"list nodes in {self.parent(zone)}", "nodes", zone)
        return tuple(_node_json(n, zone) for page in pages for n in page.get("nodes", ()))

    def observe(self, zones: Iterable[str]) -> dict[str, ZoneView | ZoneError]:
        """List queued resources and nodes in every zone at once. A zone whose calls fail after retries
        maps to a ZoneError; the other zones are unaffected."""
        zones = list(dict.fromkeys(zones))
        if not zones:
            return {}
        with self._count_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=OBSERVE_THREADS, thread_name_prefix="tpu-observe")
            pool = self._pool
        qrs = {z: pool.submit(self.list_queued_resources, z) for z in zones}
        nodes = {z: pool.submit(self.list_nodes, z) for z in zones}
        out: dict[str, ZoneView | ZoneError] = {}
        for z in zones:
            try:
                out[z] = ZoneView(qrs[z].result(), nodes[z].result())
            except ActfleetError as e:
                out[z] = ZoneError(str(e))
        return out

    def get_queued_resource(self, zone: str, qr_id: str) -> QueuedResource | None:
        """The queued resource, or None when it does not exist."""
        raw = self._get_raw_queued_resource(zone, qr_id)
        return None if raw is None else _queued_resource(raw, zone)

    def get_node(self, zone: str, node_id: str) -> Node | None:
        """The node, or None when it does not exist."""
        path = self.node_path(zone, node_id)
        client = self._client()
        raw = self._call(
            f"node {path}", lambda: client.get_node(name=path, retry=None, timeout=self.timeout), missing_ok=True
        )
        return None if raw is None else _node(raw, zone)

    # -------------------------------------------------------------- act

    def create_queued_resource(self, zone: str, qr_id: str, request: dict, *, wait: bool = True) -> bool:
        """Create the queued resource from its REST JSON body. Returns True if created, False if it
        already existed with the same request (a no-op). If it exists with a different request, raises
        an ActfleetError saying where they differ: replacing it is the caller's decision.

        A queued resource of that name that is on its way out never counts as existing: one DELETING or
        SUSPENDING is waited for, one FAILED or SUSPENDED is deleted (confirmed), then it is created."""
        from google.cloud.tpu_v2.types import cloud_tpu

        path = self.qr_path(zone, qr_id)
        message = _parse_request(request, path)
        existing = self._settled_queued_resource(zone, qr_id)
        if existing is not None and _raw_state(existing) in QR_BROKEN:
            self.delete_queued_resource(zone, qr_id, force=True)
            existing = None
        if existing is not None:
            self._check_same(path, request, existing)
            return False
        client = self._client()
        try:
            op = self._call(
                f"queued resource {path}",
                lambda: client.create_queued_resource(
                    request=cloud_tpu.CreateQueuedResourceRequest(
                        parent=self.parent(zone), queued_resource_id=qr_id, queued_resource=message
                    ),
                    retry=None,
                    timeout=self.timeout,
                ),
                conflict_ok=True,
            )
        except _AlreadyExists:
            # Someone (or our own retried request) created it between our get and create.
            existing = self._get_raw_queued_resource(zone, qr_id)
            if existing is None:
                raise ActfleetError(f"TPU API: queued resource {path}: 409 already exists, yet is not there")
            self._check_same(path, request, existing)
            return False
        if wait:
            self._wait(op.operation, f"queued resource {path}")
        return True

    def delete_queued_resource(self, zone: str, qr_id: str, force: bool = True, *, wait: bool = True) -> bool:
        """Delete the queued resource (with `force`, its node too) and, with `wait`, confirm it is gone: poll
        until a GET answers NOT_FOUND, deleting again one that stays FAILED or SUSPENDED (such deletes get
        stuck). One SUSPENDING is waited for first, never force-deleted. Returns False when it was already
        gone (a no-op)."""
        path = self.qr_path(zone, qr_id)
        what = f"queued resource {path}"

        def send():
            return self._delete(
                what,
                lambda client: client.delete_queued_resource(
                    request={"name": path, "force": force}, retry=None, timeout=self.timeout
                ),
                wait=wait,
            )

        if not wait:
            return send()
        if self._settled_queued_resource(zone, qr_id, wait_deleting=False) is None:
            return False
        started, sent = time.monotonic(), 0
        delays = _poll_delays()
        while True:
            raw = self._get_raw_queued_resource(zone, qr_id)
            if raw is None:
                return True
            state = _raw_state(raw)
            if state != QR_DELETING and state != QR_SUSPENDING:
                if sent >= DELETE_ATTEMPTS:
                    raise ActfleetError(
                        f"TPU API: {what}: still {state} after {sent} deletes (stuck: delete it "
                        "in the console, or ask Google support)"
                    )
                if sent:
                    self._note(what, f"still {state} after a delete: deleting it again")
                sent += 1
                if not send():
                    return True
                continue
            self._tick(what, started, delays)

    def request_delete_queued_resource(self, zone: str, qr_id: str, force: bool = True) -> str:
        """Ask for the delete and return at once (the fleet stack's destroy provisioner: the next reconcile
        pass's observation confirms it, so an apply never waits a thousand deletes out). Returns what was
        done: "gone" (nothing there), "deleting" (a delete already runs), "suspending" (left alone: never
        force-deleted while SUSPENDING; reconcile deletes it once SUSPENDED), or "requested"."""
        raw = self._get_raw_queued_resource(zone, qr_id)
        if raw is None:
            return "gone"
        state = _raw_state(raw)
        if state == QR_DELETING:
            return "deleting"
        if state == QR_SUSPENDING:
            return "suspending"
        return "requested" if self.delete_queued_resource(zone, qr_id, force, wait=False) else "gone"

    def _settled_queued_resource(self, zone: str, qr_id: str, wait_deleting: bool = True):
        """GET the queued resource, first waiting out SUSPENDING (and, with wait_deleting, DELETING):
        the raw message, or None once it does not exist."""
        what = f"queued resource {self.qr_path(zone, qr_id)}"
        started, delays = time.monotonic(), _poll_delays()
        while True:
            raw = self._get_raw_queued_resource(zone, qr_id)
            if raw is None:
                return None
            state = _raw_state(raw)
            if state != QR_SUSPENDING and not (wait_deleting and state == QR_DELETING):
                return raw
            self._tick(what, started, delays)

    def _tick(self, what: str, started: float, delays) -> None:
        """One poll's wait (reported to on_wait), or an error past operation_timeout."""
        waited = time.monotonic() - started
        if self.on_wait is not None:
            self.on_wait(what, waited)
        if waited > self.operation_timeout:
            raise ActfleetError(f"TPU API: {what}: still not settled after {self.operation_timeout:.0f} s")
        time.sleep(next(delays))

    def _note(self, what: str, message: str) -> None:
        if self.on_note is not None:
            self.on_note(f"{what}: {message}")

    def delete_node(self, zone: str, node_id: str, *, wait: bool = True) -> bool:
        """Delete a node and wait until it is gone. Returns False when it was already gone."""
        path = self.node_path(zone, node_id)
        return self._delete(
            f"node {path}", lambda client: client.delete_node(name=path, retry=None, timeout=self.timeout), wait=wait
        )

    def _delete(self, what: str, request: Callable[[Any], Any], *, wait: bool) -> bool:
        """One delete: `request(client)` with retries; False when already gone (404), else True once its
        operation has finished (or at once without `wait`)."""
        client = self._client()
        op = self._call(what, lambda: request(client), missing_ok=True)
        if op is None:
            return False
        if wait:
            self._wait(op.operation, what)
        return True

    # -------------------------------------------------------------- internals

    def _client(self):
        """This thread's TpuClient (requests sessions are not shared across threads)."""
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self._make_client()
        return client

    def _make_client(self):
        from google.cloud import tpu_v2

        if self.endpoint.startswith("http://"):
            # A loopback fake or emulator: no credentials to send.
            from google.auth.credentials import AnonymousCredentials

            return tpu_v2.TpuClient(
                transport="rest", client_options={"api_endpoint": self.endpoint}, credentials=AnonymousCredentials()
            )
        options = {"api_endpoint": self.endpoint} if self.endpoint else None
        try:
            # Application default credentials (gcloud auth application-default login, or the VM's account).
            return tpu_v2.TpuClient(transport="rest", client_options=options)
        except Exception as e:
            from google.auth.exceptions import DefaultCredentialsError

            if isinstance(e, DefaultCredentialsError):
                raise PrerequisiteError(
                    "TPU API: no Google Cloud credentials found: run `gcloud auth "
                    "application-default login` (actfleet never uses key files)"
                ) from None
            raise

    def _get_raw_queued_resource(self, zone: str, qr_id: str):
        path = self.qr_path(zone, qr_id)
        client = self._client()
        return self._call(
            f"queued resource {path}",
            lambda: client.get_queued_resource(name=path, retry=None, timeout=self.timeout),
            missing_ok=True,
        )

    def _json_pages(self, what: str, collection: str, zone: str):
        """The list's pages as JSON dicts, over the client's own authorized session and endpoint. Lists are
        the hot path (10,000 workers a pass): the generated client would parse every page into protobuf
        with the pure-Python json_format (~0.3 ms a resource), ours reads the fields it needs from JSON.
        Errors go through google.api_core's own mapping, so _call retries and words them as for the rest."""
        from google.api_core import exceptions as gexc

        transport = self._client()._transport
        url = f"{transport._host}/v2/{self.parent(zone)}/{collection}"
        token = ""
        while True:
            params = {"pageToken": token} if token else {}
            if self.page_size:
                params["pageSize"] = self.page_size

            def get():
                r = transport._session.get(url, params=params, timeout=self.timeout)
                if r.status_code >= 400:
                    raise gexc.from_http_response(r)
                return r.json()

            page = self._call(what, get)
            yield page
            token = page.get("nextPageToken", "")
            if not token:
                return

    def _pages(self, what: str, method: Callable, zone: str):
        token = ""
        while True:
            request = {"parent": self.parent(zone), "page_token": token, "page_size": self.page_size}
            # The generated pager would fetch later pages itself, outside our retries: take one page at
            # a time instead (attribute access on the pager reads that page's response).
            page = self._call(what, lambda: method(request=request, retry=None, timeout=self.timeout))
            yield page
            token = page.next_page_token
            if not token:
                return

    def _call(self, what: str, fn: Callable[[], T], *, missing_ok: bool = False, conflict_ok: bool = False) -> T:
        """Run one API request with retries (actfleet.retry: 429, 5xx, timeouts and dropped connections).
        `what` names the resource for error messages."""
        from actfleet.infra.api_errors import call

        def count() -> None:
            with self._count_lock:
                self._calls += 1

        return call(
            fn,
            api="TPU API",
            host=self.endpoint or "tpu.googleapis.com",
            what=what,
            error_line=_api_error_line,
            count=count,
            attempts=self.retries + 1,
            base=self.initial_backoff,
            cap=self.max_backoff,
            missing_ok=missing_ok,
            on_conflict=_already_exists if conflict_ok else None,
        )

    def _wait(self, operation, what: str) -> None:
        """Poll a long-running operation until it is done; raise its error, if it ended in one."""
        client = self._client()
        delays = _poll_delays()
        started = time.monotonic()
        deadline = started + self.operation_timeout
        while not operation.done:
            if self.on_wait is not None:
                self.on_wait(what, time.monotonic() - started)
            if time.monotonic() > deadline:
                raise ActfleetError(
                    f"TPU API: {what}: operation {operation.name} still running after {self.operation_timeout:.0f} s"
                )
            time.sleep(next(delays))
            name = operation.name
            operation = self._call(
                f"operation {name}",
                lambda: client.get_operation(request={"name": name}, retry=None, timeout=self.timeout),
            )
        if operation.HasField("error"):
            err = operation.error
            raise ActfleetError(
                f"TPU API: {what}: operation {operation.name} failed: {err.code} {one_line(err.message)}"
            )

    def _check_same(self, path: str, request: dict, existing) -> None:
        from google.cloud.tpu_v2.types import cloud_tpu
        from google.protobuf import json_format

        # Compare in one normal form: what the request asks for must be what exists. Fields the service
        # fills in (name, createTime, state, defaults) are not in the request, so they are not compared.
        wanted = json_format.MessageToDict(cloud_tpu.QueuedResource.pb(_parse_request(request, path)))
        have = json_format.MessageToDict(cloud_tpu.QueuedResource.pb(existing))
        # The API answers nodeSpec[].parent with the project NUMBER: the same place is not a difference.
        for w, h in zip(wanted.get("tpu", {}).get("nodeSpec", []), have.get("tpu", {}).get("nodeSpec", [])):
            if _same_parent(w.get("parent", ""), h.get("parent", "")):
                h["parent"] = w.get("parent", "")
        where = _first_difference(wanted, have)
        # The capacity tier is one choice: an on-demand request (no tier) meeting a spot resource differs,
        # although the request leaves `spot` out.
        if where is None:
            where = next((t for t in _TIERS if (t in wanted) != (t in have)), None)
        if where is not None:
            raise ActfleetError(
                f"TPU API: queued resource {path} already exists with a different request "
                f"(differs at {where}): delete it first, or let reconcile replace it"
            )


class _AlreadyExists(Exception):
    pass


def _already_exists():
    raise _AlreadyExists()


# ----------------------------------------------------------------------------------------------------
# Conversions
# ----------------------------------------------------------------------------------------------------


def _parse_request(request: dict, path: str):
    """REST JSON body -> QueuedResource message; a malformed body is bad input (exit 2)."""
    from google.cloud.tpu_v2.types import cloud_tpu

    if not isinstance(request, dict):
        raise InputError(f"queued resource {path}: the request must be a JSON object, not {type(request).__name__}")
    try:
        message = cloud_tpu.QueuedResource.from_json(json.dumps(request), ignore_unknown_fields=False)
    except Exception as e:  # json_format.ParseError: unknown field, wrong type, bad enum
        raise InputError(
            f"queued resource {path}: the request is not a valid TPU v2 QueuedResource: {one_line(e)}"
        ) from None
    # Catch here what the service would refuse later with a less obvious message.
    parent = path.rsplit("/queuedResources/", 1)[0]
    specs = list(message.tpu.node_spec)
    if not specs:
        raise InputError(f"queued resource {path}: the request has no tpu.nodeSpec entries")
    for i, spec in enumerate(specs):
        if spec.parent != parent:
            raise InputError(
                f'queued resource {path}: tpu.nodeSpec[{i}].parent = "{spec.parent}": must be '
                f'"{parent}" (the same project and zone)'
            )
        if not spec.node_id and not spec.multislice_params.node_id_prefix:
            raise InputError(f"queued resource {path}: tpu.nodeSpec[{i}] needs a nodeId")
        if not spec.node.accelerator_type and not spec.node.accelerator_config.topology:
            raise InputError(f"queued resource {path}: tpu.nodeSpec[{i}].node needs an acceleratorType")
        if not spec.node.runtime_version:
            raise InputError(f"queued resource {path}: tpu.nodeSpec[{i}].node needs a runtimeVersion")
    return message


# Conversions read the raw protobuf (type(msg).pb(msg)): proto-plus attribute access costs ~10x more, which
# shows at a thousand workers.


def _poll_delays():
    """Between polls of a resource or operation that is settling (not a failure, so no retry())."""
    return backoff(0.1, 5.0, 1.5)


def _raw_state(qr) -> str:
    from google.cloud.tpu_v2.types import cloud_tpu

    return _enum_name(cloud_tpu.QueuedResourceState.State, cloud_tpu.QueuedResource.pb(qr).state.state)


def _queued_resource(qr, zone: str) -> QueuedResource:
    from google.cloud.tpu_v2.types import cloud_tpu
    from google.rpc import code_pb2

    pb = cloud_tpu.QueuedResource.pb(qr)
    specs = pb.tpu.node_spec
    error = pb.state.failed_data.error if pb.state.HasField("failed_data") else None
    if error is not None:
        try:
            code = code_pb2.Code.Name(error.code)
        except ValueError:
            code = str(error.code)
    return QueuedResource(
        name=pb.name.rsplit("/", 1)[-1],
        zone=zone,
        state=_enum_name(cloud_tpu.QueuedResourceState.State, pb.state.state),
        state_initiator=_enum_name(cloud_tpu.QueuedResourceState.StateInitiator, pb.state.state_initiator),
        labels=dict(specs[0].node.labels) if specs else {},
        node_ids=tuple(s.node_id for s in specs if s.node_id),
        create_time=_seconds(pb, "create_time"),
        path=pb.name,
        error_code=code if error is not None else "",
        error_message=one_line(error.message) if error is not None else "",
    )


def _node(n, zone: str) -> Node:
    from google.cloud.tpu_v2.types import cloud_tpu

    pb = cloud_tpu.Node.pb(n)
    return Node(
        name=pb.name.rsplit("/", 1)[-1],
        zone=zone,
        state=_enum_name(cloud_tpu.Node.State, pb.state),
        labels=dict(pb.labels),
        create_time=_seconds(pb, "create_time"),
        health="" if pb.health == 0 else _enum_name(cloud_tpu.Node.Health, pb.health),
        queued_resource=pb.queued_resource.rsplit("/", 1)[-1] if pb.queued_resource else "",
        path=pb.name,
    )


def _queued_resource_json(d: dict, zone: str) -> QueuedResource:
    """_queued_resource, from the REST JSON (enums by name: no `enum-encoding=int` is asked for)."""
    specs = (d.get("tpu") or {}).get("nodeSpec") or []
    state = d.get("state") or {}
    error = (state.get("failedData") or {}).get("error")
    code = ""
    if error is not None:
        from google.rpc import code_pb2

        try:
            code = code_pb2.Code.Name(int(error.get("code", 0)))
        except ValueError:
            code = str(error.get("code"))
    return QueuedResource(
        name=d.get("name", "").rsplit("/", 1)[-1],
        zone=zone,
        state=state.get("state", "STATE_UNSPECIFIED"),
        state_initiator=state.get("stateInitiator", "STATE_INITIATOR_UNSPECIFIED"),
        labels=dict((specs[0].get("node") or {}).get("labels") or {}) if specs else {},
        node_ids=tuple(s["nodeId"] for s in specs if s.get("nodeId")),
        create_time=_rfc3339(d.get("createTime")),
        path=d.get("name", ""),
        error_code=code,
        error_message=one_line(error.get("message", "")) if error is not None else "",
    )


def _node_json(d: dict, zone: str) -> Node:
    """_node, from the REST JSON."""
    qr = d.get("queuedResource", "")
    return Node(
        name=d.get("name", "").rsplit("/", 1)[-1],
        zone=zone,
        state=d.get("state", "STATE_UNSPECIFIED"),
        labels=dict(d.get("labels") or {}),
        create_time=_rfc3339(d.get("createTime")),
        health="" if d.get("health", "HEALTH_UNSPECIFIED") == "HEALTH_UNSPECIFIED" else d["health"],
        queued_resource=qr.rsplit("/", 1)[-1] if qr else "",
        path=d.get("name", ""),
    )


def _rfc3339(text: str | None) -> float | None:
    """'2026-12-03T13:34:11.123456789Z' -> epoch seconds (fractions past microseconds dropped)."""
    if not text:
        return None
    import datetime

    head, _, frac = text.rstrip("Z").partition(".")
    frac = frac.split("+")[0][:6]
    t = datetime.datetime.fromisoformat(head).replace(tzinfo=datetime.timezone.utc).timestamp()
    return t + (int(frac.ljust(6, "0")) / 1e6 if frac else 0.0)


def _enum_name(enum, number: int) -> str:
    try:
        return enum(number).name
    except ValueError:  # a value newer than the installed library: keep it visible
        return str(number)


def _seconds(pb, field: str) -> float | None:
    if not pb.HasField(field):
        return None
    ts = getattr(pb, field)
    return ts.seconds + ts.nanos / 1e9


def _api_error_line(what: str, e) -> str:
    """'TPU API: <what>: 403 permission denied: <the service's message>' on one line."""
    status, message = "", e.message
    response = getattr(e, "response", None)
    try:
        err = response.json()["error"]
        status, message = err.get("status", ""), err.get("message", message)
    except Exception:
        pass
    status = (status or (e.reason or "") or type(e).__name__).replace("_", " ").lower()
    return f"TPU API: {what}: {e.code} {status}: {one_line(message)}"


def _first_difference(wanted: Any, have: Any, where: str = "", exact: bool = False) -> str | None:
    """The path of the first value `wanted` sets that `have` lacks or holds differently (None if none).

    Fields the service fills in are absent from `wanted` and so ignored, except inside the maps a request
    states in full (labels, metadata): there a key `have` holds and `wanted` dropped is a difference too."""
    if isinstance(wanted, dict):
        if not isinstance(have, dict):
            return where or "."
        for k, v in wanted.items():
            d = _first_difference(v, have.get(k, None), f"{where}.{k}" if where else k, k in _EXACT_MAPS)
            if d is not None:
                return d
        if exact:
            extra = sorted(set(have) - set(wanted))
            if extra:
                return f"{where}.{extra[0]}"
        return None
    if isinstance(wanted, list):
        if not isinstance(have, list) or len(have) != len(wanted):
            return where
        for i, (w, h) in enumerate(zip(wanted, have)):
            d = _first_difference(w, h, f"{where}[{i}]")
            if d is not None:
                return d
        return None
    return None if wanted == have else where


_EXACT_MAPS = frozenset({"labels", "metadata"})
_TIERS = ("spot", "guaranteed")  # QueuedResource's tier oneof; none set = on-demand


def _same_parent(wanted: str, have: str) -> bool:
    """True when two `projects/{p}/locations/{zone}` name one place: the API writes the project's number
    where the request wrote its id, so only the location is compared."""
    w, h = wanted.split("/"), have.split("/")
    return len(w) == len(h) == 4 and w[0] == h[0] == "projects" and w[2:] == h[2:]
