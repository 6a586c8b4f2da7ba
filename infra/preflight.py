"""`actfleet preflight`: what a first deploy needs from the project, checked before anything is applied.

Each check is data: a name, a probe (config, api) -> (status, detail), and the command that fixes it. The
probes read Google's REST APIs with the operator's application default credentials:

- APIs enabled: Service Usage `GET v1/projects/P/services/S` -> state ENABLED;
- the network exists: Compute `GET compute/v1/projects/P/global/networks/N`;
- spot (or on-demand) TPU quota per zone covers the fleet: Cloud Quotas `GET v1/projects/P/locations/global/
  services/tpu.googleapis.com/quotaInfos/ID`, the zone's value (or the default one) >= workers x units;
- the operator may act as the workers' service account: IAM `POST v1/projects/-/serviceAccounts/E:
  testIamPermissions` with iam.serviceAccounts.actAs (not created yet = skipped: the base stack creates it);
- runtime_version fits accelerator_type (actfleet/accelerators.py RUNTIMES; no API).

Quota is compared with the limit, not with what other fleets already use (Cloud Quotas reports limits).
ACTFLEET_GOOGLE_API_ENDPOINT replaces every API root with one loopback URL (tests' fake); anything else there is
refused, so no setting sends the operator's token to a foreign host.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from actfleet import accelerators
from actfleet.config import Config
from actfleet.errors import ConfigError

ENDPOINT_ENV = "ACTFLEET_GOOGLE_API_ENDPOINT"
SERVICES = ("compute", "tpu", "iam", "cloudresourcemanager", "storage")
ROOTS = {
    "serviceusage": "https://serviceusage.googleapis.com",
    "compute": "https://compute.googleapis.com",
    "cloudquotas": "https://cloudquotas.googleapis.com",
    "iam": "https://iam.googleapis.com",
}
# Cloud Quotas ids of the TPU API's per-zone quotas (family -> (spot, on-demand)); as named in quota errors and
# the Cloud TPU quota page. v2/v3 have none here: their quota is not checked.
QUOTA_IDS = {
    "v4": ("TPUV4sPreemptiblePodPerProjectPerZoneForTPUAPI", "TPUV4sPodPerProjectPerZoneForTPUAPI"),
    "v5litepod": ("TPUV5sPreemptibleLitepodPerProjectPerZoneForTPUAPI", "TPUV5sLitepodPerProjectPerZoneForTPUAPI"),
    "v5p": ("TPUV5PPreemptiblePerProjectPerZoneForTPUAPI", "TPUV5PPerProjectPerZoneForTPUAPI"),
    "v6e": ("TPUV6EPreemptiblePerProjectPerZoneForTPUAPI", "TPUV6EPerProjectPerZoneForTPUAPI"),
}
OK, FAIL, SKIP = "ok", "FAIL", "skip"


@dataclass(frozen=True)
class Check:
    name: str
    probe: Callable[[Config, "Api"], tuple[str, str]]  # -> (OK | FAIL | SKIP, one-line detail)
    fix: Callable[[Config], str]  # the command (or config change) that makes it pass


@dataclass(frozen=True)
class Outcome:
    name: str
    status: str
    detail: str
    fix: str

    def as_dict(self) -> dict:
        return {"name": self.name, "status": self.status, "detail": self.detail, "fix": self.fix}


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class Api:
    """GET/POST JSON against the Google API roots, authorized with application default credentials (or
    anonymous against a loopback fake)."""

    def __init__(self, session=None, endpoint: str | None = None):
        endpoint = os.environ.get(ENDPOINT_ENV, "") if endpoint is None else endpoint
        if endpoint and not re.fullmatch(r"http://(127\.0\.0\.1|localhost):[0-9]{1,5}", endpoint):
            raise ConfigError(f"{ENDPOINT_ENV} = {endpoint!r}: only a loopback http://127.0.0.1:PORT is accepted")
        self.roots = {k: endpoint for k in ROOTS} if endpoint else dict(ROOTS)
        if session is None:
            if endpoint:
                import requests

                session = requests.Session()
            else:
                import google.auth
                from google.auth.transport.requests import AuthorizedSession

                credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
                session = AuthorizedSession(credentials)
        self.session = session

    def call(self, method: str, api: str, path: str, body: dict | None = None) -> dict:
        r = self.session.request(method, self.roots[api] + path, json=body, timeout=30)
        if r.status_code >= 400:
            try:
                message = r.json()["error"]["message"]
            except Exception:
                message = r.text[:200]
            raise ApiError(r.status_code, message)
        return r.json() if r.content else {}


# ----------------------------------------------------------------------------------------------------
# The probes
# ----------------------------------------------------------------------------------------------------


def _api_enabled(service: str):
    def probe(config: Config, api: Api) -> tuple[str, str]:
        name = f"{service}.googleapis.com"
        state = api.call("GET", "serviceusage", f"/v1/projects/{config.fleet.project}/services/{name}").get("state")
        return (OK, f"{name} enabled") if state == "ENABLED" else (FAIL, f"{name} is {state or 'not enabled'}")

    return probe


def _network_path(config: Config) -> str:
    network = config.fleet.network
    return network if "/" in network else f"projects/{config.fleet.project}/global/networks/{network}"


def probe_network(config: Config, api: Api) -> tuple[str, str]:
    try:
        api.call("GET", "compute", f"/compute/v1/{_network_path(config)}")
    except ApiError as e:
        if e.status == 404:
            return FAIL, f"network {config.fleet.network!r} does not exist"
        raise
    return OK, f"network {config.fleet.network!r} exists"


def need_per_zone(config: Config) -> dict[str, int]:
    """Zone -> quota units the fleet needs there (workers x the type's units)."""
    units = accelerators.quota_units(config.fleet.accelerator_type)
    return {zone: n * units for zone, n in sorted(Counter(w.zone for w in config.fleet.workers).items())}


def quota_id(config: Config) -> str | None:
    ids = QUOTA_IDS.get(accelerators.family(config.fleet.accelerator_type))
    return None if ids is None else ids[0 if config.fleet.spot else 1]


def zone_limit(info: dict, zone: str) -> int | None:
    """A QuotaInfo's value for `zone`: its own dimension if listed, else the default (no dimensions)."""
    default = None
    for d in info.get("dimensionsInfos", []):
        dims = d.get("dimensions") or {}
        value = int(d.get("details", {}).get("value", 0))
        if dims.get("zone") == zone:
            return value
        if not dims:
            default = value
    return default


def _quota(zone: str):
    def probe(config: Config, api: Api) -> tuple[str, str]:
        if config.fleet.mode == "gce":  # Compute Engine's TPU quotas are not the TPU API's quota ids below
            return SKIP, f"gce mode: Compute Engine's TPU quota in {zone} is not checked (see its Quotas page)"
        qid = quota_id(config)
        if qid is None:
            return SKIP, f"no per-zone quota id known for {config.fleet.accelerator_type}: not checked"
        path = f"/v1/projects/{config.fleet.project}/locations/global/services/tpu.googleapis.com/quotaInfos/{qid}"
        limit = zone_limit(api.call("GET", "cloudquotas", path), zone)
        need = need_per_zone(config)[zone]
        if limit is None or limit < need:
            return FAIL, f"{qid} in {zone}: limit {limit or 0} < {need} the fleet needs"
        return OK, f"{qid} in {zone}: limit {limit} >= {need} needed"

    return probe


def probe_act_as(config: Config, api: Api) -> tuple[str, str]:
    email = config.fleet.service_account_email
    try:
        got = api.call(
            "POST",
            "iam",
            f"/v1/projects/{config.fleet.project}/serviceAccounts/{email}:testIamPermissions",
            {"permissions": ["iam.serviceAccounts.actAs"]},
        )
    except ApiError as e:
        if e.status == 404:
            return SKIP, f"{email} does not exist yet (the base stack creates it): run preflight again after it"
        raise
    if "iam.serviceAccounts.actAs" in got.get("permissions", []):
        return OK, f"you may act as {email}"
    return FAIL, f"you lack iam.serviceAccounts.actAs on {email} (creating a TPU that runs as it needs it)"


def probe_runtime(config: Config, api: Api) -> tuple[str, str]:
    fleet = config.fleet
    if fleet.mode == "gce":  # an instance boots fleet.boot_image: no TPU runtime version is sent
        if not fleet.boot_image:
            return FAIL, "gce mode boots fleet.boot_image, which is not set (runtime_version is not used)"
        return SKIP, f"gce mode boots {fleet.boot_image}: runtime_version is not used, the image is not checked"
    fits = accelerators.runtimes(fleet.accelerator_type)
    if fleet.runtime_version in fits:
        return OK, f"{fleet.runtime_version} fits {fleet.accelerator_type}"
    return FAIL, f"{fleet.accelerator_type} needs runtime_version {' or '.join(fits)}, not {fleet.runtime_version}"


def checks(config: Config) -> list[Check]:
    p, fleet = config.fleet.project, config.fleet
    out = [
        Check(f"api {s}", _api_enabled(s), lambda c, s=s: f"gcloud services enable {s}.googleapis.com --project {p}")
        for s in SERVICES
    ]
    out.append(
        Check(
            "network",
            probe_network,
            lambda c: f"gcloud compute networks create {fleet.network} --subnet-mode=auto --project {p}",
        )
    )
    for zone, need in need_per_zone(config).items():
        out.append(
            Check(
                f"quota {zone}",
                _quota(zone),
                lambda c, zone=zone, need=need: (
                    f"gcloud beta quotas preferences create --service=tpu.googleapis.com --quota-id={quota_id(c)} "
                    f"--preferred-value={need} --dimensions=zone={zone} --project={p} --email=YOU@example.com"
                ),
            )
        )
    out.append(
        Check(
            "act as workers",
            probe_act_as,
            lambda c: (
                f"gcloud iam service-accounts add-iam-policy-binding {fleet.service_account_email} "
                f"--member=user:YOU@example.com --role=roles/iam.serviceAccountUser --project {p}"
            ),
        )
    )
    out.append(
        Check(
            "runtime",
            probe_runtime,
            lambda c: (
                "set fleet.boot_image to a TPU VM image for Compute Engine in fleet.toml (docs/infrastructure.md)"
                if fleet.mode == "gce"
                else f'set fleet.runtime_version = "{accelerators.runtimes(fleet.accelerator_type)[0]}" in fleet.toml'
            ),
        )
    )
    return out


def run(config: Config, api: Api | None = None) -> list[Outcome]:
    """Every check, in order; an API that cannot be asked (no permission to read it, a network error) is a
    FAIL naming the error, never a traceback."""
    api = api or Api()
    out = []
    for check in checks(config):
        try:
            status, detail = check.probe(config, api)
        except ApiError as e:
            status, detail = FAIL, f"cannot check: {e}"
        except OSError as e:  # requests' connection errors are OSErrors
            status, detail = FAIL, f"cannot check: {type(e).__name__}: {e}"
        out.append(Outcome(check.name, status, detail, check.fix(config) if status == FAIL else ""))
    return out


def failed(outcomes: list[Outcome]) -> list[Outcome]:
    return [o for o in outcomes if o.status == FAIL]


def lines(outcomes: list[Outcome]) -> list[str]:
    """One line a check (and, under a failure, the command that fixes it)."""
    out = []
    for o in outcomes:
        out.append(f"{o.status:4}  {o.name:22} {o.detail}")
        if o.fix:
            out.append(f"      {'':22} fix: {o.fix}")
    return out
