"""Read activation shards back as numpy: from a directory, a file, file:// or gs:// URL, or a job in a store.

    from actfleet.worker.reader import iter_batches, load, shuffled_batches
    for b in iter_batches("out/", sites=["blocks.6.hook_resid_post"], positions=lambda p: p > 0):
        b["sample_ids"], b["positions"], b["token_ids"], b["blocks.6.hook_resid_post"]   # numpy arrays

Where shards come from (`open_source`): a directory (every *.safetensors under it), one file, a gs:// prefix,
or a job (`find_job`: its root `gs://bucket/JOB` or `store/JOB`, recognised by its job.json, its shards
directory, or an `actfleet extract --out`): then exactly the shards the done records list
(work_queue.committed_units), never an attempt's garbage, and units not done yet are left out.

What is read: local shards are memory-mapped, so only the pages of the rows and tensors used are touched.
Bucket shards are read by range from their safetensors header (8 bytes, then the header, then the byte
range of each wanted tensor, pinned to the header's object generation): reading one site of a shard
downloads that site's bytes and the index tensors, not the other sites.

Filters: `sites` (which activation tensors to return), `samples` (an iterable of sample ids, or a
(start, stop) range), `positions` (an iterable of positions, or a predicate on the positions array).
bfloat16 comes back as `ml_dtypes.bfloat16` arrays (`.astype(np.float32)` to compute; torch.from_numpy
needs a float32 or a `.view(np.uint16)` then `.view(torch.bfloat16)`).

`shuffled_batches` is a seeded, deterministic shuffled stream across shards that splits its work into
disjoint parts (DataLoader workers x ranks); `ActivationDataset` is the same stream as a torch
IterableDataset (its `.stats`: the job's activation statistics, `load_stats`).

Checks (issue 27.3): a job's shards are checked against their done records' sizes when opened, and every
tensor read against the sha256 its writer recorded in the header (local tensors whole, once; remote tensors
when read whole); a shard without those digests is checked whole against its done record. A failure is one
ShardFormatError line naming the shard (exit 2), never silently wrong data. This module imports numpy, safetensors' format code (worker/shards.py: numpy and
ml_dtypes), the queue protocol's names and the stores (actfleet/work_queue.py, store.py: standard library) and nothing else at
import time: google-cloud-storage only for gs://, torch only for ActivationDataset.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from actfleet import work_queue as q
from actfleet.store import NotFound as NotFoundError
from actfleet.worker.shards import _DTYPES, INDEX_TENSORS, TENSOR_SHA256, ShardFormatError, open_file, tensor_digest

# ----------------------------------------------------------------------------------------------------
# Where the shards are
# ----------------------------------------------------------------------------------------------------


@dataclass
class Source:
    """An ordered list of shards: `keys` are paths (store None) or keys of `store`. For a job, the done
    records' shards in (unit, part) order, with how many units are done and each shard's recorded size and
    sha256 (`expected`, by key), which ShardFile checks what it reads against."""

    store: object | None
    keys: list[str]
    location: str
    units_done: int | None = None  # None unless the location is a job
    units_total: int | None = None
    expected: dict = field(default_factory=dict)  # key -> work_queue.ShardInfo (jobs only)
    job: "JobRoot | None" = None

    def shard(self, key: str) -> "ShardFile":
        return ShardFile(self.store, key, self.expected.get(key))


@dataclass
class JobRoot:
    """A job found at a location: its records' store and name there, and where its shards are."""

    store: object  # the store holding job.json and done/ (rooted at the job: job "" unless `job` says)
    job: str
    spec: q.JobSpec
    shards_store: object | None  # the store the shard keys are in (None: they are local paths)
    shard_key: Callable[[str], str]  # a done record's job-relative shard name -> key (or path)


def find_job(location: str) -> JobRoot | None:
    """The job at `location`, if it is one: a job's root (`gs://bucket/JOB`, `store/JOB`: job.json there),
    its shards directory (`store/JOB/shards`: job.json one level up) or an `actfleet extract --out`
    directory (its queue under .extract/). None for anything else (a plain directory or file of shards)."""
    from actfleet.store import LocalStore, NotFound, open_store

    def read_spec(store, job: str, where: str):
        try:
            return q.JobSpec.from_json(store.read(q.job_key(job))[0], f"{where}/{q.JOB_FILE}")
        except NotFound:
            return None

    if location.startswith("gs://"):
        url = location.rstrip("/")
        for root in (url, url.rsplit("/", 1)[0] if url.endswith("/" + q.SHARDS) else None):
            if root is None or root.count("/") < 2:
                continue
            store = open_store(root)
            spec = read_spec(store, "", root)
            if spec is not None:
                return JobRoot(store, "", spec, store, lambda name: name)
        return None
    path = Path(location[len("file://") :] if location.startswith("file://") else location)
    if not path.is_dir():
        return None
    for root in (path, path.parent if path.name == q.SHARDS else None):
        if root is not None and (root / q.JOB_FILE).is_file():
            store = LocalStore(root)
            return JobRoot(store, "", read_spec(store, "", str(root)), store, lambda name: name)
    from actfleet.worker.commands.extract import JOB, STATE  # an extract --out: shards by (unit, part) name

    if (path / STATE / q.job_key(JOB)).is_file():
        store = LocalStore(path / STATE)
        return JobRoot(
            store, JOB, read_spec(store, JOB, str(path / STATE)), None, lambda name: str(path / _extract_name(name))
        )
    return None


def _extract_name(name: str) -> str:
    """Where an extract --out keeps a done record's shard: under its (unit, part) name (OutStore's routing)."""
    up = q.shard_unit_part(name)
    return q.shard_name(*up) if up else name.rsplit("/", 1)[-1]


def open_source(location: str) -> Source:
    """The shards at `location` (see the module docstring); FileNotFoundError if there are none to name."""
    job = find_job(location)
    if job is not None:
        return _job_shards(job, location)
    if location.startswith("gs://"):
        from actfleet.store import open_store

        store = open_store(location)
        return Source(store, [k for k in store.list("") if _is_shard(k)], location)
    path = Path(location[len("file://") :] if location.startswith("file://") else location)
    if path.is_file():
        return Source(None, [str(path)], location)
    if not path.is_dir():
        raise FileNotFoundError(f"{location}: no such shard file or directory")
    shards = sorted(
        str(f) for f in path.rglob("*" + q.SHARD_SUFFIX) if not f.name.startswith(".") and _is_shard(f.name)
    )
    return Source(None, shards, location)


def _is_shard(key: str) -> bool:
    return key.endswith(q.SHARD_SUFFIX) and not key.endswith(q.STATS_SUFFIX)


def _job_shards(job: JobRoot, location: str) -> Source:
    """Exactly the committed shards of the job (work_queue.committed_units), with their recorded sizes."""
    records = q.committed_units(job.store, job.job, job.spec.units)
    keys, expected = [], {}
    for rec in records:
        for s in rec.shards:
            key = job.shard_key(s.name)
            keys.append(key)
            expected[key] = s
    return Source(job.shards_store, keys, location, len(records), job.spec.units, expected, job)


def load_stats(location: str, sites=None):
    """The activation statistics of the job at `location` (actfleet.worker.stats.JobTotals: per site mean,
    variance, mean norm, SAELens's norm scaling factor...), summed over its committed units exactly once.
    InputError for a location that is not a job (a plain directory of shards carries no statistics)."""
    from actfleet.errors import InputError
    from actfleet.worker.stats import job_totals

    job = find_job(location)
    if job is None:
        raise InputError(
            f"{location}: not a job (no job.json there, one level up, or under .extract/): statistics live "
            f"with a job's done records"
        )
    return job_totals(job.store, job.job, job.spec.units, where=location, sites=sites)


# ----------------------------------------------------------------------------------------------------
# One shard, read by its header
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


class ShardFile:
    """One shard opened by its header alone; tensors, or a row range of them, are read on demand.

    Local files (a path, or a key of a local store) are memory-mapped; other stores are read by byte
    range at the generation whose header was read, so offsets and bytes always belong to one version."""

    def __init__(self, store, key: str, expect=None):
        """`expect`: the shard's done-record entry (work_queue.ShardInfo) when known: its size is checked at
        once. What is read is checked too, once: each tensor against the sha256 the writer recorded in the
        header (TENSOR_SHA256; local tensors whole, remote ones when read whole), or, for a shard without
        them, the whole file against the done record's sha256 when it is opened."""
        self.key = key
        local = key if store is None else store.local_path(key)
        self._store, self._tensors, self._generation = store, None, None
        self._verified: set[str] = set()
        try:
            if local is not None:
                self._open_local(local, expect)
            else:
                self._open_remote(store, key, expect)
        except (FileNotFoundError, NotFoundError):
            raise ShardFormatError(f"{key}: missing" + (" (its done record lists it)" if expect else "")) from None
        try:
            self._digests = json.loads(self.metadata.get(TENSOR_SHA256, "{}"))
        except ValueError:
            raise ShardFormatError(f"{key}: its {TENSOR_SHA256} metadata is not JSON (corrupt header)") from None
        if not self._digests and expect is not None:  # a shard without per-tensor digests: check it whole, once
            if local is not None:
                with open(local, "rb") as fh:
                    digest = hashlib.file_digest(fh, "sha256").hexdigest()
            else:
                digest = hashlib.sha256(store.read_range(key, 0, expect.bytes, self._generation)[0]).hexdigest()
            if digest != expect.sha256:
                raise ShardFormatError(
                    f"{key}: sha256 {digest[:12]}..., its done record says {expect.sha256[:12]}... (corrupt shard)"
                )

    @staticmethod
    def _check_size(key: str, size: int, expect) -> None:
        if expect is not None and size != expect.bytes:
            raise ShardFormatError(
                f"{key}: {size} bytes, its done record says {expect.bytes} (truncated or rewritten; "
                f"`actfleet verify` checks them all)"
            )

    def _open_local(self, local, expect) -> None:
        self._check_size(self.key, os.path.getsize(local), expect)
        self._tensors, self.metadata = open_file(local)
        self.entries = {name: _Entry(a.dtype, a.shape, 0, 0) for name, a in self._tensors.items()}

    def _open_remote(self, store, key: str, expect) -> None:
        if expect is not None:
            size = store.size(key)
            if size is None:
                raise FileNotFoundError(key)
            self._check_size(key, size, expect)
        head, self._generation = store.read_range(key, 0, 8)
        if len(head) < 8:
            raise ShardFormatError(f"{key}: too short for a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000:
            raise ShardFormatError(f"{key}: header length {n} is not plausible")
        raw, _ = store.read_range(key, 8, 8 + n, generation=self._generation)
        try:
            header = json.loads(raw)
        except ValueError as e:
            raise ShardFormatError(f"{key}: header is not JSON ({e})") from None
        if not isinstance(header, dict):
            raise ShardFormatError(f"{key}: header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries = {}
        for name, e in header.items():
            try:
                dtype = _DTYPES[e["dtype"]]
                shape = tuple(int(x) for x in e["shape"])
                begin, end = (8 + n + int(x) for x in e["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise ShardFormatError(f"{key}: tensor {name!r}: unsupported or malformed entry") from None
            if min(*shape, 0) < 0 or end - begin != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
                raise ShardFormatError(f"{key}: tensor {name!r}: data offsets do not match its shape")
            self.entries[name] = _Entry(dtype, shape, begin, end)

    @property
    def rows(self) -> int:
        return int(self.entries["sample_ids"].shape[0]) if "sample_ids" in self.entries else 0

    @property
    def sites(self) -> list[str]:
        return json.loads(self.metadata.get("sites", "[]")) or [k for k in self.entries if k not in INDEX_TENSORS]

    def read(self, names: Iterable[str], start: int = 0, stop: int | None = None) -> dict[str, np.ndarray]:
        """Rows start..stop-1 of the named tensors (views into the map for local files)."""
        names = list(names)
        missing = [n for n in names if n not in self.entries]
        if missing:
            raise KeyError(f"{self.key}: no site {missing[0]} (this shard has {', '.join(self.sites)})")
        stop = self.rows if stop is None else stop
        if self._tensors is not None:
            for n in names:  # local: the whole tensor is checked, once (pages of the map, no download)
                self._verify(n, self._tensors[n])
            return {n: self._tensors[n][start:stop] for n in names}
        spans = []  # (begin, end, name, shape)
        for n in names:
            e = self.entries[n]
            row = e.dtype.itemsize * int(np.prod(e.shape[1:], dtype=np.int64))
            spans.append((e.begin + start * row, e.begin + stop * row, n, (stop - start, *e.shape[1:])))
        out = {}
        for group in _coalesce(sorted(spans)):  # tensors adjacent in the file: one request
            lo, hi = group[0][0], group[-1][1]
            data, _ = self._store.read_range(self.key, lo, hi, generation=self._generation)
            if len(data) != hi - lo:
                raise ShardFormatError(f"{self.key}: {len(data)} bytes where {hi - lo} were expected (truncated?)")
            for b, e_, n, shape in group:
                out[n] = np.frombuffer(
                    data, self.entries[n].dtype, count=int(np.prod(shape, dtype=np.int64)), offset=b - lo
                ).reshape(shape)
                if start == 0 and stop == self.entries[n].shape[0]:  # read whole: check it
                    self._verify(n, out[n])
        return out

    def _verify(self, name: str, tensor: np.ndarray) -> None:
        """The tensor's bytes against the digest the writer recorded (once per tensor; nothing to check in a
        shard that records none: those are checked whole when opened, when their done record is known)."""
        if name in self._verified or not self._digests:
            return
        want = self._digests.get(name)
        got = tensor_digest([tensor])
        if want != got:
            raise ShardFormatError(
                f"{self.key}: tensor {name} has sha256 {got[:12]}..., "
                + (f"its header records {want[:12]}..." if want else "its header records none")
                + " (corrupt shard; `actfleet verify` checks them all)"
            )
        self._verified.add(name)


def _coalesce(spans):
    group = []
    for s in spans:
        if group and s[0] != group[-1][1]:
            yield group
            group = []
        group.append(s)
    if group:
        yield group


# ----------------------------------------------------------------------------------------------------
# Filtered reading, in shard order
# ----------------------------------------------------------------------------------------------------


def shard_metadata(location: str) -> list[dict]:
    """Each shard's string metadata (sites decoded from JSON), in reading order."""
    src = open_source(location)
    out = []
    for key in src.keys:
        f = src.shard(key)
        meta = dict(f.metadata)
        if "sites" in meta:
            meta["sites"] = json.loads(meta["sites"])
        meta["tokens"] = f.rows
        meta["path"] = key
        out.append(meta)
    return out


def _row_filter(arrays: dict, samples, positions) -> np.ndarray | None:
    keep = None
    if samples is not None:
        sids = arrays["sample_ids"]
        if isinstance(samples, range) or (isinstance(samples, tuple) and len(samples) == 2):
            lo, hi = (samples.start, samples.stop) if isinstance(samples, range) else samples
            keep = (sids >= lo) & (sids < hi)
        else:
            keep = np.isin(sids, np.fromiter(samples, dtype=np.int64))
    if positions is not None:
        pos = arrays["positions"]
        m = np.asarray(positions(pos), bool) if callable(positions) else np.isin(pos, np.fromiter(positions, np.int64))
        keep = m if keep is None else keep & m
    return keep


def iter_batches(
    location: str,
    *,
    sites: Iterable[str] | None = None,
    samples=None,
    positions: Iterable[int] | Callable | None = None,
    batch_rows: int = 65536,
) -> Iterator[dict]:
    """Dicts of numpy arrays (sample_ids, token_ids, positions, and each site) of at most batch_rows rows."""
    if samples is not None and not isinstance(samples, (range, tuple)):
        samples = list(samples)
    src = open_source(location)
    wanted_sites = None if sites is None else list(sites)
    for key in src.keys:
        f = src.shard(key)
        names = f.sites if wanted_sites is None else wanted_sites
        index = f.read(INDEX_TENSORS)
        acts = f.read(names)
        keep = _row_filter(index, samples, positions)
        idx = np.arange(f.rows) if keep is None else np.nonzero(keep)[0]
        for lo in range(0, len(idx), batch_rows):
            sel = idx[lo : lo + batch_rows]
            yield {name: np.array(t[sel]) for name, t in (*index.items(), *acts.items())}


def load(location: str, **filters) -> dict[str, np.ndarray]:
    """Everything iter_batches yields, concatenated and sorted by (sample_id, position)."""
    parts = list(iter_batches(location, **filters))
    if not parts:
        return {}
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.lexsort((out["positions"], out["sample_ids"]))
    return {k: v[order] for k, v in out.items()}


# ----------------------------------------------------------------------------------------------------
# A shuffled stream, split into disjoint parts
# ----------------------------------------------------------------------------------------------------


def shuffled_batches(
    location: str,
    *,
    sites: Iterable[str] | None = None,
    seed: int = 0,
    epoch: int = 0,
    batch_rows: int = 4096,
    buffer_rows: int = 262144,
    part: int = 0,
    parts: int = 1,
) -> Iterator[dict]:
    """Batches of `batch_rows` rows (the last may be smaller) in a seeded shuffled order.

    Work split: part p of `parts` reads rows [n*p/parts, n*(p+1)/parts) of every shard (for n rows), so
    the parts are disjoint, together hold every row exactly once, and differ in size by at most one row
    per shard, whatever the shard count. From a bucket, a part downloads only its row ranges.

    Mixing, per part: (1) the shard order is a permutation drawn from (seed, epoch), the same for every
    part; (2) the rows a part reads from a shard are permuted; (3) they pass through a buffer of
    `buffer_rows` rows: whenever it holds more, a uniformly random subset of the excess leaves it, so any
    two rows that are in the buffer together are equally likely to leave in either order. Rows further
    apart in the reading order than about buffer_rows are not mixed with each other; with buffer_rows at
    least the part's row count the order is a uniform permutation. The same (location's shards, seed,
    epoch, batch_rows, buffer_rows, part, parts) give the same batches, bit for bit; another epoch gives
    another order. Memory: about buffer_rows rows plus one shard's part.
    """
    if not 0 <= part < parts:
        raise ValueError(f"part {part} of {parts}: need 0 <= part < parts")
    src = open_source(location)
    order = np.random.default_rng([seed, epoch]).permutation(len(src.keys))
    rng = np.random.default_rng([seed, epoch, parts, part])
    wanted = None if sites is None else list(sites)
    buffer: dict[str, np.ndarray] | None = None
    pending: list[dict] = []

    def emit(rows: dict, final: bool = False) -> Iterator[dict]:
        pending.append(rows)
        n = sum(len(p["sample_ids"]) for p in pending)
        if n < batch_rows and not final:
            return
        cat = {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}
        cut = n - n % batch_rows if not final else n
        for lo in range(0, cut, batch_rows):
            yield {k: v[lo : lo + batch_rows] for k, v in cat.items()}
        pending[:] = [{k: v[cut:] for k, v in cat.items()}] if cut < n else []

    for i in order:
        f = src.shard(src.keys[i])
        n = f.rows
        lo, hi = n * part // parts, n * (part + 1) // parts
        names = [*INDEX_TENSORS, *(f.sites if wanted is None else wanted)]
        got = f.read(names, lo, hi)
        perm = rng.permutation(hi - lo)
        got = {k: v[perm] for k, v in got.items()}  # a copy: nothing keeps the map or the download alive
        buffer = got if buffer is None else {k: np.concatenate([buffer[k], got[k]]) for k in buffer}
        size = len(buffer["sample_ids"])
        if size > buffer_rows:
            mix = rng.permutation(size)
            out, keep = mix[: size - buffer_rows], mix[size - buffer_rows :]
            yield from emit({k: v[out] for k, v in buffer.items()})
            buffer = {k: v[keep] for k, v in buffer.items()}
    if buffer is not None:
        mix = rng.permutation(len(buffer["sample_ids"]))
        yield from emit({k: v[mix] for k, v in buffer.items()}, final=True)


def _torch_tensor(a: np.ndarray):
    import ml_dtypes
    import torch

    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(np.ascontiguousarray(a).view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def _make_torch_dataset():
    import torch

    class ActivationDataset(torch.utils.data.IterableDataset):
        """`shuffled_batches` as a torch IterableDataset yielding dicts of tensors, one batch at a time
        (use `DataLoader(ds, batch_size=None, num_workers=W)`). Each DataLoader worker of each rank reads
        its own part: part = rank * W + worker of world_size * W, so together they read every row once.
        rank/world_size default to torch.distributed's when it is initialized, else 0 and 1. Call
        set_epoch(e) before each epoch for a new order (as with DistributedSampler).

        The epoch lives in shared memory, not in an attribute: DataLoader workers hold copies of the dataset,
        and with persistent_workers=True those copies are made once, so an attribute set by set_epoch in the
        main process would never reach them and every epoch would repeat epoch 0's order. Each worker reads
        the shared value when its iteration starts (after set_epoch, which comes before iter(loader))."""

        def __init__(
            self,
            location: str,
            *,
            sites=None,
            seed: int = 0,
            batch_rows: int = 4096,
            buffer_rows: int = 262144,
            rank: int | None = None,
            world_size: int | None = None,
        ):
            super().__init__()
            self.location, self.sites, self.seed = location, None if sites is None else list(sites), seed
            self.batch_rows, self.buffer_rows = batch_rows, buffer_rows
            # Shared with the DataLoader workers (inherited, or passed as they are spawned), unlocked: one
            # writer (set_epoch, between epochs), readers at the start of an iteration.
            self._epoch = torch.multiprocessing.RawValue("q", 0)
            if rank is None or world_size is None:
                dist = torch.distributed
                initialized = dist.is_available() and dist.is_initialized()
                rank = dist.get_rank() if initialized else 0
                world_size = dist.get_world_size() if initialized else 1
            self.rank, self.world_size = rank, world_size

        @property
        def epoch(self) -> int:
            return int(self._epoch.value)

        def set_epoch(self, epoch: int) -> None:
            self._epoch.value = int(epoch)

        @property
        def stats(self):
            """The job's activation statistics of this dataset's sites (load_stats: JobTotals; `.sites[site]`
            has mean(), variance(), summary()["norm_scaling_factor"]), read once and kept."""
            if not hasattr(self, "_stats"):
                self._stats = load_stats(self.location, sites=self.sites)
            return self._stats

        def __iter__(self):
            info = torch.utils.data.get_worker_info()
            worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
            for batch in shuffled_batches(
                self.location,
                sites=self.sites,
                seed=self.seed,
                epoch=self.epoch,
                batch_rows=self.batch_rows,
                buffer_rows=self.buffer_rows,
                part=self.rank * workers + worker,
                parts=self.world_size * workers,
            ):
                yield {k: _torch_tensor(v) for k, v in batch.items()}

    ActivationDataset.__module__ = __name__
    ActivationDataset.__qualname__ = "ActivationDataset"  # pickled by name to spawned DataLoader workers
    return ActivationDataset


def __getattr__(name: str):
    # ActivationDataset subclasses torch's IterableDataset, so it is made on first use: importing this
    # module never imports torch. Cached in the module so pickling (DataLoader workers) finds it by name.
    if name == "ActivationDataset":
        cls = _make_torch_dataset()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
