"""The work queue protocol: a job's layout in the store, prepare, leases, commit and progress (docs/jobs.md).

Shared ground: the worker wing writes these records and the infra wing (reconcile, status) reads them, so
the protocol lives here, importing only shared ground. Every key of the layout below is built and parsed by
the helpers of this module; nothing else spells "done/" or a shard name. The shard *format* (header,
tensors) is worker/shards.py's; only the shards' names and keys are the protocol's.

Layout under `{store}/{job}/` (docs/jobs.md):

    job.json                          what the job is: input fingerprint and row count, extraction options,
                                      unit size and count. Written last by prepare: its presence means every
                                      unit record exists.
    prepare.json                      the same bytes, created-if-absent *first* by prepare: whoever creates it
                                      decides what the job is; a prepare that differs is refused before it
                                      writes any unit record.
    units/000042.json                 unit 42: rows [start, stop) of the input
    leases/000042                     who is working on unit 42 until when (create-if-absent, renewed by
                                      generation-matched replace, taken over when expired)
    done/000042                       unit 42 is done: its shards with sizes, sha256 and token counts, and
                                      the rows it skipped with their reasons. Created only if absent, after
                                      every shard is uploaded: a unit is done iff this record exists.
    shards/000042-0003.a2-5f1c9a2b.safetensors
                                      part 3 of unit 42 as written by attempt 2 (lease nonce 5f1c9a2b...).
                                      Each attempt writes only its own names, so an attempt that lost its
                                      lease can never overwrite another's; the done record lists the
                                      committing attempt's shards, and shards no done record lists are
                                      garbage (`verify --clean`).
    stats/000042.a2-5f1c9a2b.stats.safetensors
                                      the activation statistics of unit 42 as computed by attempt 2 (count,
                                      sums, sums of squares per site: worker/stats.py). Named per attempt like
                                      its shards; only the one the done record lists counts (committed_units).
    workers/{worker}.json             each worker's own heartbeat and counters (one writer each), for status

Every record is small JSON; `job_progress` reads only those, never shards.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

from actfleet.errors import ActfleetError, InputError
from actfleet.job_options import JobOptions
from actfleet.store import NotFound, PreconditionFailed, Store, join

FORMAT_VERSION = 1
log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------
# Keys
# ----------------------------------------------------------------------------------------------------


# The layout's names (relative to the job's root), each spelled once.
JOB_FILE = "job.json"
INTENT_FILE = "prepare.json"  # the job.json a prepare is writing units for (created first, if absent)
UNITS, LEASES, DONE, SHARDS, WORKERS = "units", "leases", "done", "shards", "workers"
STATS = "stats"


def job_key(job: str) -> str:
    return join(job, JOB_FILE)


def intent_key(job: str) -> str:
    return join(job, INTENT_FILE)


def unit_key(job: str, unit: int) -> str:
    return join(job, UNITS, f"{unit:06d}.json")


def lease_key(job: str, unit: int) -> str:
    return join(job, LEASES, f"{unit:06d}")


def done_key(job: str, unit: int) -> str:
    return join(job, DONE, f"{unit:06d}")


def shard_key(job: str, unit: int, part: int, attempt: str | None = None) -> str:
    return join(job, SHARDS, shard_name(unit, part, attempt))


def stats_key(job: str, unit: int, attempt: str | None = None) -> str:
    """A unit's statistics object as written by one attempt (its own name, like its shards): a unit re-done
    after a take-over writes another name, and only the object its done record lists is ever counted."""
    return join(job, STATS, f"{unit:06d}{'.' + attempt if attempt else ''}{STATS_SUFFIX}")


def job_stats(job: str, key: str) -> tuple[int, str | None] | None:
    """(unit, attempt or None) of a listed key, only if it is exactly stats_key(job, unit, attempt) (directly under
    the job's stats/, spelled as stats_key spells it): else None, a foreign object ("000042.stats.safetensors.bak",
    "42.stats.safetensors", a subfolder). The one parser of these names."""
    name = key.rpartition("/")[2]
    if not name.endswith(STATS_SUFFIX):
        return None
    stem, _, attempt = name[: -len(STATS_SUFFIX)].partition(".")
    if not (stem.isascii() and stem.isdigit()) or (attempt and not ATTEMPT_RE.fullmatch(attempt)):
        return None
    unit = int(stem)
    return (unit, attempt or None) if key == stats_key(job, unit, attempt or None) else None


def worker_key(job: str, worker: str) -> str:
    return join(job, WORKERS, f"{worker}.json")


def drain_key(job: str, worker: str) -> str:
    """A rollout's request that `worker` finish its unit and exit (reconcile writes it, removes it when it
    replaces the worker; the work loop reads it between units). Outside workers/: status lists those."""
    return join(job, "drain", worker)


def drain_requested(store: Store, job: str, worker: str) -> bool:
    """Whether reconcile asked `worker` to drain (one small read; a store error raises)."""
    try:
        store.read(drain_key(job, worker))
        return True
    except NotFound:
        return False


# Listing prefixes: store.list(done_prefix(job)) lists every done record of the job and nothing else (stores
# list by plain prefix: the trailing "/" keeps "done/" from matching a sibling like "done-old/").
def units_prefix(job: str) -> str:
    return join(job, UNITS) + "/"


def leases_prefix(job: str) -> str:
    return join(job, LEASES) + "/"


def done_prefix(job: str) -> str:
    return join(job, DONE) + "/"


def shards_prefix(job: str) -> str:
    return join(job, SHARDS) + "/"


def stats_prefix(job: str) -> str:
    return join(job, STATS) + "/"


def workers_prefix(job: str) -> str:
    return join(job, WORKERS) + "/"


def in_job(job: str, name: str) -> str:
    """The store key of `name`, a key relative to the job's root (as done records list shards)."""
    return join(job, name)


def job_relative(job: str, key: str) -> str:
    """The inverse of in_job: `key` relative to the job's root ("j/shards/x" -> "shards/x")."""
    root = join(job)
    prefix = root + "/" if root else ""
    if not key.startswith(prefix):
        raise ValueError(f"{key!r} is not a key of job {job!r}")
    return key[len(prefix) :]


def unit_of(key: str) -> int | None:
    """The unit of ".../units/000042.json", ".../leases/000042" or ".../done/000042": 42, only when the name is
    spelled exactly as unit_key/lease_key/done_key spell it. Anything else ("done/000042.old", "done/42",
    "done/sub/000042", a lease named like a unit record) is None: a foreign object, never a unit's record
    (docs/jobs.md, "Foreign objects"). The one parser of these names."""
    head, _, name = key.rpartition("/")
    folder = head.rpartition("/")[2]
    if folder == UNITS:
        if not name.endswith(".json"):
            return None
        name = name[: -len(".json")]
    elif folder not in (LEASES, DONE):
        return None
    if not (name.isascii() and name.isdigit()):
        return None
    unit = int(name)
    return unit if f"{unit:06d}" == name else None


_UNIT_KEY = {UNITS: unit_key, LEASES: lease_key, DONE: done_key}
_UNIT_PREFIX = {UNITS: units_prefix, LEASES: leases_prefix, DONE: done_prefix}


@dataclass
class UnitListing:
    """One folder's listing (units/, leases/ or done/), split by unit_of: `units` maps each unit to its key;
    `foreign` lists every other key found there (reported, never trusted or deleted)."""

    units: dict[int, str]
    foreign: list[str]


def list_units(store: Store, job: str, folder: str) -> UnitListing:
    """List `folder` (UNITS, LEASES or DONE) of `job`: a key counts for a unit only if it is exactly that
    unit's key of this job (so "j/done/leases/000001", nested under done/, is foreign too)."""
    units: dict[int, str] = {}
    foreign: list[str] = []
    for key in store.list(_UNIT_PREFIX[folder](job)):
        unit = unit_of(key)
        if unit is not None and key == _UNIT_KEY[folder](job, unit):
            units[unit] = key
        else:
            foreign.append(key)
    return UnitListing(units, foreign)


# Shard names: part 3 of unit 42 is "000042-0003.safetensors", and as written by a fleet attempt
# "000042-0003.a2-5f1c9a2b.safetensors" (the lease's attempt number and nonce: Lease.tag).
SHARD_SUFFIX = ".safetensors"
STATS_SUFFIX = ".stats.safetensors"  # a unit's statistics (worker/stats.py); never a shard (parse_shard_name)
ATTEMPT_RE = re.compile(r"a[0-9]+-[0-9a-f]{8}")


def shard_name(unit: int, part: int, attempt: str | None = None) -> str:
    """Deterministic in (unit, part) and, in a fleet job, the attempt that wrote it ("a2-5f1c9a2b": the
    lease's attempt number and nonce). An attempt only ever writes its own names, so an attempt that lost
    its lease (stalled, then resumed) can never overwrite the shards another attempt committed; the done
    record names the committing attempt's shards and the rest are garbage for `verify --clean`."""
    return f"{unit:06d}-{part:04d}{'.' + attempt if attempt else ''}{SHARD_SUFFIX}"


def parse_shard_name(key: str) -> tuple[int, int, str | None] | None:
    """(unit, part, attempt or None) of a shard name made by shard_name, or of a key ending in one; None
    for anything else (a temporary upload, a stray file)."""
    name = key.rsplit("/", 1)[-1]
    if not name.endswith(SHARD_SUFFIX) or name.endswith(STATS_SUFFIX):
        return None
    stem, _, attempt = name[: -len(SHARD_SUFFIX)].partition(".")
    unit, _, part = stem.partition("-")
    if not (unit.isascii() and unit.isdigit() and part.isascii() and part.isdigit()):
        return None
    if attempt and not ATTEMPT_RE.fullmatch(attempt):
        return None
    parsed = int(unit), int(part), attempt or None
    return parsed if shard_name(*parsed) == name else None  # exactly as shard_name spells it ("1-1..." is not)


def job_shard(job: str, key: str) -> tuple[int, int, str | None] | None:
    """parse_shard_name of a listed key, only if it is exactly that shard's key in this job (directly under
    its shards/, not in a subfolder): else None, a foreign object."""
    parsed = parse_shard_name(key)
    return parsed if parsed is not None and key == shard_key(job, *parsed) else None


def shard_unit_part(key: str) -> tuple[int, int] | None:
    """(unit, part) of a shard name made by shard_name, or of a key ending in one; None for anything else."""
    parsed = parse_shard_name(key)
    return parsed[:2] if parsed else None


# Worker ids name lease holders, worker records (workers/{id}.json) and, on a fleet, the TPU node: the TPU
# node name rules (lowercase letters, digits and hyphens, starting with a letter, at most 63 characters).
WORKER_ID_RE = re.compile(r"[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?")


def check_worker_id(worker: str) -> str:
    if not WORKER_ID_RE.fullmatch(worker):
        raise InputError(
            f"worker id {worker!r}: use lowercase letters, digits and hyphens, starting with a "
            f"letter and not ending with a hyphen, at most 63 characters (as TPU node names)"
        )
    return worker


def default_worker_id() -> str:
    """host-pid, folded into the worker id rules (hostnames may have dots and capitals)."""
    host = re.sub(r"[^a-z0-9-]+", "-", socket.gethostname().lower()).strip("-") or "worker"
    if not host[0].isalpha():
        host = "w-" + host
    return f"{host[:50].rstrip('-')}-{os.getpid()}"


def _dump(obj: Any) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=True).encode()


def _load(data: bytes, what: str) -> dict:
    try:
        obj = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ActfleetError(f"{what}: not valid JSON (corrupt record)") from None
    if not isinstance(obj, dict):
        raise ActfleetError(f"{what}: not a JSON object (corrupt record)")
    return obj


def _parsed(data: bytes) -> Any:
    """JSON's value, or None for bytes that are not JSON (a torn or foreign record)."""
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def _read_if_present(store: Store, key: str) -> tuple[bytes, int] | None:
    try:
        return store.read(key)
    except NotFound:
        return None


# ----------------------------------------------------------------------------------------------------
# The job and its units
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobSpec:
    """job.json: everything a worker needs to process any unit, and the fingerprint that pins the input."""

    job: str
    input: str  # the dataset path or URL workers read
    fingerprint: str  # sha256 of the input's bytes
    rows: int  # input rows (after expansion, e.g. ARC augmentations): sample ids 0..rows-1
    unit_rows: int
    units: int
    options: JobOptions  # model, revision, reading and extraction options
    input_generation: int | None = None  # the GCS generation of a gs:// input that prepare hashed
    model_pin: dict | None = None  # the model's resolved revision and file hashes (worker/pinning.py ModelPin)
    # The input's data files in row order, each with rows, sha256 and seek index (worker/sources.py DataFile
    # JSON): a unit's rows map to file + row range. None in jobs prepared before multi-file inputs (one file).
    input_files: list | None = None
    format_version: int = FORMAT_VERSION

    @property
    def model_sha256(self) -> str:
        return self.model_pin["sha256"] if self.model_pin else ""

    def unit_range(self, unit: int) -> tuple[int, int]:
        start = unit * self.unit_rows
        return start, min(start + self.unit_rows, self.rows)

    def to_json(self) -> bytes:
        return _dump({**asdict(self), "options": self.options.to_json()})

    def input_rows(self) -> int | None:
        """The samples the pinned input files hold (sample_count of their rows), or None for a job.json from
        before input files were recorded (then only its own arithmetic can be checked)."""
        if self.input_files is None:
            return None
        return sample_count(self.options, (f["rows"] for f in self.input_files))

    def totals_problem(self) -> str | None:
        """Why rows and units contradict the pinned input files or each other, or None: the totals are
        derived, never taken on job.json's word (an edited rows + units would hide units from everyone)."""
        derived = self.input_rows()
        if derived is not None and derived != self.rows:
            return (
                f"rows={self.rows}, but its {len(self.input_files)} pinned input files hold {derived} rows"
                f"{f' (max_rows {self.options.max_rows})' if self.options.max_rows else ''}"
            )
        units = -(-self.rows // self.unit_rows)
        if self.units != units:
            return f"units={self.units} for rows={self.rows} and unit_rows={self.unit_rows}; that is {units} units"
        return None

    @staticmethod
    def from_json(data: bytes, what: str = "job.json", check: bool = True) -> "JobSpec":
        """Parse job.json; InputError naming the field for wrong types and, with `check`, for totals that
        contradict the pinned input files (totals_problem). `verify` parses with check=False to report it."""
        try:
            d = _load(data, what)
        except ActfleetError as e:
            raise InputError(str(e)) from None
        try:
            if "options" in d:
                d["options"] = JobOptions.from_json(d["options"], "options")
        except (TypeError, ValueError) as e:
            raise InputError(f"{what}: {e} (corrupt record)") from None
        try:
            spec = JobSpec(**d)
        except TypeError as e:
            raise InputError(f"{what}: unexpected fields ({e}) (corrupt record)") from None
        bad = _spec_wrong_types(spec)
        if bad:
            raise InputError(f"{what}: field {bad} has the wrong type or value (corrupt record)")
        problem = spec.totals_problem() if check else None
        if problem:
            raise InputError(f"{what}: {problem} (corrupt record; `actfleet verify` lists what else disagrees)")
        return spec


def sample_count(options: JobOptions, file_rows: Iterable[int]) -> int:
    """A job's samples: its input files' rows x samples per row, capped by max_rows (what prepare records as
    job.json's rows, and what verify derives them from)."""
    total = sum(file_rows) * options.samples_per_row()
    return min(total, options.max_rows) if options.max_rows else total


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _spec_wrong_types(spec: JobSpec) -> str | None:
    """The first field of a parsed job.json that is not of the type (and range) the format says, or None."""
    for name in ("job", "input", "fingerprint"):
        if not isinstance(getattr(spec, name), str):
            return name
    if not isinstance(spec.options, JobOptions):
        return "options"
    for name, lo in (("rows", 0), ("unit_rows", 1), ("units", 0), ("format_version", 0)):
        if not _is_int(getattr(spec, name)) or getattr(spec, name) < lo:
            return name
    if spec.input_generation is not None and not _is_int(spec.input_generation):
        return "input_generation"
    if spec.model_pin is not None and not (
        isinstance(spec.model_pin, dict) and isinstance(spec.model_pin.get("sha256"), str)
    ):
        return "model_pin"
    if spec.input_files is not None and not (
        isinstance(spec.input_files, list)
        and all(
            isinstance(f, dict)
            and isinstance(f.get("path"), str)
            and isinstance(f.get("sha256"), str)
            and _is_int(f.get("rows"))
            and f["rows"] >= 0
            for f in spec.input_files
        )
    ):
        return "input_files"
    return None


def read_job(store: Store, job: str, check: bool = True) -> JobSpec:
    try:
        data, _ = store.read(job_key(job))
    except NotFound:
        raise InputError(f"job {job!r} is not prepared in {store.url} (run `actfleet prepare` first)") from None
    return JobSpec.from_json(data, f"{store.url}/{job_key(job)}", check=check)


def prepare(
    store: Store,
    job: str,
    *,
    input: str,
    fingerprint: str,
    rows: int,
    unit_rows: int,
    options: JobOptions | dict,
    input_generation: int | None = None,
    model_pin: dict | None = None,
    input_files: list | None = None,
) -> tuple[JobSpec, bool]:
    """Create the job's units and job.json; (spec, created). Idempotent for the same input and options:
    preparing again (or concurrently) changes nothing. A different input or options is refused, never mixed.
    `options` may also be given in job.json's JSON form (missing keys take JobOptions' defaults)."""
    if rows < 0 or unit_rows < 1:
        raise InputError(f"prepare: rows={rows}, unit_rows={unit_rows}: need rows >= 0 and unit_rows >= 1")
    if not isinstance(options, JobOptions):
        try:
            options = JobOptions.from_json(options)
        except (TypeError, ValueError) as e:
            raise InputError(f"prepare: {e}") from None
    spec = JobSpec(
        job=job,
        input=input,
        fingerprint=fingerprint,
        rows=rows,
        unit_rows=unit_rows,
        units=-(-rows // unit_rows),
        options=options,
        input_generation=input_generation,
        model_pin=model_pin,
        input_files=input_files,
    )
    problem = spec.totals_problem()
    if problem:
        raise InputError(f"prepare: {problem}")
    existing = _existing_job(store, job)
    if existing is not None:
        _refuse_if_different(store, existing, spec)
        return existing, False
    # The intent first: whoever creates it fixes what the job is, and a prepare that differs is refused
    # before it writes a single unit record (two concurrent prepares with other options never mix records).
    try:
        store.create(intent_key(job), spec.to_json())
    except PreconditionFailed:
        found = _read_if_present(store, intent_key(job))
        if found is not None:
            _refuse_if_different(store, JobSpec.from_json(found[0], f"{store.url}/{intent_key(job)}"), spec)
    # Units next, job.json last: a crash in between leaves no job.json, and the rerun completes it.
    for unit in range(spec.units):
        record = unit_record(spec, unit)
        try:
            store.create(unit_key(job, unit), record)
        except PreconditionFailed:  # an earlier or concurrent prepare of this same intent wrote it
            found = _read_if_present(store, unit_key(job, unit))
            if found is not None and not unit_record_matches(spec, unit, found[0]):
                raise InputError(
                    f"prepare: {store.url}/{unit_key(job, unit)} exists and says {found[0].decode(errors='replace')}"
                    f" (left by another prepare?), not {record.decode()}: refusing to mix; use a new --job name"
                ) from None
    try:
        store.create(job_key(job), spec.to_json())
    except PreconditionFailed:
        existing = _existing_job(store, job)
        _refuse_if_different(store, existing, spec)
        return existing, False
    return spec, True


def unit_record(spec: JobSpec, unit: int) -> bytes:
    """units/{unit}.json: the unit's row range, as job.json's totals say (verify compares them byte for byte)."""
    start, stop = spec.unit_range(unit)
    return _dump({"unit": unit, "start": start, "stop": stop})


def unit_record_matches(spec: JobSpec, unit: int, data: bytes) -> bool:
    """Whether a unit record's bytes say what unit_record says (as JSON: key order and spacing aside)."""
    return _parsed(data) == json.loads(unit_record(spec, unit))


def _existing_job(store: Store, job: str) -> JobSpec | None:
    found = _read_if_present(store, job_key(job))
    return None if found is None else JobSpec.from_json(found[0], f"{store.url}/{job_key(job)}")


def _refuse_if_different(store: Store, existing: JobSpec, wanted: JobSpec) -> None:
    where = f"job {existing.job!r} in {store.url}"
    if existing.fingerprint != wanted.fingerprint:
        raise InputError(
            f"{where} was prepared from a different dataset (sha256 {existing.fingerprint[:12]}..., "
            f"now {wanted.fingerprint[:12]}...): refusing to mix; use a new --job name"
        )
    if existing.model_sha256 != wanted.model_sha256:
        raise InputError(
            f"{where} was prepared with other model files (sha256 {existing.model_sha256[:12]}..., "
            f"now {wanted.model_sha256[:12]}...): refusing to mix; use a new --job name"
        )
    for name in ("rows", "unit_rows"):
        if getattr(existing, name) != getattr(wanted, name):
            raise InputError(
                f"{where} was prepared with {name}={getattr(existing, name)}, now "
                f"{getattr(wanted, name)}: refusing to mix; use a new --job name"
            )
    was, now = existing.options.to_json(), wanted.options.to_json()
    changed = sorted(k for k in was if was[k] != now[k])
    if changed:
        k = changed[0]
        raise InputError(
            f"{where} was prepared with {k}={was[k]!r}, now {now[k]!r}: refusing to mix; use a new --job name"
        )


def check_input(spec: JobSpec, fingerprint: str) -> None:
    """A worker refuses to process a job whose input changed since prepare."""
    if fingerprint != spec.fingerprint:
        raise InputError(
            f"job {spec.job!r}: input {spec.input} changed since prepare (sha256 "
            f"{spec.fingerprint[:12]}..., now {fingerprint[:12]}...): refusing to mix"
        )


def check_model(spec: JobSpec, model_sha256: str) -> None:
    """A worker refuses to process a job with model files other than those prepare pinned."""
    if model_sha256 != spec.model_sha256:
        raise InputError(
            f"job {spec.job!r}: model {spec.options.model} has other files than at prepare (sha256 "
            f"{spec.model_sha256[:12] or 'none'}..., now {model_sha256[:12] or 'none'}...): refusing to mix"
        )


# ----------------------------------------------------------------------------------------------------
# Leases: create-if-absent to claim, generation-matched replace to renew or take over, matched delete to release
# ----------------------------------------------------------------------------------------------------


class LeaseLost(ActfleetError):
    """The lease changed under us (expired and taken over, or deleted): stop the unit, commit nothing."""


@dataclass
class Lease:
    """A unit's lease. Times are the *store's* clock (Store.now()), never the writer's: `expires` is the
    store time it was taken or renewed at plus `seconds`, and a lease read back is judged to expire no later
    than the store's own time of its write plus `seconds` (read_lease), whatever its body says."""

    job: str
    unit: int
    worker: str
    attempt: int
    expires: float  # unix time by the store's clock
    nonce: str
    generation: int = 0
    seconds: float = 0.0  # its duration (0: a record from before durations were written)

    def record(self) -> bytes:
        d = asdict(self)
        d.pop("generation")
        d["format_version"] = FORMAT_VERSION
        return _dump(d)

    @property
    def tag(self) -> str:
        """This attempt's tag in its shard names: attempt number and nonce ("a2-5f1c9a2b")."""
        return f"a{self.attempt}-{self.nonce[:8]}"

    def live(self, now: float) -> bool:
        return self.expires > now

    @staticmethod
    def parse(data: bytes, generation: int, what: str, written: float | None = None) -> "Lease":
        """With `written` (the store's time of the record's write), the expiry is capped at written +
        seconds: a writer whose clock (or store-clock reading) ran ahead cannot hold a unit past that."""
        d = _load(data, what)
        lease = Lease(
            job=d.get("job", ""),
            unit=int(d.get("unit", -1)),
            worker=str(d.get("worker", "?")),
            attempt=int(d.get("attempt", 1)),
            expires=float(d.get("expires", 0)),
            nonce=str(d.get("nonce", "")),
            generation=generation,
            seconds=float(d.get("seconds", 0)),
        )
        if written is not None and lease.seconds > 0:
            lease.expires = min(lease.expires, written + lease.seconds)
        return lease


def claim(
    store: Store, job: str, unit: int, worker: str, lease_seconds: float, now: float | None = None
) -> Lease | None:
    """Take a free unit: create its lease only if absent. None if someone holds it. `now` is the store's
    time (Store.now(), the default), as in every lease function."""
    now = store.now() if now is None else now
    lease = Lease(job, unit, worker, 1, now + lease_seconds, secrets.token_hex(8), seconds=lease_seconds)
    try:
        lease.generation = store.create(lease_key(job, unit), lease.record())
    except PreconditionFailed:
        return None
    return lease


def read_lease(store: Store, job: str, unit: int) -> Lease | None:
    try:
        data, gen, written = store.read_stamped(lease_key(job, unit))
    except NotFound:
        return None
    try:
        return Lease.parse(data, gen, f"{store.url}/{lease_key(job, unit)}", written)
    except (ActfleetError, ValueError, TypeError):
        # A torn or foreign lease record: treat it as expired so the unit is not stuck forever.
        return Lease(job, unit, "?", 1, 0.0, "", gen)


def take_over(store: Store, stale: Lease, worker: str, lease_seconds: float, now: float | None = None) -> Lease | None:
    """Replace an expired lease, matching the stale record's generation: of several workers racing for
    it, exactly one wins. None if it is not expired or someone else got there first."""
    now = store.now() if now is None else now
    if stale.expires > now:
        return None
    lease = Lease(
        stale.job,
        stale.unit,
        worker,
        stale.attempt + 1,
        now + lease_seconds,
        secrets.token_hex(8),
        seconds=lease_seconds,
    )
    try:
        lease.generation = store.replace(lease_key(stale.job, stale.unit), lease.record(), stale.generation)
    except PreconditionFailed:
        return None
    return lease


def renew(store: Store, lease: Lease, lease_seconds: float, now: float | None = None) -> Lease:
    """Heartbeat: extend the lease if it is still ours (generation match) and has not expired; LeaseLost
    otherwise. An expired lease is lost even if nobody took it over yet: from its expiry on, others may
    (verify --clean may judge its shards garbage, a worker may take the unit), so a holder that stalled
    past it (SIGSTOP, a long GC pause) must not carry on as if nothing happened."""
    now = store.now() if now is None else now
    if not lease.live(now):
        raise LeaseLost(
            f"unit {lease.unit}: lease expired {now - lease.expires:.1f} s ago by the store's clock (this "
            f"worker stalled past it); abandoning the attempt"
        )
    new = Lease(
        lease.job, lease.unit, lease.worker, lease.attempt, now + lease_seconds, lease.nonce, seconds=lease_seconds
    )
    try:
        new.generation = store.replace(lease_key(lease.job, lease.unit), new.record(), lease.generation)
    except PreconditionFailed:
        raise LeaseLost(f"unit {lease.unit}: lease lost (expired and taken over, or removed)") from None
    return new


def release(store: Store, lease: Lease) -> None:
    """Give the unit back (abandon, or after commit). Only our own generation is deleted."""
    try:
        store.delete(lease_key(lease.job, lease.unit), lease.generation)
    except (NotFound, PreconditionFailed):
        pass  # already taken over or gone: nothing of ours to release


# ----------------------------------------------------------------------------------------------------
# Choosing the next unit
# ----------------------------------------------------------------------------------------------------


def done_units(store: Store, job: str) -> set[int]:
    """Units with a done record at their canonical key (a stray done/000099 of a 3-unit job is listed too;
    done/000002.bak or done/2 are not: list_units)."""
    return set(list_units(store, job, DONE).units)


def all_done(spec: "JobSpec", done: set[int]) -> bool:
    """Complete means every unit 0..units-1 has a done record, not "as many done keys as units"."""
    return all(u in done for u in range(spec.units))


def leased_units(store: Store, job: str) -> set[int]:
    return set(list_units(store, job, LEASES).units)


@dataclass
class NextUnit:
    lease: Lease | None  # the unit we now hold, or None
    all_done: bool  # every unit has a done record
    wait_seconds: float  # when lease is None and not all_done: when the earliest lease expires


def next_unit(
    store: Store, spec: JobSpec, worker: str, lease_seconds: float, *, offset: int = 0, now: float | None = None
) -> NextUnit:
    """Claim a free unit, else take over an expired lease, else say how long to wait.

    Workers scan from different offsets (a hash of their id) so that many claimers starting together
    mostly try different units instead of all racing for unit 0."""
    job = spec.job
    done = done_units(store, job)
    if all_done(spec, done):
        return NextUnit(None, True, 0.0)
    now = store.now() if now is None else now  # one reading of the store's clock for the whole scan
    leased = leased_units(store, job)
    order = [(offset + i) % spec.units for i in range(spec.units)] if spec.units else []
    for unit in order:
        if unit in done or unit in leased:
            continue
        lease = claim(store, job, unit, worker, lease_seconds, now)
        if lease is not None:
            if store.generation(done_key(job, unit)) is not None:  # committed between our listing and claim
                release(store, lease)
                continue
            return NextUnit(lease, False, 0.0)
    wait = lease_seconds
    now_ = now
    for unit in order:
        if unit in done or unit not in leased:
            continue
        stale = read_lease(store, job, unit)
        if stale is None:  # released since we listed: claim it
            lease = claim(store, job, unit, worker, lease_seconds, now)
        elif stale.expires <= now_:
            lease = take_over(store, stale, worker, lease_seconds, now)
        else:
            wait = min(wait, stale.expires - now_)
            continue
        if lease is not None:
            if store.generation(done_key(job, unit)) is not None:
                release(store, lease)  # a done unit's leftover lease (its committer died before releasing)
                continue
            return NextUnit(lease, False, 0.0)
    return NextUnit(None, all_done(spec, done_units(store, job)), max(0.05, wait))


# ----------------------------------------------------------------------------------------------------
# Commit
# ----------------------------------------------------------------------------------------------------


@dataclass
class ShardInfo:
    name: str  # key relative to the job, e.g. "shards/000042-0000.safetensors"
    bytes: int
    sha256: str
    tokens: int


@dataclass
class DoneRecord:
    unit: int
    start: int
    stop: int
    worker: str
    attempt: int
    rows_stored: int  # rows with at least one stored token
    tokens: int  # stored tokens (rows in the shards)
    skipped: dict[str, list[int]]  # reason -> sample ids of rows that stored nothing
    shards: list[ShardInfo]
    committed_at: float
    seconds: float  # wall time of the attempt
    computed_tokens: int = 0
    padded_tokens: int = 0
    truncated: int = 0  # rows cut to max_seq (long_inputs = truncate); they are stored
    input_sha256: str = ""  # the dataset bytes this attempt read (must be the job's fingerprint)
    model_sha256: str = ""  # the model files it loaded (must be the job's model_pin digest)
    format_version: int = FORMAT_VERSION
    # The unit's statistics object (stats/..., tokens = rows counted), or None (--stats none, or a record
    # from before statistics). In the record rather than found by name, so exactly the committing attempt's
    # statistics count: the same rule as its shards.
    stats: ShardInfo | None = None

    def to_json(self) -> bytes:
        return _dump(asdict(self))

    @staticmethod
    def from_json(data: bytes, what: str) -> "DoneRecord":
        d = _load(data, what)
        try:
            d["shards"] = [ShardInfo(**s) for s in d.get("shards", [])]
            if d.get("stats") is not None:
                d["stats"] = ShardInfo(**d["stats"])
            rec = DoneRecord(**d)
        except (TypeError, AttributeError) as e:
            raise ActfleetError(f"{what}: unexpected fields ({e}) (corrupt record)") from None
        bad = _wrong_types(rec)
        if bad:
            raise ActfleetError(f"{what}: field {bad} has the wrong type (corrupt record)")
        return rec


def _wrong_types(rec: DoneRecord) -> str | None:
    """The first field of a parsed done record whose value is not of the type the format says, or None."""
    ints = (
        "unit",
        "start",
        "stop",
        "attempt",
        "rows_stored",
        "tokens",
        "computed_tokens",
        "padded_tokens",
        "truncated",
        "format_version",
    )

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    for name in ints:
        if not is_int(getattr(rec, name)):
            return name
    for name in ("committed_at", "seconds"):
        if not isinstance(getattr(rec, name), (int, float)) or isinstance(getattr(rec, name), bool):
            return name
    for name in ("worker", "input_sha256", "model_sha256"):
        if not isinstance(getattr(rec, name), str):
            return name
    if not isinstance(rec.skipped, dict) or not all(
        isinstance(k, str) and isinstance(v, list) and all(is_int(i) for i in v) for k, v in rec.skipped.items()
    ):
        return "skipped"
    for s in rec.shards:
        if not (isinstance(s.name, str) and is_int(s.bytes) and isinstance(s.sha256, str) and is_int(s.tokens)):
            return "shards"
    s = rec.stats
    if s is not None and not (
        isinstance(s.name, str) and is_int(s.bytes) and isinstance(s.sha256, str) and is_int(s.tokens)
    ):
        return "stats"
    return None


class ShardsMissing(ActfleetError):
    """A shard the done record would list is not in the store as uploaded: nothing was committed."""


def commit(store: Store, lease: Lease, record: DoneRecord, lease_seconds: float) -> bool:
    """Mark the unit done, after every shard it lists is uploaded. True if this call committed it; False
    if another attempt already had (its own shards are the ones its record lists; ours are garbage).
    LeaseLost if our lease is gone or expired, ShardsMissing if a listed shard is not there with its size:
    then nothing is committed by us."""
    lease = renew(store, lease, lease_seconds)  # never commit on a lost or expired lease
    for s in record.shards + ([record.stats] if record.stats else []):  # e.g. removed by `verify --clean`
        size = store.size(in_job(lease.job, s.name))
        if size != s.bytes:
            release(store, lease)
            raise ShardsMissing(
                f"unit {lease.unit}: shard {s.name} is {'missing' if size is None else f'{size} bytes'}"
                f" (uploaded {s.bytes}); not committing"
            )
    try:
        store.create(done_key(lease.job, lease.unit), record.to_json())
        committed = True
    except PreconditionFailed:
        committed = False
    release(store, lease)
    return committed


def read_done(store: Store, job: str, unit: int) -> DoneRecord | None:
    """Unit `unit`'s done record, or None. ActfleetError for a corrupt one, and for one naming another unit
    (a record copied to another key must not vouch for this unit's rows)."""
    found = _read_if_present(store, done_key(job, unit))
    return None if found is None else done_record(found[0], f"{store.url}/{done_key(job, unit)}", unit)


def done_record(data: bytes, what: str, unit: int) -> DoneRecord:
    """Parse the done record read at unit `unit`'s key: the unit inside it must be the key's."""
    rec = DoneRecord.from_json(data, what)
    if rec.unit != unit:
        raise ActfleetError(f"{what}: the record says unit {rec.unit}, its key is unit {unit}'s (corrupt record)")
    return rec


def committed_units(store: Store, job: str, units: int) -> list[DoneRecord]:
    """The committed units of a job, in unit order: the done records of units 0..units-1.

    The one definition of what a job holds: its committed shards are exactly the shards these records list,
    and its statistics exactly the stats objects they list (one record per unit, created once), so nothing an
    attempt left behind (a killed attempt's shards, a re-done unit's first statistics) is ever read or
    counted. A done key naming no unit of the job is ignored; an unreadable record raises ActfleetError."""
    wanted = sorted(u for u in done_units(store, job) if 0 <= u < units)
    with ThreadPoolExecutor(max_workers=16) as pool:  # small records: latency, not bandwidth
        records = list(pool.map(lambda unit: read_done(store, job, unit), wanted))
    out = []
    for unit, rec in zip(wanted, records):
        if rec is None:
            continue  # removed since the listing
        if rec.unit != unit:
            raise ActfleetError(f"{store.url}/{done_key(job, unit)}: says unit {rec.unit} (corrupt record)")
        out.append(rec)
    return out


# ----------------------------------------------------------------------------------------------------
# Worker records and progress (read by `actfleet status` and reconcile)
# ----------------------------------------------------------------------------------------------------


@dataclass
class WorkerProgress:
    worker: str
    units_done: int = 0
    tokens: int = 0
    shards: int = 0
    bytes: int = 0
    # Read back (read_worker_records): when the store wrote the record, by the store's clock (a cloud time,
    # as TPU API times are). In the record as written: the worker's own clock (the measure of its skew).
    last_heartbeat: float | None = None
    started_at: float | None = None  # unix time this worker process started (its boot, for reconcile)
    current_unit: int | None = None
    state: str = "unknown"  # starting | working | idle | waiting | draining | finished | failed
    clock_skew: float | None = None  # read back: the worker's clock minus the store's at its last write (s)
    # With state "failed": why the worker stopped for good, its one-line error ("disk full: ..."). It stays in
    # the store after the process exits: reconcile replaces the worker on it, status shows it.
    reason: str | None = None


@dataclass
class JobProgress:
    job: str
    prepared: bool
    units_total: int = 0
    units_done: int = 0
    units_leased: int = 0  # units not done with a live (unexpired) lease
    rows: int = 0  # input rows
    rows_done: int = 0  # rows of done units (stored or skipped)
    rows_skipped: int = 0
    tokens: int = 0
    shards: int = 0
    bytes: int = 0
    bad_records: int = 0  # done records that are unreadable or name a unit the job does not have
    foreign: int = 0  # objects under done/ and leases/ that are no unit's key (docs/jobs.md "Foreign objects")
    workers: dict[str, WorkerProgress] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """units_done counts only the distinct units 0..units_total-1 with a readable done record."""
        return self.prepared and self.units_done >= self.units_total

    def to_dict(self) -> dict:
        d = asdict(self)
        d["complete"] = self.complete
        return d


# A worker clock further than this from the store's is reported (status, reconcile, the worker's log). Ages
# and expiry never use it; the bound only has to exceed a record write's latency (retries included).
CLOCK_SKEW_BOUND_S = 60.0
_SKEW_WARNED: dict[str, float] = {}  # store url -> when this process last logged its skew (once per 10 min)


def clock_skew_line(who: str, skew: float) -> str:
    """One line for a clock `skew` seconds off the store's (positive: ahead)."""
    how = "ahead of" if skew > 0 else "behind"
    amount = f"{abs(skew) / 60:.0f} min" if abs(skew) >= 120 else f"{abs(skew):.0f} s"
    return f"{who}'s clock is {amount} {how} the store's (leases and heartbeats are judged by the store's clock)"


def write_worker_record(store: Store, job: str, wp: WorkerProgress) -> None:
    """Each worker writes only its own record (no read-modify-write races): an unconditional put. It
    carries this machine's clock (last_heartbeat); readers judge its age by the store's time of the write."""
    store_now = store.now()
    wp.last_heartbeat = time.time()
    wp.clock_skew = round(wp.last_heartbeat - store_now, 3)
    if abs(wp.clock_skew) > CLOCK_SKEW_BOUND_S and time.monotonic() - _SKEW_WARNED.get(store.url, -1e9) > 600:
        _SKEW_WARNED[store.url] = time.monotonic()
        log.warning("%s", clock_skew_line(f"worker {wp.worker}", wp.clock_skew))
    store.put(worker_key(job, wp.worker), _dump(asdict(wp)))


def read_worker_records(
    store: Store, job: str, known: dict[str, tuple[float, WorkerProgress]] | None = None
) -> dict[str, WorkerProgress]:
    """Every worker's own record (read in parallel). A listing that fails raises; a record removed or torn
    since the listing is skipped (status and reconcile read the rest).

    `last_heartbeat` is the store's time of the record's write, never the time the worker's clock put in
    it; `clock_skew` is the worker's clock minus the store's at that write.

    `known` (key -> (written, record), kept by the caller between calls, updated here): a record whose
    listed write time is the one known is not read again. 10,000 reads a pass are tens of seconds; a
    listing is a page per 1,000 records."""

    def parse(data: bytes, key: str, written: float) -> WorkerProgress | None:
        try:
            d = _load(data, key)
            wp = WorkerProgress(**{k: d[k] for k in WorkerProgress.__dataclass_fields__ if k in d})
        except (ActfleetError, KeyError, TypeError):
            return None
        body = wp.last_heartbeat
        wp.last_heartbeat = written
        if not isinstance(wp.reason, str) or not wp.reason:
            wp.reason = None  # a reason is one line of text or absent (a foreign writer's is not trusted)
        wp.clock_skew = round(body - written, 3) if isinstance(body, (int, float)) else None
        return wp

    if known is not None:
        written = store.list_written(workers_prefix(job))
        todo = [k for k, t in written.items() if k not in known or known[k][0] != t]
        for k in [k for k in known if k not in written] + todo:
            known.pop(k, None)  # gone, or to be read again (one that cannot be read now is not remembered)

        def parse_keyed(data: bytes, key: str, at: float):
            wp = parse(data, key, at)
            return None if wp is None else (key, at, wp)

        for key, _, wp in _read_many(store, todo, parse_keyed, stamped=True):
            # Kept under the listed time: one rewritten since the listing is read again next time.
            known[key] = (written[key], wp)
        # The records are the ones kept in `known`: callers read them, never change them.
        return {wp.worker: wp for k in written if k in known and isinstance((wp := known[k][1]).worker, str)}
    records = _read_many(store, store.list(workers_prefix(job)), parse, stamped=True)
    return {r.worker: r for r in records if r is not None and isinstance(r.worker, str)}


def _read_many(store: Store, keys: Iterable[str], parse, stamped: bool = False) -> list:
    """parse(data, key) of every key, or parse(data, key, written) with the store's write time."""

    def one(key):
        try:
            if stamped:
                data, _, written = store.read_stamped(key)
                return parse(data, key, written)
            return parse(store.read(key)[0], key)
        except NotFound:
            return None

    keys = list(keys)
    if len(keys) <= 4:
        results = [one(k) for k in keys]
    else:
        with ThreadPoolExecutor(max_workers=16) as pool:  # GCS reads are latency-bound
            results = list(pool.map(one, keys))
    return [r for r in results if r is not None]


def job_progress(store: Store, job: str, now: float | None = None) -> JobProgress:
    """Totals and per-worker progress from the small records (job.json, done/*, leases/*, workers/*).
    `now` is what leases and heartbeat ages are judged against: the store's clock unless given."""
    now = store.now() if now is None else now
    try:
        spec = JobSpec.from_json(store.read(job_key(job))[0])
    except NotFound:
        return JobProgress(job=job, prepared=False)
    p = JobProgress(job=job, prepared=True, units_total=spec.units, rows=spec.rows)

    def parse_done(data: bytes, key: str) -> DoneRecord | bool:
        try:
            rec = done_record(data, key, unit_of(key))
        except ActfleetError:
            return False
        return rec if 0 <= rec.unit < spec.units else False

    done_listing, lease_listing = list_units(store, job, DONE), list_units(store, job, LEASES)
    p.foreign = len(done_listing.foreign) + len(lease_listing.foreign)
    parsed = _read_many(store, done_listing.units.values(), parse_done)
    done = [r for r in parsed if r is not False]
    p.bad_records = len(parsed) - len(done)
    done_set = set()
    workers = read_worker_records(store, job)
    per_worker: dict[str, WorkerProgress] = {}
    for r in done:
        done_set.add(r.unit)
        p.units_done += 1
        p.rows_done += r.stop - r.start
        p.rows_skipped += sum(len(v) for v in r.skipped.values())
        p.tokens += r.tokens
        p.shards += len(r.shards)
        p.bytes += sum(s.bytes for s in r.shards)
        w = per_worker.setdefault(r.worker, WorkerProgress(r.worker))
        w.units_done += 1
        w.tokens += r.tokens
        w.shards += len(r.shards)
        w.bytes += sum(s.bytes for s in r.shards)

    def parse_lease(data: bytes, key: str, written: float) -> Lease | None:
        try:
            return Lease.parse(data, 0, key, written)
        except (ActfleetError, ValueError, TypeError):
            return None  # torn or foreign: not a live lease (read_lease treats it as expired, too)

    leases = _read_many(
        store,
        (k for u, k in lease_listing.units.items() if u not in done_set),
        parse_lease,
        stamped=True,
    )
    p.units_leased = sum(1 for lease in leases if lease is not None and lease.expires > now)
    # Counters come from done records (authoritative); liveness from each worker's own record.
    for name, rec in workers.items():
        w = per_worker.setdefault(name, WorkerProgress(name))
        w.last_heartbeat, w.current_unit, w.state = rec.last_heartbeat, rec.current_unit, rec.state
        w.clock_skew, w.reason = rec.clock_skew, rec.reason
    p.workers = dict(sorted(per_worker.items()))
    return p


def job_complete(store: Store, job: str) -> bool:
    """True when the job is prepared and every unit has a done record (lists keys only)."""
    try:
        spec = JobSpec.from_json(store.read(job_key(job))[0])
    except NotFound:
        return False
    return all_done(spec, done_units(store, job))
