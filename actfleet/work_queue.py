"""The work queue protocol: a job's layout in the store, prepare, leases, commit and progress (docs/jobs.md).

Shared ground: the worker wing writes these records and the infra wing (reconcile, status) reads them, so
the protocol lives here, importing only shared ground. Every key of the layout below is built and parsed by
the helpers of this module; nothing else spells "done/" or a shard name. The shard *format* (header,
tensors) is worker/shards.py's; only the shards' names and keys are the protocol's.

Layout under `{store}/{job}/` (docs/jobs.md):

    job.json                          what the job is: input fingerprint and row count, extraction options,
                                      unit size and count. Written last by prepare: its presence means every
                                      unit record exists.
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
    workers/{worker}.json             each worker's own heartbeat and counters (one writer each), for status

Every record is small JSON; `job_progress` reads only those, never shards.
"""

from __future__ import annotations

import json
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


# ----------------------------------------------------------------------------------------------------
# Keys
# ----------------------------------------------------------------------------------------------------


# The layout's names (relative to the job's root), each spelled once.
JOB_FILE = "job.json"
UNITS, LEASES, DONE, SHARDS, WORKERS = "units", "leases", "done", "shards", "workers"


def job_key(job: str) -> str:
    return join(job, JOB_FILE)


def unit_key(job: str, unit: int) -> str:
    return join(job, UNITS, f"{unit:06d}.json")


def lease_key(job: str, unit: int) -> str:
    return join(job, LEASES, f"{unit:06d}")


def done_key(job: str, unit: int) -> str:
    return join(job, DONE, f"{unit:06d}")


def shard_key(job: str, unit: int, part: int, attempt: str | None = None) -> str:
    return join(job, SHARDS, shard_name(unit, part, attempt))


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
    """The unit number in ".../leases/000042", ".../done/000042" or ".../units/000042.json"."""
    name = key.rsplit("/", 1)[-1].split(".", 1)[0]
    return int(name) if name.isdigit() else None


# Shard names: part 3 of unit 42 is "000042-0003.safetensors", and as written by a fleet attempt
# "000042-0003.a2-5f1c9a2b.safetensors" (the lease's attempt number and nonce: Lease.tag).
SHARD_SUFFIX = ".safetensors"
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
    if not name.endswith(SHARD_SUFFIX):
        return None
    stem, _, attempt = name[: -len(SHARD_SUFFIX)].partition(".")
    unit, _, part = stem.partition("-")
    if not (unit.isdigit() and part.isdigit()) or (attempt and not ATTEMPT_RE.fullmatch(attempt)):
        return None
    return int(unit), int(part), attempt or None


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

    @staticmethod
    def from_json(data: bytes, what: str = "job.json") -> "JobSpec":
        d = _load(data, what)
        try:
            if "options" in d:
                d["options"] = JobOptions.from_json(d["options"], "options")
        except (TypeError, ValueError) as e:
            raise ActfleetError(f"{what}: {e} (corrupt record)") from None
        try:
            return JobSpec(**d)
        except TypeError as e:
            raise ActfleetError(f"{what}: unexpected fields ({e})") from None


def read_job(store: Store, job: str) -> JobSpec:
    try:
        data, _ = store.read(job_key(job))
    except NotFound:
        raise InputError(f"job {job!r} is not prepared in {store.url} (run `actfleet prepare` first)") from None
    return JobSpec.from_json(data, f"{store.url}/{job_key(job)}")


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
    existing = _existing_job(store, job)
    if existing is not None:
        _refuse_if_different(store, existing, spec)
        return existing, False
    # Units first, job.json last: a crash in between leaves no job.json, and the rerun completes it.
    for unit in range(spec.units):
        start, stop = spec.unit_range(unit)
        try:
            store.create(unit_key(job, unit), _dump({"unit": unit, "start": start, "stop": stop}))
        except PreconditionFailed:
            pass  # an earlier or concurrent prepare of the same job wrote it (job.json decides below)
    try:
        store.create(job_key(job), spec.to_json())
    except PreconditionFailed:
        existing = _existing_job(store, job)
        _refuse_if_different(store, existing, spec)
        return existing, False
    return spec, True


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
    job: str
    unit: int
    worker: str
    attempt: int
    expires: float  # unix time
    nonce: str
    generation: int = 0

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
    def parse(data: bytes, generation: int, what: str) -> "Lease":
        d = _load(data, what)
        return Lease(
            job=d.get("job", ""),
            unit=int(d.get("unit", -1)),
            worker=str(d.get("worker", "?")),
            attempt=int(d.get("attempt", 1)),
            expires=float(d.get("expires", 0)),
            nonce=str(d.get("nonce", "")),
            generation=generation,
        )


def claim(
    store: Store, job: str, unit: int, worker: str, lease_seconds: float, now: float | None = None
) -> Lease | None:
    """Take a free unit: create its lease only if absent. None if someone holds it."""
    now = time.time() if now is None else now
    lease = Lease(job, unit, worker, 1, now + lease_seconds, secrets.token_hex(8))
    try:
        lease.generation = store.create(lease_key(job, unit), lease.record())
    except PreconditionFailed:
        return None
    return lease


def read_lease(store: Store, job: str, unit: int) -> Lease | None:
    found = _read_if_present(store, lease_key(job, unit))
    if found is None:
        return None
    data, gen = found
    try:
        return Lease.parse(data, gen, f"{store.url}/{lease_key(job, unit)}")
    except (ActfleetError, ValueError):
        # A torn or foreign lease record: treat it as expired so the unit is not stuck forever.
        return Lease(job, unit, "?", 1, 0.0, "", gen)


def take_over(store: Store, stale: Lease, worker: str, lease_seconds: float, now: float | None = None) -> Lease | None:
    """Replace an expired lease, matching the stale record's generation: of several workers racing for
    it, exactly one wins. None if it is not expired or someone else got there first."""
    now = time.time() if now is None else now
    if stale.expires > now:
        return None
    lease = Lease(stale.job, stale.unit, worker, stale.attempt + 1, now + lease_seconds, secrets.token_hex(8))
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
    now = time.time() if now is None else now
    if not lease.live(now):
        raise LeaseLost(
            f"unit {lease.unit}: lease expired {now - lease.expires:.1f} s ago (this worker stalled "
            f"past it); abandoning the attempt"
        )
    new = Lease(lease.job, lease.unit, lease.worker, lease.attempt, now + lease_seconds, lease.nonce)
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
    """Units with a done record (as keys; a stray done/000099 of a 3-unit job is listed too)."""
    return {u for k in store.list(done_prefix(job)) if (u := unit_of(k)) is not None}


def all_done(spec: "JobSpec", done: set[int]) -> bool:
    """Complete means every unit 0..units-1 has a done record, not "as many done keys as units"."""
    return all(u in done for u in range(spec.units))


def leased_units(store: Store, job: str) -> set[int]:
    return {u for k in store.list(leases_prefix(job)) if (u := unit_of(k)) is not None}


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
    now_ = time.time() if now is None else now
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

    def to_json(self) -> bytes:
        return _dump(asdict(self))

    @staticmethod
    def from_json(data: bytes, what: str) -> "DoneRecord":
        d = _load(data, what)
        try:
            d["shards"] = [ShardInfo(**s) for s in d.get("shards", [])]
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
    return None


class ShardsMissing(ActfleetError):
    """A shard the done record would list is not in the store as uploaded: nothing was committed."""


def commit(store: Store, lease: Lease, record: DoneRecord, lease_seconds: float) -> bool:
    """Mark the unit done, after every shard it lists is uploaded. True if this call committed it; False
    if another attempt already had (its own shards are the ones its record lists; ours are garbage).
    LeaseLost if our lease is gone or expired, ShardsMissing if a listed shard is not there with its size:
    then nothing is committed by us."""
    lease = renew(store, lease, lease_seconds)  # never commit on a lost or expired lease
    for s in record.shards:  # e.g. removed by `verify --clean` while we were stalled
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
    found = _read_if_present(store, done_key(job, unit))
    return None if found is None else DoneRecord.from_json(found[0], f"{store.url}/{done_key(job, unit)}")


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
    last_heartbeat: float | None = None  # unix time of the worker's last record write
    started_at: float | None = None  # unix time this worker process started (its boot, for reconcile)
    current_unit: int | None = None
    state: str = "unknown"  # starting | working | idle | waiting | draining | finished | failed


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
    workers: dict[str, WorkerProgress] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """units_done counts only the distinct units 0..units_total-1 with a readable done record."""
        return self.prepared and self.units_done >= self.units_total

    def to_dict(self) -> dict:
        d = asdict(self)
        d["complete"] = self.complete
        return d


def write_worker_record(store: Store, job: str, wp: WorkerProgress) -> None:
    """Each worker writes only its own record (no read-modify-write races): an unconditional put."""
    wp.last_heartbeat = time.time()
    store.put(worker_key(job, wp.worker), _dump(asdict(wp)))


def read_worker_records(store: Store, job: str) -> dict[str, WorkerProgress]:
    """Every worker's own record (read in parallel). A listing that fails raises; a record removed or torn
    since the listing is skipped (status and reconcile read the rest)."""

    def parse(data: bytes, key: str) -> WorkerProgress | None:
        try:
            d = _load(data, key)
            return WorkerProgress(**{k: d[k] for k in WorkerProgress.__dataclass_fields__ if k in d})
        except (ActfleetError, KeyError, TypeError):
            return None

    records = _read_many(store, store.list(workers_prefix(job)), parse)
    return {r.worker: r for r in records if r is not None and isinstance(r.worker, str)}


def _read_many(store: Store, keys: Iterable[str], parse) -> list:
    def one(key):
        try:
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
    """Totals and per-worker progress from the small records (job.json, done/*, leases/*, workers/*)."""
    now = time.time() if now is None else now
    try:
        spec = JobSpec.from_json(store.read(job_key(job))[0])
    except NotFound:
        return JobProgress(job=job, prepared=False)
    p = JobProgress(job=job, prepared=True, units_total=spec.units, rows=spec.rows)

    def parse_done(data: bytes, key: str) -> DoneRecord | bool:
        try:
            rec = DoneRecord.from_json(data, key)
        except ActfleetError:
            return False
        return rec if 0 <= rec.unit < spec.units and rec.unit == unit_of(key) else False

    parsed = _read_many(store, store.list(done_prefix(job)), parse_done)
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
    leases = _read_many(
        store,
        (k for k in store.list(leases_prefix(job)) if unit_of(k) not in done_set),
        lambda data, key: Lease.parse(data, 0, key),
    )
    p.units_leased = sum(1 for lease in leases if lease.expires > now)
    # Counters come from done records (authoritative); liveness from each worker's own record.
    for name, rec in workers.items():
        w = per_worker.setdefault(name, WorkerProgress(name))
        w.last_heartbeat, w.current_unit, w.state = rec.last_heartbeat, rec.current_unit, rec.state
    p.workers = dict(sorted(per_worker.items()))
    return p


def job_complete(store: Store, job: str) -> bool:
    """True when the job is prepared and every unit has a done record (lists keys only)."""
    try:
        spec = JobSpec.from_json(store.read(job_key(job))[0])
    except NotFound:
        return False
    return all_done(spec, done_units(store, job))
