"""The activation shard format (docs/extractor.md, "Shards"): safetensors, one row per stored token.

A shard holds `sample_ids` int64 [N], `token_ids` int32 [N], `positions` int32 [N] (with context windows also
`source_rows` int64 [N] and `source_positions` int32 [N]: each token's input row and position in it) and one
[N, d] tensor per capture site (bfloat16 or float32), plus string metadata: format and version, model, revision,
job, unit, part, sites, dtype, tokens, whether the weights were random, and what made the rows (`job_metadata`:
the positions policy, the context-window options, max_seq, d_model, compute and store dtype, the model's
resolved revision and the sha256 of its weights and of its tokenizer). No pickle, no compression.

safetensors' own numpy binding cannot write bfloat16, so the format (8-byte little-endian header length,
JSON header, one contiguous byte buffer) is written and read here directly: it is a few lines, and writing it
ourselves also makes shard bytes a pure function of their contents (fixed tensor order, sorted JSON keys).
Shards written here load with `safetensors.safe_open(..., framework="pt")` and in any safetensors reader.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Callable

import numpy as np

from actfleet.errors import InputError
from actfleet.job_options import SHARD, applying
from actfleet.work_queue import shard_name  # shard names and keys are the queue protocol's
from actfleet.worker.samples import Batch

FORMAT = "actfleet-activations"
FORMAT_VERSION = "1"
INDEX_TENSORS = ("sample_ids", "token_ids", "positions")
SOURCE_TENSORS = ("source_rows", "source_positions")  # context windows only (actfleet.worker.preparer)


@cache
def _bfloat16() -> np.dtype:
    import ml_dtypes  # about a CPU second (it registers its numpy casts): see _DtypeTable

    return np.dtype(ml_dtypes.bfloat16)


class _DtypeTable(Mapping):
    """name -> numpy dtype, whose bfloat16 entry (None in `table`) is resolved on first use: importing ml_dtypes
    costs about a CPU second, which what never meets a bfloat16 tensor (`actfleet verify`, reading the index
    tensors) need not pay."""

    def __init__(self, table: dict[str, np.dtype | None]):
        self._table = table

    def __getitem__(self, key: str) -> np.dtype:
        dtype = self._table[key]
        return _bfloat16() if dtype is None else dtype

    def __contains__(self, key) -> bool:
        return key in self._table

    def __iter__(self):
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)


_DTYPES = _DtypeTable(
    {
        "F64": np.dtype(np.float64),
        "F32": np.dtype(np.float32),
        "F16": np.dtype(np.float16),
        "BF16": None,
        "I64": np.dtype(np.int64),
        "I32": np.dtype(np.int32),
        "I16": np.dtype(np.int16),
        "I8": np.dtype(np.int8),
        "U8": np.dtype(np.uint8),
        "BOOL": np.dtype(np.bool_),
    }
)
STORE_DTYPES = _DtypeTable({"bfloat16": None, "float32": np.dtype(np.float32)})


def _code(dtype: np.dtype) -> str | None:
    """The safetensors code of a numpy dtype, None if it has none (an array of bfloat16 means ml_dtypes is loaded)."""
    for code, known in _DTYPES._table.items():
        if known is not None and dtype == known:
            return code
    return "BF16" if dtype.name == "bfloat16" and dtype == _bfloat16() else None


class ShardFormatError(InputError, ValueError):
    """Bytes that are not a safetensors file we can read, or that fail their recorded size or sha256: one line
    naming the shard (exit 2), never a traceback."""


# Shard metadata: the sha256 of each tensor's bytes (JSON {name: hex}), so a reader that reads one site of a
# shard can check what it read without reading (or downloading) the whole shard.
TENSOR_SHA256 = "tensor_sha256"


def tensor_digest(pieces) -> str:
    h = hashlib.sha256()
    for a in pieces:
        h.update(np.ascontiguousarray(a).reshape(-1).view(np.uint8))  # bytes, whatever the dtype (bfloat16 too)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------
# The safetensors container
# ----------------------------------------------------------------------------------------------------


class Pieces(list):
    """One tensor given as row pieces (arrays of one dtype and trailing shape), stored as their concatenation
    along the first axis: serializing copies them once, straight into the result."""


def safetensors_bytes(
    tensors: dict[str, "np.ndarray | Pieces"], metadata: dict[str, str] | None = None, *, digests: bool = False
) -> bytes:
    """Serialize tensors (in the given order) and string metadata to safetensors bytes. `digests`: also record
    each tensor's sha256 in the metadata (TENSOR_SHA256), for readers to check per tensor."""
    header: dict = {}
    metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
    sums: dict[str, str] = {}
    offset, parts = 0, []
    for name, value in tensors.items():
        pieces = (
            [np.ascontiguousarray(a) for a in value] if isinstance(value, Pieces) else [np.ascontiguousarray(value)]
        )
        if not pieces:
            raise ValueError(f"tensor {name!r}: no pieces")
        first = pieces[0]
        if _code(first.dtype) is None:
            raise TypeError(f"tensor {name!r}: dtype {first.dtype} cannot be stored in safetensors here")
        if isinstance(value, Pieces):
            if any(a.dtype != first.dtype or a.ndim == 0 or a.shape[1:] != first.shape[1:] for a in pieces):
                raise ValueError(f"tensor {name!r}: pieces differ in dtype or trailing shape")
            shape = [sum(len(a) for a in pieces), *first.shape[1:]]
        else:
            shape = list(first.shape)
        size = sum(a.nbytes for a in pieces)
        header[name] = {"dtype": _code(first.dtype), "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
        parts += [a.reshape(-1).view(np.uint8) for a in pieces if a.size]
        if digests:
            sums[name] = tensor_digest(pieces)
    if digests:
        metadata[TENSOR_SHA256] = json.dumps(sums, sort_keys=True, separators=(",", ":"))
    if metadata:
        header["__metadata__"] = metadata
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    head += b" " * (-(8 + len(head)) % 8)  # the byte buffer starts 8-aligned, so int64/float views are aligned
    return b"".join([struct.pack("<Q", len(head)), head, *parts])


def parse_header(buf) -> tuple[dict, dict[str, str], int]:
    """(tensor entries, metadata, data start) from the start of safetensors bytes."""
    if len(buf) < 8:
        raise ShardFormatError("too short for a safetensors header")
    (n,) = struct.unpack("<Q", bytes(buf[:8]))
    if n > len(buf) - 8 or n > 100_000_000:
        raise ShardFormatError(f"header length {n} does not fit in {len(buf)} bytes")
    try:
        header = json.loads(bytes(buf[8 : 8 + n]))
    except ValueError as e:
        raise ShardFormatError(f"header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ShardFormatError("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    return header, metadata, 8 + n


def read_tensors(buf, names=None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Zero-copy numpy views of (some of) the tensors in safetensors bytes / a memoryview / an mmap."""
    header, metadata, start = parse_header(buf)
    out = {}
    for name, entry in header.items():
        if names is not None and name not in names:
            continue
        try:
            dtype = _DTYPES[entry["dtype"]]
            begin, end = (int(x) for x in entry["data_offsets"])
            shape = tuple(int(x) for x in entry["shape"])
        except (KeyError, TypeError, ValueError):
            raise ShardFormatError(f"tensor {name!r}: unsupported or malformed entry {entry!r}") from None
        if (
            min(begin, *shape, 0) < 0
            or end - begin != dtype.itemsize * int(np.prod(shape, dtype=np.int64))
            or start + end > len(buf)
        ):
            raise ShardFormatError(f"tensor {name!r}: data offsets do not match its shape or the file size")
        out[name] = np.frombuffer(
            buf, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=start + begin
        ).reshape(shape)
    return out, metadata


def open_file(path: str | Path, names=None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Memory-map a safetensors file and return views of its tensors (alive as long as the arrays are)."""
    with open(path, "rb") as f:
        size = Path(path).stat().st_size
        if size == 0:
            raise ShardFormatError(f"{path}: empty file")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return read_tensors(mm, names)


# ----------------------------------------------------------------------------------------------------
# Shards of stored tokens
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """One finished shard: which unit and part it is, its safetensors bytes and the token rows they hold
    (known to whoever wrote them, so nobody re-parses the bytes to count)."""

    unit: int
    part: int
    data: bytes
    tokens: int

    @property
    def name(self) -> str:
        return shard_name(self.unit, self.part)


def shard_index(blob, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(sample_ids, positions) of a shard, from its header and those two tensors only (nothing is executed).
    Raises ShardFormatError, naming `what`, for bytes that are not a readable shard."""
    try:
        tensors, _ = read_tensors(blob, ("sample_ids", "positions"))
    except ShardFormatError as e:
        raise ShardFormatError(f"{what}: not a readable safetensors shard ({e})") from None
    missing = [n for n in ("sample_ids", "positions") if n not in tensors]
    if missing:
        raise ShardFormatError(f"{what}: not a readable safetensors shard (no {missing[0]} tensor)")
    return tensors["sample_ids"], tensors["positions"]


# The tokenizer's files, as transformers' tokenizers save them (hashed for `tokenizer_sha256`).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)


def _files_sha256(files: dict[str, str]) -> str:
    """sha256 over sorted (relative name, file sha256) pairs ("" when there are none)."""
    import hashlib

    return hashlib.sha256(json.dumps(sorted(files.items())).encode()).hexdigest() if files else ""


def job_metadata(
    options,
    *,
    max_seq: int,
    d_model: int,
    model_files: dict[str, str] | None = None,
    resolved_revision: str | None = None,
) -> dict[str, str]:
    """What made a job's rows, as shard metadata strings (all shards of a job carry the same):

    the options the option table marks SHARD (actfleet/job_options.py: positions, context_size (0: whole
    documents), separator, prepend_bos, concat, max_seq (resolved: the model's context when the option is 0),
    compute_dtype, store_dtype), d_model, resolved_revision (the hub commit a moving revision resolved to;
    "" off the hub), weights_sha256 and tokenizer_sha256 (sha256 over the sorted (file, sha256) pairs of the *.safetensors files and of TOKENIZER_FILES; `model_files` is
    worker/pinning.py's ModelPin.files). `options` is a JobOptions (a job.json from before the window options
    existed loads with their defaults)."""
    files = model_files or {}

    def text(value) -> str:
        return "" if value is None else ("true" if value is True else "false" if value is False else str(value))

    # The options marked SHARD in the option table, as strings; max_seq is the resolved one.
    return {
        **{o.name: text(getattr(options, o.name)) for o in applying(SHARD)},
        "max_seq": str(int(max_seq)),
        "d_model": str(int(d_model)),
        "resolved_revision": resolved_revision or "",
        "weights_sha256": _files_sha256(
            {f: h for f, h in files.items() if f.endswith(".safetensors") or f == "model.safetensors.index.json"}
        ),
        "tokenizer_sha256": _files_sha256({f: h for f, h in files.items() if f.rsplit("/", 1)[-1] in TOKENIZER_FILES}),
    }


def shard_rows(blob, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input row of each token, sample_ids, positions): the rows are `source_rows` where samples are context
    windows, else the sample ids. Raises ShardFormatError like shard_index."""
    ids, positions = shard_index(blob, what)
    tensors, _ = read_tensors(blob, ("source_rows",))
    return tensors.get("source_rows", ids), ids, positions


def shard_bytes(
    *,
    sample_ids,
    token_ids,
    positions,
    acts: dict[str, np.ndarray],
    sites,
    store_dtype: str,
    model: str,
    revision: str,
    job: str,
    unit: int,
    part: int,
    random_weights: bool,
    source_rows=None,
    source_positions=None,
    extra_metadata: dict[str, str] | None = None,
) -> bytes:
    """One shard's bytes: the index tensors, then one tensor per site in `sites` order, cast to store_dtype.
    Each tensor may be given as Pieces. `extra_metadata` (job_metadata's strings) joins the metadata; it
    cannot replace the keys set here."""
    dtype = STORE_DTYPES[store_dtype]

    def cast(value, to):
        if isinstance(value, Pieces):
            return Pieces(np.asarray(a).astype(to, copy=False) for a in value)
        return np.asarray(value).astype(to, copy=False)

    tensors = {
        "sample_ids": cast(sample_ids, np.int64),
        "token_ids": cast(token_ids, np.int32),
        "positions": cast(positions, np.int32),
    }
    if source_rows is not None:
        tensors["source_rows"] = cast(source_rows, np.int64)
        tensors["source_positions"] = cast(source_positions, np.int32)
    for site in sites:
        tensors[site] = cast(acts[site], dtype)
    ids = tensors["sample_ids"]
    metadata = {
        **(extra_metadata or {}),
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model,
        "revision": revision,
        "job": job,
        "unit": str(unit),
        "part": str(part),
        "sites": json.dumps(list(sites)),
        "dtype": store_dtype,
        "random_weights": "true" if random_weights else "false",
        "tokens": str(sum(len(a) for a in ids) if isinstance(ids, Pieces) else len(ids)),
    }
    return safetensors_bytes(tensors, metadata, digests=True)


class ShardWriter:
    """Accumulates engine Batches and cuts them into shards of about `shard_mb` MiB.

    Shards hold a fixed number of token rows (shard_mb / bytes per row), so their contents depend only on
    the batches given, in order. Each finished Shard goes to `on_shard(shard)`; without a callback the
    shards are kept in `self.shards`.
    """

    def __init__(
        self,
        *,
        shard_mb: float,
        model: str,
        revision: str,
        job: str,
        unit: int,
        sites,
        store_dtype: str = "bfloat16",
        random_weights: bool = False,
        on_shard: Callable[[Shard], None] | None = None,
        extra_metadata: dict[str, str] | None = None,
    ):
        if store_dtype not in STORE_DTYPES:
            raise ValueError(f"store dtype {store_dtype!r}: use one of {', '.join(STORE_DTYPES)}")
        self.shard_bytes_target = max(1, int(shard_mb * 2**20))
        self.meta = dict(
            model=model,
            revision=revision,
            job=job,
            unit=unit,
            random_weights=random_weights,
            extra_metadata=extra_metadata,
        )
        self.sites, self.store_dtype = tuple(sites), store_dtype
        self.on_shard = on_shard
        self.shards: list[Shard] = []
        self.part = 0
        self.rows_per_shard: int | None = None
        # Batches not yet in a shard, as row pieces {tensor name: array}, oldest first; a shard takes whole
        # pieces and the front of one, and its bytes are copied once, from the pieces (no concatenation).
        self._pieces: list[dict[str, np.ndarray]] = []
        self._rows = 0

    def add(self, batch: Batch) -> None:
        n = len(batch.sample_ids)
        if n == 0:
            return
        if self.rows_per_shard is None:
            index = 16 + (12 if batch.source_rows is not None else 0)
            row = index + sum(batch.acts[s].shape[1] * STORE_DTYPES[self.store_dtype].itemsize for s in self.sites)
            self.rows_per_shard = max(1, self.shard_bytes_target // row)
        piece = {"sample_ids": batch.sample_ids, "token_ids": batch.token_ids, "positions": batch.positions}
        if batch.source_rows is not None:
            piece.update(source_rows=batch.source_rows, source_positions=batch.source_positions)
        piece.update((s, batch.acts[s]) for s in self.sites)
        self._pieces.append(piece)
        self._rows += n
        while self._rows >= self.rows_per_shard:
            self._emit(self.rows_per_shard)

    def close(self) -> list[Shard]:
        if self._rows:
            self._emit(self._rows)
        return self.shards

    def _emit(self, rows: int) -> None:
        taken: dict[str, Pieces] = {k: Pieces() for k in self._pieces[0]}
        need = rows
        while need:
            piece = self._pieces[0]
            n = len(piece["sample_ids"])
            if n <= need:
                self._pieces.pop(0)
                for k, a in piece.items():
                    taken[k].append(a)
            else:
                for k, a in piece.items():
                    taken[k].append(a[:need])
                self._pieces[0] = {k: a[need:] for k, a in piece.items()}
                n = need
            need -= n
        self._rows -= rows
        source = {k: taken[k] for k in SOURCE_TENSORS if k in taken}
        blob = shard_bytes(
            sample_ids=taken["sample_ids"],
            token_ids=taken["token_ids"],
            positions=taken["positions"],
            acts={s: taken[s] for s in self.sites},
            sites=self.sites,
            store_dtype=self.store_dtype,
            part=self.part,
            **source,
            **self.meta,
        )
        shard = Shard(self.meta["unit"], self.part, blob, rows)
        self.part += 1
        if self.on_shard is not None:
            self.on_shard(shard)
        else:
            self.shards.append(shard)
