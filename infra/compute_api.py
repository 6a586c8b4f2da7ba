"""The Compute Engine API v1 as gce mode uses it: observe a fleet's TPU VM instances, delete orphans.

Built on `google.cloud.compute_v1` over REST (imported lazily). It answers reconcile in the TPU client's
shape (infra/tpu_api.py), so observe.merge, confirm_missing and the API deletes work unchanged:

    api = ComputeApi.from_config(cfg.fleet)      # the endpoint: $ACTFLEET_COMPUTE_ENDPOINT over fleet.compute_endpoint
    api.observe(zones)     zone -> ZoneView(queued_resources=(), nodes=(Instance, ...)) | ZoneError
    api.get_node(zone, name)        an Instance or None;  api.get_queued_resource(...) is always None
    api.delete_node(zone, name)     = delete_instance: True once gone, False if it already was
    api.calls                        HTTP requests made (retries, pages and operation waits included)

An Instance's `state` is its status mapped into the TPU node-state names decide reads (infra/gce_states.py);
`status` keeps Compute Engine's own word for people.

How a pass lists: one list per zone, all zones in parallel, filtered server-side to this fleet's label
(`labels.actfleet-fleet = "<id>"`), maxResults 500 (the API's cap). Calls per pass = sum over zones of
ceil(instances in the zone / 500) (so 16 zones of <= 500 workers: 16 calls, side by side). The aggregated
list (`observe_via="aggregated"`) costs ceil(fleet / 500) calls, one after another (each page needs the last
one's token) and lists every zone of the project; per zone was chosen because a zone that fails is then
known to be that zone (decide leaves exactly it alone, as in the TPU path), where an aggregated call fails
whole or marks a scope UNREACHABLE (the library documents the warning; how often the real API answers that
way rather than failing is not documented), and because the calls overlap. bench/gce_observe.py measures both.

Unconfirmed here (only a real project can): that the list filter takes the hyphenated label key as written
(`labels.actfleet-fleet = "..."`; Google's examples use plain keys), and how the real aggregated list answers
a zone it cannot reach. The label filter means a same-named instance *without* this fleet's label is not listed: decide cannot
report it as "not ours" before the apply's insert fails on it with 409 alreadyExists (which the apply then
reports). The TPU path lists everything and sees it earlier.

Errors: every call is retried with jittered exponential backoff on 429, 5xx, timeouts and dropped
connections (actfleet.retry); 400/403/404 and a 5xx that outlasts the retries end in one line naming the
resource: "Compute Engine API: instance projects/p/zones/z/instances/w: 403 forbidden: ...". A long-running
operation that ends in an error (ZONE_RESOURCE_POOL_EXHAUSTED on a stockout) raises with its code.

google-cloud-compute's own operation futures (ExtendedOperation.result()) poll through a ZoneOperationsClient
built without the client's api_endpoint, so they would poll compute.googleapis.com even for a loopback fake:
this module waits on operations through its own zone operations client, with `operations.wait`.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, TypeVar

from actfleet.endpoints import check_endpoint
from actfleet.errors import ActfleetError, PrerequisiteError
from actfleet.formatting import one_line
from actfleet.infra.decide import FLEET_LABEL
from actfleet.infra.gce_states import node_state
from actfleet.infra.tpu_api import ZoneError, ZoneView

if TYPE_CHECKING:
    from actfleet.config import FleetConfig

T = TypeVar("T")

DEFAULT_RETRIES = 6  # attempts after the first; full-jitter sleeps under 0.5, 1, 2, 4, 8, 16 s
DEFAULT_TIMEOUT = 30.0  # seconds per HTTP request (operations.wait is answered within 2 min: see _wait)
DEFAULT_OPERATION_TIMEOUT = 900.0
MAX_RESULTS = 500  # the API's largest page
OBSERVE_THREADS = 32
WAIT_TIMEOUT = 150.0  # operations.wait returns within about two minutes, done or not
API = "Compute Engine API"


@dataclass(frozen=True)
class Instance:
    """A Compute Engine instance, in the shape observe.merge reads a TPU node in (tpu_api.Node)."""

    name: str
    zone: str
    state: str  # the status mapped into the TPU node-state names decide reads (infra/gce_states.py)
    labels: dict[str, str]
    create_time: float | None
    status: str = ""  # Compute Engine's own: "RUNNING", "TERMINATED", ...
    health: str = ""  # Compute Engine reports no node health: always ""
    queued_resource: str = ""  # never one in gce mode
    path: str = ""
    provisioning_model: str = ""  # "SPOT", "STANDARD", "FLEX_START", ...
    termination_action: str = ""  # "STOP" | "DELETE" | "" (what a preemption does)
    last_stop_time: float | None = None


class ComputeApi:
    """One project's Compute Engine API, for one fleet. Thread-safe: each thread gets its own clients."""

    def __init__(
        self,
        project: str,
        endpoint: str = "",
        *,
        fleet_id: str | None = None,
        observe_via: str = "zones",
        retries: int = DEFAULT_RETRIES,
        timeout: float = DEFAULT_TIMEOUT,
        initial_backoff: float = 0.5,
        max_backoff: float = 16.0,
        operation_timeout: float = DEFAULT_OPERATION_TIMEOUT,
        page_size: int = MAX_RESULTS,
    ):
        if observe_via not in ("zones", "aggregated"):
            raise ValueError(f"observe_via must be 'zones' or 'aggregated', not {observe_via!r}")
        self.project = project
        # Refused before any client exists: an https endpoint would be sent application default credentials.
        self.endpoint = check_endpoint(endpoint, f"{API} endpoint").rstrip("/")
        self.fleet_id = fleet_id  # None: list every instance (no label filter)
        self.observe_via = observe_via
        self.retries = retries
        self.timeout = timeout
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self.operation_timeout = operation_timeout
        self.page_size = page_size
        self._local = threading.local()
        self._count_lock = threading.Lock()
        self._calls = 0
        self._pool: ThreadPoolExecutor | None = None

    @classmethod
    def from_config(cls, fleet: "FleetConfig", **kwargs: Any) -> "ComputeApi":
        """The fleet's project and label, at `fleet.compute_endpoint_url()` ($ACTFLEET_COMPUTE_ENDPOINT over config)."""
        return cls(fleet.project, fleet.compute_endpoint_url(), fleet_id=fleet.id, **kwargs)

    @property
    def calls(self) -> int:
        return self._calls

    def instance_path(self, zone: str, name: str) -> str:
        return f"projects/{self.project}/zones/{zone}/instances/{name}"

    @property
    def filter(self) -> str:
        return f'labels.{FLEET_LABEL} = "{self.fleet_id}"' if self.fleet_id else ""

    # -------------------------------------------------------------- observe

    def list_instances(self, zone: str) -> tuple[Instance, ...]:
        url = f"{self._host()}/compute/v1/projects/{self.project}/zones/{zone}/instances"
        pages = self._json_pages(f"list instances in projects/{self.project}/zones/{zone}", url)
        return tuple(instance_from_json(d, zone) for page in pages for d in page.get("items", ()))

    def list_aggregated(self) -> tuple[dict[str, list[Instance]], dict[str, str]]:
        """Every zone's instances of this fleet in one paged list: (zone -> instances, zone -> warning for
        the scopes the API marked UNREACHABLE)."""
        url = f"{self._host()}/compute/v1/projects/{self.project}/aggregated/instances"
        found: dict[str, list[Instance]] = {}
        down: dict[str, str] = {}
        # returnPartialSuccess: the REST reference's aggregatedList parameter (compute_v1 1.57's request type
        # lacks it, the raw GET sends it): a scope that fails is then named in `unreachables`, not fatal.
        what = f"aggregated list of instances in projects/{self.project}"
        for page in self._json_pages(what, url, {"returnPartialSuccess": "true"}):
            for scope, scoped in (page.get("items") or {}).items():
                if not scope.startswith("zones/"):
                    continue
                zone = scope[len("zones/") :]
                warning = scoped.get("warning") or {}
                if warning.get("code") == "UNREACHABLE":
                    down[zone] = f"{API}: {scope} unreachable: {one_line(warning.get('message', ''))}"
                found.setdefault(zone, []).extend(instance_from_json(d, zone) for d in scoped.get("instances", ()))
            for scope in page.get("unreachables") or ():
                zone = scope.rsplit("/", 1)[-1]
                down.setdefault(zone, f"{API}: {scope} unreachable")
        return found, down

    def observe(self, zones: Iterable[str]) -> dict[str, ZoneView | ZoneError]:
        """Every zone's instances of this fleet. A zone whose calls fail after retries maps to a ZoneError;
        with observe_via="aggregated" a failed call fails every zone (nothing is judged that pass)."""
        zones = list(dict.fromkeys(zones))
        if not zones:
            return {}
        if self.observe_via == "aggregated":
            try:
                found, down = self.list_aggregated()
            except ActfleetError as e:
                return {z: ZoneError(str(e)) for z in zones}
            return {z: ZoneError(down[z]) if z in down else ZoneView((), tuple(found.get(z, ()))) for z in zones}
        with self._count_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=OBSERVE_THREADS, thread_name_prefix="gce-observe")
            pool = self._pool
        futures = {z: pool.submit(self.list_instances, z) for z in zones}
        out: dict[str, ZoneView | ZoneError] = {}
        for z in zones:
            try:
                out[z] = ZoneView((), futures[z].result())
            except ActfleetError as e:
                out[z] = ZoneError(str(e))
        return out

    def get_instance(self, zone: str, name: str) -> Instance | None:
        path = self.instance_path(zone, name)
        url = f"{self._host()}/compute/v1/{path}"
        raw = self._call(f"instance {path}", lambda: self._get_json(url), missing_ok=True)
        return None if raw is None else instance_from_json(raw, zone)

    # The TPU client's names, which reconcile calls (confirm_missing, _delete_through_api).
    get_node = get_instance

    def get_queued_resource(self, zone: str, name: str) -> None:
        return None  # gce mode has no queued resources

    # -------------------------------------------------------------- act

    def insert_instance(self, zone: str, body: dict, *, wait: bool = True) -> bool:
        """Insert an instance from its REST JSON body; False if one of that name exists already. With
        `wait`, raises the operation's error (ZONE_RESOURCE_POOL_EXHAUSTED, ...) if it ends in one."""
        from google.cloud import compute_v1

        path = self.instance_path(zone, body.get("name", "?"))
        try:
            message = compute_v1.Instance.from_json(json.dumps(body), ignore_unknown_fields=False)
        except Exception as e:
            raise ActfleetError(f"{API}: instance {path}: not a valid Instance: {one_line(e)}") from None
        client = self._client()
        op = self._call(
            f"instance {path}",
            lambda: client.insert_unary(
                project=self.project, zone=zone, instance_resource=message, retry=None, timeout=self.timeout
            ),
            conflict_ok=True,
        )
        if op is _EXISTS:
            return False
        if wait:
            self._wait(zone, op, f"instance {path}")
        return True

    def delete_instance(self, zone: str, name: str, *, wait: bool = True) -> bool:
        """Delete the instance; with `wait`, until its operation is done. False when it was already gone."""
        path = self.instance_path(zone, name)
        client = self._client()
        op = self._call(
            f"instance {path}",
            lambda: client.delete_unary(
                project=self.project, zone=zone, instance=name, retry=None, timeout=self.timeout
            ),
            missing_ok=True,
        )
        if op is None:
            return False
        if wait:
            self._wait(zone, op, f"instance {path}")
        return True

    delete_node = delete_instance

    # -------------------------------------------------------------- internals

    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self._make_client("InstancesClient")
        return client

    def _ops_client(self):
        client = getattr(self._local, "ops", None)
        if client is None:
            client = self._local.ops = self._make_client("ZoneOperationsClient")
        return client

    def _make_client(self, kind: str):
        from google.cloud import compute_v1

        cls = getattr(compute_v1, kind)
        if self.endpoint.startswith("http://"):
            from google.auth.credentials import AnonymousCredentials  # a loopback fake: no credentials to send

            return cls(
                transport="rest", client_options={"api_endpoint": self.endpoint}, credentials=AnonymousCredentials()
            )
        options = {"api_endpoint": self.endpoint} if self.endpoint else None
        try:
            return cls(transport="rest", client_options=options)
        except Exception as e:
            from google.auth.exceptions import DefaultCredentialsError

            if isinstance(e, DefaultCredentialsError):
                raise PrerequisiteError(
                    f"{API}: no Google Cloud credentials found: run `gcloud auth application-default login` "
                    "(actfleet never uses key files)"
                ) from None
            raise

    def _host(self) -> str:
        return self._client()._transport._host

    def _get_json(self, url: str, params: dict | None = None) -> dict:
        """One GET over the client's own authorized session, read as JSON: lists are the hot path, and the
        generated client would parse every Instance into protobuf (slow at thousands). Errors go through
        google.api_core's mapping, so _call retries and words them as for the rest."""
        from google.api_core import exceptions as gexc

        r = self._client()._transport._session.get(url, params=params, timeout=self.timeout)
        if r.status_code >= 400:
            raise gexc.from_http_response(r)
        return r.json()

    def _json_pages(self, what: str, url: str, extra: dict[str, str] | None = None):
        token = ""
        while True:
            params: dict[str, Any] = {"maxResults": self.page_size, **(extra or {})}
            if self.filter:
                params["filter"] = self.filter
            if token:
                params["pageToken"] = token
            page = self._call(what, lambda: self._get_json(url, params))
            yield page
            token = page.get("nextPageToken", "")
            if not token:
                return

    def _call(self, what: str, fn: Callable[[], T], *, missing_ok: bool = False, conflict_ok: bool = False) -> T:
        """One API request with retries on 429, 5xx, timeouts and dropped connections."""
        from actfleet.infra.api_errors import call

        def count() -> None:
            with self._count_lock:
                self._calls += 1

        return call(
            fn,
            api=API,
            host=self.endpoint or "compute.googleapis.com",
            what=what,
            error_line=_error_line,
            count=count,
            attempts=self.retries + 1,
            base=self.initial_backoff,
            cap=self.max_backoff,
            missing_ok=missing_ok,
            on_conflict=lambda: _EXISTS if conflict_ok else None,
        )

    def _wait(self, zone: str, op, what: str) -> None:
        """Wait for a zone operation with operations.wait (answered when done, or within ~2 minutes), then
        raise its error, if it ended in one."""
        from google.cloud import compute_v1

        ops = self._ops_client()
        deadline = time.monotonic() + self.operation_timeout
        name = op.name
        while op.status != compute_v1.Operation.Status.DONE:
            if time.monotonic() > deadline:
                raise ActfleetError(
                    f"{API}: {what}: operation {name} still running after {self.operation_timeout:.0f} s"
                )
            op = self._call(
                f"operation {name}",
                lambda: ops.wait(project=self.project, zone=zone, operation=name, retry=None, timeout=WAIT_TIMEOUT),
            )
        errors = list(op.error.errors) if op.error else []
        if errors:
            first = errors[0]
            raise ActfleetError(
                f"{API}: {what}: operation {name} failed: {first.code}: {one_line(first.message)}"
                + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")
            )


_EXISTS = object()  # an insert answered 409 alreadyExists


def instance_from_json(d: dict, zone: str) -> Instance:
    """An Instance from the REST JSON (statuses and enums by name, as the REST transport asks for them)."""
    sched = d.get("scheduling") or {}
    status = d.get("status", "")
    return Instance(
        name=d.get("name", ""),
        zone=zone,
        state=node_state(status),
        labels=dict(d.get("labels") or {}),
        create_time=_rfc3339_offset(d.get("creationTimestamp")),
        status=status,
        path=f"projects/{_project_of(d)}/zones/{zone}/instances/{d.get('name', '')}",
        provisioning_model=sched.get("provisioningModel", ""),
        termination_action=sched.get("instanceTerminationAction", ""),
        last_stop_time=_rfc3339_offset(d.get("lastStopTimestamp")),
    )


def _project_of(d: dict) -> str:
    link = d.get("selfLink", "")
    parts = link.split("/projects/", 1)
    return parts[1].split("/", 1)[0] if len(parts) == 2 else ""


def _rfc3339_offset(text: str | None) -> float | None:
    """Compute Engine writes timestamps with an offset ('2026-12-03T09:12:01.123-08:00'): epoch seconds."""
    if not text:
        return None
    import datetime

    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _error_line(what: str, e) -> str:
    """'Compute Engine API: <what>: 403 forbidden: <the service's message>' on one line."""
    message, reason = e.message, ""
    response = getattr(e, "response", None)
    try:
        err = response.json()["error"]
        message = err.get("message", message)
        reason = (err.get("errors") or [{}])[0].get("reason", "") or err.get("status", "")
    except Exception:
        pass
    words = (reason or getattr(e, "reason", "") or type(e).__name__).replace("_", " ")
    return f"{API}: {what}: {e.code} {words}: {one_line(message)}"
