"""fleet.toml -> frozen, typed configuration: the one source of desired state (README, "The cloud path"; every key in fleet.example.toml).

Every key is declared once in SCHEMA below with its type, default and what is allowed ([job]'s keys come from
the option table, actfleet.job_options.TABLE). Loading checks
every value and fails with one line naming the file, the key, the value and what is allowed, e.g.

    fleet.toml: fleet.mode = "spot": must be one of "queued", "vm", "gce"

Nothing else in actfleet reads the TOML; everything else takes a `Config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from actfleet import accelerators, endpoints, job_options
from actfleet import sites as site_names
from actfleet.errors import ConfigError
from actfleet.job_options import KEYS, JobOptions

CONFIG_ENV = "ACTFLEET_CONFIG"
TPU_ENDPOINT_ENV = "ACTFLEET_TPU_ENDPOINT"
COMPUTE_ENDPOINT_ENV = "ACTFLEET_COMPUTE_ENDPOINT"  # the Compute Engine API, for mode = "gce"
DEFAULT_CONFIG_NAME = "fleet.toml"

WORKER_NAME_RE = re.compile(r"^tpu-(?P<region>[a-z]+-[a-z]+[0-9]+)-(?P<letter>[a-z])-(?P<index>[0-9]+)$")


# ----------------------------------------------------------------------------------------------------
# Typed configuration objects (frozen: pass them around freely, change them with dataclasses.replace)
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Worker:
    """One desired TPU worker. `name` is also its queued-resource id and node id."""

    name: str
    zone: str
    index: int

    @staticmethod
    def make(region: str, zone: str, index: int) -> "Worker":
        return Worker(name=f"tpu-{region}-{zone_letter(zone)}-{index}", zone=zone, index=index)


@dataclass(frozen=True)
class FleetConfig:
    id: str
    project: str
    region: str
    workers: tuple[Worker, ...]
    accelerator_type: str
    runtime_version: str
    mode: str
    spot: bool
    network: str
    subnetwork: str
    service_account: str
    tpu_endpoint: str
    compute_endpoint: str = ""  # mode = "gce": the Compute Engine API endpoint ("" = Google's)
    # Off by default: workers boot from the release in the bucket and need only Google APIs, which a subnet
    # with Private Google Access reaches without an external IP (docs/infrastructure.md, "Network").
    external_ips: bool = False
    # gce mode: the boot image of the instances (an image, family or path; docs/infrastructure.md "gce").
    boot_image: str = ""

    @property
    def zones(self) -> tuple[str, ...]:
        return tuple(sorted({w.zone for w in self.workers}))

    @property
    def labels(self) -> dict[str, str]:
        """Labels every fleet resource carries; reconcile treats labelled-but-undesired ones as orphans."""
        return {"actfleet-fleet": self.id, "managed-by": "actfleet"}

    @property
    def service_account_email(self) -> str:
        return f"{self.service_account}@{self.project}.iam.gserviceaccount.com"

    def endpoint(self) -> str:
        """The TPU API endpoint: ACTFLEET_TPU_ENDPOINT wins over config; empty means Google's. ConfigError for
        an environment value that is neither Google's nor loopback (the config's was checked at load)."""
        env = os.environ.get(TPU_ENDPOINT_ENV, "")
        return endpoints.check_endpoint(env, f"${TPU_ENDPOINT_ENV}") if env else self.tpu_endpoint

    def compute_endpoint_url(self) -> str:
        """The Compute Engine API endpoint (mode = "gce"): ACTFLEET_COMPUTE_ENDPOINT wins over config; empty
        means Google's. Checked like the TPU endpoint: credentials go only to Google's hosts or loopback."""
        env = os.environ.get(COMPUTE_ENDPOINT_ENV, "")
        return endpoints.check_endpoint(env, f"${COMPUTE_ENDPOINT_ENV}") if env else self.compute_endpoint


@dataclass(frozen=True)
class RepoConfig:
    url: str
    commit: str


@dataclass(frozen=True)
class StorageConfig:
    bucket: str
    location: str
    soft_delete_days: int
    force_destroy: bool


@dataclass(frozen=True)
class StateConfig:
    backend: str  # "local" | "gcs"
    bucket: str
    prefix: str
    path: str


@dataclass(frozen=True)
class JobConfig:
    name: str
    store: str
    input: str
    unit_rows: int
    lease_seconds: int
    options: JobOptions  # what the job pins in job.json; its sites fully expanded, e.g. "blocks.6.hook_resid_post"
    positions: str | None = None  # [job] positions as written (None: implied by context_size), for prepare's flags


@dataclass(frozen=True)
class ReconcileConfig:
    provision_timeout_minutes: int
    on_provision_timeout: str  # "replace" | "report"
    watch_job: bool
    scale_to_zero_when_done: bool
    lock: str
    boot_timeout_minutes: float = 30.0  # READY with no worker record since the node was created: replace
    heartbeat_timeout_minutes: float = 15.0  # a READY node's worker record older than this: replace


@dataclass(frozen=True)
class RolloutConfig:
    """[rollout]: how a change to the workers' request reaches them (docs/operations.md, "Rollouts")."""

    max_unavailable: int | str = "10%"  # workers moved to a new release at a time: a count, or "N%"
    halt_after_failed_boots: int = 3  # new-release workers in a row that never start work halt it; 0 = off
    drain_timeout_minutes: float = 15.0  # a worker told to drain is replaced after this even if it has not
    # One apply's concurrent provisioner runs (terraform -parallelism): each create/delete-qr is a few TPU
    # API calls, so 50 keeps a 1,000-worker roll well inside the API's per-minute request quota.
    terraform_parallelism: int = 50
    # A pass's apply is interrupted (SIGINT: Terraform releases its state lock) after this; keep it under
    # the reconcile timer's TimeoutStartSec (45 min in docs/operations.md) by Terraform's stop time. 0 = none.
    apply_timeout_minutes: float = 35.0


@dataclass(frozen=True)
class Config:
    fleet: FleetConfig
    repo: RepoConfig
    storage: StorageConfig
    state: StateConfig
    job: JobConfig
    reconcile: ReconcileConfig
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    source: str = field(default="<memory>", compare=False)

    def replace(self, section: str, **changes: Any) -> "Config":
        """A copy with some keys of one section changed (used by CLI overrides such as --store)."""
        return dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **changes)})


# ----------------------------------------------------------------------------------------------------
# Schema: one line per key. A checker takes (value) and returns the normalised value or raises _Bad.
# ----------------------------------------------------------------------------------------------------


class _Bad(Exception):
    """Raised by a checker with the 'what is allowed' half of the message."""


REQUIRED = object()


@dataclass(frozen=True)
class Key:
    check: Callable[[Any], Any]
    default: Any = REQUIRED


def _string(pattern: str | None = None, allowed: str = "", empty_ok: bool = False):
    rx = re.compile(pattern) if pattern else None

    def check(v):
        if not isinstance(v, str):
            raise _Bad("must be a string" + (f" ({allowed})" if allowed else ""))
        if v == "" and empty_ok:
            return v
        if rx and not rx.fullmatch(v):
            raise _Bad(f"must be {allowed}")
        return v

    return check


def _choice(*choices: str):
    def check(v):
        if v not in choices:
            raise _Bad("must be one of " + ", ".join(f'"{c}"' for c in choices))
        return v

    return check


def _int(lo: int | None = None, hi: int | None = None):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, int):
            raise _Bad("must be an integer" + _range(lo, hi))
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise _Bad("must be an integer" + _range(lo, hi))
        return v

    return check


def _minutes(v):
    """Minutes, fractional allowed; 0 turns the rule off."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 100000 or v != v:
        raise _Bad("must be a number of minutes from 0 (off) to 100000, fractions allowed (e.g. 0.5)")
    return float(v)


def _count_or_percent(v):
    if isinstance(v, int) and not isinstance(v, bool) and v >= 1:
        return v
    if isinstance(v, str) and re.fullmatch(r"([1-9][0-9]?|100)%", v):
        return v
    raise _Bad('must be a count >= 1 or a percentage "1%" to "100%"')


def _range(lo, hi) -> str:
    if lo is not None and hi is not None:
        return f" from {lo} to {hi}"
    if lo is not None:
        return f" >= {lo}"
    if hi is not None:
        return f" <= {hi}"
    return ""


def _bool(v):
    if not isinstance(v, bool):
        raise _Bad("must be true or false")
    return v


def _zones(v):
    if not isinstance(v, dict) or not v:
        raise _Bad('must be a table of zone = worker count, e.g. { "us-central1-a" = 4 }')
    out = {}
    for zone, count in v.items():
        if not re.fullmatch(r"[a-z]+-[a-z]+[0-9]+-[a-z]", zone):
            raise _Bad(f'has zone "{zone}": zone names look like "us-central1-a"')
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= 10000:
            raise _Bad(f"has {zone} = {count!r}: worker counts must be integers from 0 to 10000")
        out[zone] = count
    return out


def _worker_names(v):
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise _Bad('must be a list of worker names like "tpu-us-central1-a-0"')
    for name in v:
        if not WORKER_NAME_RE.fullmatch(name):
            raise _Bad(f'has "{name}": worker names must look like "tpu-us-central1-a-0"')
    if len(set(v)) != len(v):
        raise _Bad("must not repeat a worker name")
    return v


def _sites(v):
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not v or not all(isinstance(x, str) for x in v):
        raise _Bad(
            "must be a non-empty list of site kinds (" + ", ".join(site_names.KINDS) + ") or names "
            'like "blocks.6.hook_resid_post"'
        )
    for s in v:
        if s not in site_names.KINDS and not site_names.is_name(s, every_layer_ok=False):
            raise _Bad(
                f'has "{s}": sites are kinds ('
                + ", ".join(site_names.KINDS)
                + ') or names like "blocks.6.hook_resid_post", "hook_embed"'
            )
    return v


def _layers(v):
    if v == "all":
        return v
    if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v):
        raise _Bad('must be a list of layer indices >= 0 (e.g. [6, 12]) or "all"')
    return sorted(set(v))


def _tpu_endpoint(v):
    # Google's API hosts or loopback only: an https endpoint is sent the operator's credentials (actfleet.endpoints).
    if not isinstance(v, str):
        raise _Bad(f"must be a string ({endpoints.ALLOWED})")
    problem = endpoints.endpoint_problem(v)
    if problem is not None:
        raise _Bad(problem)
    return v


def bucket_name_problem(name: str) -> str | None:
    """Why GCS would refuse `name` as a bucket name, or None ("Bucket naming rules",
    https://cloud.google.com/storage/docs/buckets#naming): checked here so a typo fails at load, not at apply."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]*[a-z0-9]", name):
        return "a GCS bucket name: a-z, 0-9, -, _ and ., starting and ending with a letter or digit"
    if not 3 <= len(name) <= (222 if "." in name else 63):
        return "a GCS bucket name: 3-63 characters (up to 222 with dots)"
    if any(not 1 <= len(part) <= 63 for part in name.split(".")):
        return "a GCS bucket name: each dot-separated part 1-63 characters"
    if re.fullmatch(r"[0-9]{1,3}(\.[0-9]{1,3}){3}", name):
        return "a GCS bucket name: not an IP address"
    if name.startswith("goog") or "google" in name or "g00gle" in name:
        return 'a GCS bucket name: must not start with "goog" or contain "google"'
    return None


def _bucket(empty_ok: bool = False):
    def check(v):
        if not isinstance(v, str):
            raise _Bad("must be a string (a GCS bucket name)")
        if v == "" and empty_ok:
            return v
        problem = bucket_name_problem(v)
        if problem:
            raise _Bad(f"must be {problem}")
        return v

    return check


def _gs_url(v: str) -> str:
    """A gs:// URL's checks at load: parse_gs's (a bucket, no "..") and GCS's bucket naming rules."""
    from actfleet.errors import InputError
    from actfleet.store import parse_gs

    try:
        bucket, _ = parse_gs(v)
    except InputError as e:
        raise _Bad(str(e).partition(": ")[2]) from None
    problem = bucket_name_problem(bucket)
    if problem:
        raise _Bad(f'has bucket "{bucket}": must be {problem}')
    return v


def _store_url(v):
    if not isinstance(v, str) or not v:
        raise _Bad('must be a path, "file://..." or "gs://bucket/prefix"')
    if "://" in v and not (v.startswith("file://") or v.startswith("gs://")):
        raise _Bad('must be a path, "file://..." or "gs://bucket/prefix"')
    if v.startswith("gs://"):
        _gs_url(v)
    return v


def _state_prefix(v):
    """The GCS state prefix, normalised once: no leading, trailing or doubled "/" (Terraform's backend would
    otherwise store under "x//fleet" while reconcile reads "x/fleet")."""
    if not isinstance(v, str):
        raise _Bad("must be a string (an object prefix)")
    norm = v.strip("/")
    if v and not norm:
        raise _Bad('must be an object prefix like "actfleet/acts" (or left out), not only "/"')
    parts = norm.split("/") if norm else []
    if any(p in ("", ".", "..") for p in parts) or not re.fullmatch(r"[A-Za-z0-9_./-]*", norm):
        raise _Bad('must be an object prefix like "actfleet/acts": A-Z, a-z, 0-9, _ . - and single "/" between parts')
    return norm


def _lock_url(v):
    """reconcile.lock: a path, or a gs:// URL (of the lock object, or of a bucket/folder: then its
    reconcile.lock object; see infra/lock.py)."""
    if not isinstance(v, str):
        raise _Bad("must be a path or a gs:// URL")
    if v == "":
        return v
    if not re.fullmatch(r"\S+", v):
        raise _Bad("must be a path or a gs:// URL (no spaces)")
    if "://" in v and not v.startswith("gs://"):
        raise _Bad('must be a path or a gs:// URL like "gs://my-state/locks/fleet.lock"')
    if v.startswith("gs://"):
        _gs_url(v)
    return v


# One fleet.toml's ceiling on workers. Each reconcile pass observes every worker and plans them in one
# Terraform state; every worker lists the job's leases and done records between units. Past a few
# thousand both stop being quick (and TPU quotas end well before), so a typo like 40000 is refused.
DEFAULT_MAX_WORKERS = 1000
MAX_WORKERS_CEILING = 10000


LABEL = r"[a-z][a-z0-9-]{0,29}"
SCHEMA: dict[str, dict[str, Key]] = {
    "fleet": {
        "id": Key(_string(LABEL, "a lowercase label: a letter then up to 29 of a-z, 0-9, -")),
        "project": Key(_string(r"[a-z][a-z0-9-]{4,28}[a-z0-9]", "a GCP project id (6-30 of a-z, 0-9, -)")),
        "region": Key(_string(r"[a-z]+-[a-z]+[0-9]+", 'a region like "us-central1"')),
        "zones": Key(_zones, None),
        "workers": Key(_worker_names, None),
        "accelerator_type": Key(
            _string(r"(v[0-9]+[a-z]*|tpu7x)-[0-9]+", 'an accelerator type like "v5litepod-8"'), "v5litepod-8"
        ),
        "runtime_version": Key(
            _string(r"[a-z0-9][a-z0-9.-]*", 'a TPU runtime like "v2-alpha-tpuv5-lite"'), "v2-alpha-tpuv5-lite"
        ),
        "mode": Key(_choice("queued", "vm", "gce"), "queued"),
        "spot": Key(_bool, True),
        "network": Key(_string(r"[a-zA-Z0-9/_.-]+", "a VPC network name or path"), "default"),
        "subnetwork": Key(_string(r"[a-zA-Z0-9/_.-]+", "a subnetwork name or path", empty_ok=True), ""),
        "service_account": Key(
            _string(r"[a-z][a-z0-9-]{4,28}[a-z0-9]", "a service account id (6-30 of a-z, 0-9, -)", empty_ok=True), ""
        ),
        "tpu_endpoint": Key(_tpu_endpoint, ""),
        "compute_endpoint": Key(_tpu_endpoint, ""),  # same allow-list (actfleet.endpoints)
        "external_ips": Key(_bool, False),
        "boot_image": Key(
            _string(r"[a-zA-Z0-9/_.:-]+", "a Compute Engine image, family or image path", empty_ok=True), ""
        ),
        "max_workers": Key(_int(1, MAX_WORKERS_CEILING), DEFAULT_MAX_WORKERS),
    },
    "repo": {
        "url": Key(_string(r"(https://|file://|/)[^\s]+", "an https:// or file:// URL, or an absolute path")),
        "commit": Key(
            _string(r"[0-9a-f]{40}", "a full 40-hex commit sha (never a branch or tag: VMs must run a pinned commit)")
        ),
    },
    "storage": {
        "bucket": Key(_bucket()),
        "location": Key(_string(r"[A-Za-z0-9-]+", 'a GCS location like "US-CENTRAL1"', empty_ok=True), ""),
        "soft_delete_days": Key(_int(0, 90), 0),
        "force_destroy": Key(_bool, False),
    },
    "state": {
        "backend": Key(_choice("local", "gcs"), "local"),
        "bucket": Key(_bucket(empty_ok=True), ""),
        "prefix": Key(_state_prefix, ""),
        "path": Key(_string(r"[^\s]+", "a directory path"), ".actfleet/state"),
    },
    "job": {},  # generated from actfleet.job_options.TABLE below
    "reconcile": {
        "provision_timeout_minutes": Key(_int(1, 100000), 120),
        "on_provision_timeout": Key(_choice("report", "replace"), "report"),
        "watch_job": Key(_bool, False),
        "scale_to_zero_when_done": Key(_bool, False),
        "lock": Key(_lock_url, ""),
        "boot_timeout_minutes": Key(_minutes, 30.0),
        "heartbeat_timeout_minutes": Key(_minutes, 15.0),
    },
    "rollout": {
        "max_unavailable": Key(_count_or_percent, "10%"),
        "halt_after_failed_boots": Key(_int(0, 100000), 3),
        "drain_timeout_minutes": Key(_minutes, 15.0),
        "terraform_parallelism": Key(_int(1, 1000), 50),
        "apply_timeout_minutes": Key(_minutes, 35.0),
    },
}


def _option_key(o: job_options.Option) -> Key:
    """fleet.toml's [job] key for one row of the option table: the table's own check, so every bound reads the
    same here as on the command line and in job.json. Sites, layers and store have fleet.toml forms of their
    own (kinds with a layer list; a store URL)."""
    special = {"sites": Key(_sites, ["resid_post"]), "layers": Key(_layers, []), "store": Key(_store_url, "")}
    if o.name in special:
        return special[o.name]

    def check(v):
        try:
            return o.check(v)
        except job_options.BadValue as e:
            raise _Bad(str(e)) from None

    return Key(check, REQUIRED if o.required else o.default)


SCHEMA["job"] = {o.name: _option_key(o) for o in job_options.applying(job_options.TOML)}
REQUIRED_SECTIONS = ("fleet", "repo", "storage", "job")


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------


def resolve_path(path: str | os.PathLike | None) -> Path:
    """--config wins, then ACTFLEET_CONFIG, then ./fleet.toml."""
    if path:
        return Path(path)
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    return Path(DEFAULT_CONFIG_NAME)


def load(path: str | os.PathLike | None = None) -> Config:
    p = resolve_path(path)
    if not p.is_file():
        raise ConfigError(
            f"{p}: config file not found (pass --config, set {CONFIG_ENV}, or copy fleet.example.toml to fleet.toml)"
        )
    try:
        raw = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not valid TOML: the file is not UTF-8 text") from None
    cfg = parse(raw, source=str(p))
    # Relative local paths in the file mean "next to this file", so every command finds the same
    # Terraform state and lock whatever directory it is run from.
    if not Path(cfg.state.path).is_absolute():
        cfg = cfg.replace("state", path=str((p.parent / cfg.state.path).resolve()))
    lock = cfg.reconcile.lock
    if lock and "://" not in lock and not Path(lock).is_absolute():
        cfg = cfg.replace("reconcile", lock=str((p.parent / lock).resolve()))
    return cfg


def parse(raw: dict[str, Any], source: str = "<memory>") -> Config:
    """Validate a parsed TOML document and build the frozen Config."""

    def bad(key: str, value: Any, allowed: str) -> ConfigError:
        return ConfigError(f"{source}: {key} = {_show(value)}: {allowed}")

    for section in raw:
        if section not in SCHEMA:
            raise ConfigError(
                f"{source}: unknown section [{section}]{_suggest(section, SCHEMA)} (sections: {', '.join(SCHEMA)})"
            )
        if not isinstance(raw[section], dict):
            raise ConfigError(f"{source}: {section} must be a table [{section}]")
    for section in REQUIRED_SECTIONS:
        if section not in raw:
            raise ConfigError(f"{source}: missing section [{section}]")

    values: dict[str, dict[str, Any]] = {}
    for section, keys in SCHEMA.items():
        given = raw.get(section, {})
        for k in given:
            if k not in keys:
                raise ConfigError(
                    f"{source}: unknown key {section}.{k}{_suggest(k, keys)} (allowed: {', '.join(keys)})"
                )
        out = {}
        for k, spec in keys.items():
            if k in given:
                try:
                    out[k] = spec.check(given[k])
                except _Bad as e:
                    raise bad(f"{section}.{k}", given[k], str(e)) from None
            elif spec.default is REQUIRED:
                raise ConfigError(f"{source}: missing required key {section}.{k}")
            else:
                out[k] = spec.default
        values[section] = out

    f, st, j, s, rc = values["fleet"], values["state"], values["job"], values["storage"], values["reconcile"]

    # Cross-key rules.
    if (f["zones"] is None) == (f["workers"] is None):
        raise ConfigError(
            f"{source}: fleet: set exactly one of fleet.zones (workers per zone) or fleet.workers "
            f"(an explicit list of names)"
        )
    workers: list[Worker] = []
    if f["zones"] is not None:
        for zone, count in sorted(f["zones"].items()):
            if not zone.startswith(f["region"] + "-"):
                raise bad("fleet.zones", {zone: count}, f'zone "{zone}" is not in region "{f["region"]}"')
            workers += [Worker.make(f["region"], zone, i) for i in range(count)]
    else:
        for name in f["workers"]:
            m = WORKER_NAME_RE.fullmatch(name)
            if m["region"] != f["region"]:
                raise bad("fleet.workers", name, f'worker "{name}" is not in region "{f["region"]}"')
            workers.append(Worker(name=name, zone=f"{m['region']}-{m['letter']}", index=int(m["index"])))
    if len(workers) > f["max_workers"]:
        raise bad(
            "fleet.zones" if f["zones"] is not None else "fleet.workers",
            f["zones"] if f["zones"] is not None else f"{len(workers)} names",
            f"{len(workers)} workers is more than fleet.max_workers = {f['max_workers']} (raise fleet.max_workers, "
            f"up to {MAX_WORKERS_CEILING}, if you mean it)",
        )
    try:
        # Any whole slice of a known type: a multi-host slice runs as one worker (worker/multihost.py: every host
        # runs the startup script, joins jax.distributed from the TPU metadata, host 0 holds the lease).
        accelerators.hosts(f["accelerator_type"])
        if f["mode"] == "gce":  # one instance per worker: a single-host type with a known machine type
            accelerators.machine_type(f["accelerator_type"])
    except accelerators.UnknownAccelerator as e:
        raise bad("fleet.accelerator_type", f["accelerator_type"], str(e).split(": ", 1)[1]) from None
    if f["mode"] != "gce" and accelerators.family(f["accelerator_type"]) not in accelerators.TPU_API_FAMILIES:
        raise bad(
            "fleet.accelerator_type",
            f["accelerator_type"],
            f'the Cloud TPU API does not serve it (mode "{f["mode"]}"); use fleet.mode = "gce"',
        )
    hb = rc["heartbeat_timeout_minutes"] * 60
    if 0 < hb < j["lease_seconds"]:
        raise bad(
            "reconcile.heartbeat_timeout_minutes",
            rc["heartbeat_timeout_minutes"],
            f"must be 0 (off) or at least job.lease_seconds ({j['lease_seconds']} s): workers write "
            f"their record every third of it",
        )
    if st["backend"] == "gcs" and not st["bucket"]:
        raise ConfigError(f'{source}: state.bucket = "": required when state.backend = "gcs"')
    if s["soft_delete_days"] not in (0,) and s["soft_delete_days"] < 7:
        raise bad(
            "storage.soft_delete_days",
            s["soft_delete_days"],
            "must be 0 (soft delete off) or from 7 to 90 days (GCS's allowed retention)",
        )
    sites = site_names.expand(j["sites"], j["layers"], source)

    fleet = FleetConfig(
        id=f["id"],
        project=f["project"],
        region=f["region"],
        workers=tuple(workers),
        accelerator_type=f["accelerator_type"],
        runtime_version=f["runtime_version"],
        mode=f["mode"],
        spot=f["spot"],
        network=f["network"],
        subnetwork=f["subnetwork"],
        service_account=f["service_account"] or f"actfleet-{f['id']}"[:30].rstrip("-"),
        tpu_endpoint=f["tpu_endpoint"],
        compute_endpoint=f["compute_endpoint"],
        external_ips=f["external_ips"],
        boot_image=f["boot_image"],
    )
    return Config(
        fleet=fleet,
        repo=RepoConfig(**values["repo"]),
        storage=StorageConfig(
            bucket=s["bucket"],
            location=s["location"] or f["region"].upper(),
            soft_delete_days=s["soft_delete_days"],
            force_destroy=s["force_destroy"],
        ),
        state=StateConfig(
            backend=st["backend"], bucket=st["bucket"], prefix=st["prefix"] or f"actfleet/{f['id']}", path=st["path"]
        ),
        job=JobConfig(
            name=j["name"],
            store=j["store"] or f"gs://{s['bucket']}",
            input=j["input"],
            unit_rows=j["unit_rows"],
            lease_seconds=j["lease_seconds"],
            options=JobOptions(**{**{k: j[k] for k in KEYS}, "sites": sites}),
            positions=j["positions"],
        ),
        reconcile=ReconcileConfig(**rc),
        rollout=RolloutConfig(**values["rollout"]),
        source=source,
    )


def zone_letter(zone: str) -> str:
    return zone.rsplit("-", 1)[1]


def zone_of(name: str) -> str:
    """The zone a worker name says it is in ('tpu-us-central1-a-3' -> 'us-central1-a'); '' for other names."""
    m = WORKER_NAME_RE.fullmatch(name)
    return f"{m['region']}-{m['letter']}" if m else ""


def _show(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{ " + ", ".join(f'"{k}" = {_show(v)}' for k, v in value.items()) + " }"
    return repr(value)


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f' (did you mean "{close[0]}"?)' if close else ""
