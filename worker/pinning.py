"""What a job pins, and how a worker reads exactly that: the dataset's bytes and the model's files.

`actfleet prepare` records in job.json the dataset's sha256 (and, for gs://, the object generation it
hashed) and the model's resolved revision with the sha256 of every file it loads. Every worker then reads:
- the dataset from a content-addressed local copy (`{data cache}/sha256/<hash><suffix>`), made from the
  pinned GCS generation or from the local file and hashed while it is copied; a copy whose hash differs
  from the job's is refused, so an edit of the original while the job runs never reaches a unit. The data
  cache is this one directory of files named by their sha256 (a compressed JSONL file's decompressed copy,
  which workers seek in, too), and a file's bytes are hashed again whenever a process first uses it: a
  cache file edited in place is deleted and made again from the source, or refused if the source changed;
- the model from the directory its reference resolves to (a gs:// prefix is cached per object
  generation, a hub id at the pinned commit), after checking every file's hash against the job's.

An input of several files (a directory, a glob, a hub dataset: actfleet.worker.sources) is pinned file by
file: job.json lists each file with its sha256 (and GCS generation, or hub commit in its hf:// name), and a
worker copies and checks only the files its units read, when it first reads them. The job's fingerprint is
then a digest of the files' sha256s (a single file's is its own sha256, as before).

Anything that does not match is refused with one line (exit 2); nothing is mixed. Done records carry the
two digests, and `verify` compares them with job.json.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from actfleet.errors import InputError, disk_full_error, is_disk_full
from actfleet.hashing import sha256_file
from actfleet.worker import inputs, model_files, sources

# The files a model directory is loaded from (the same patterns the hub download fetches).
MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".txt", ".model", ".jinja")


# ----------------------------------------------------------------------------------------------------
# The dataset
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputPin:
    sha256: str
    generation: int | None = None  # the GCS object generation prepare hashed (None for a local file)


def data_cache() -> Path:
    return Path(os.environ.get("ACTFLEET_DATA_CACHE") or Path.home() / ".cache" / "actfleet" / "data")


def pin_input(path: str) -> tuple[Path, InputPin]:
    """(a local file holding the dataset's current bytes, its pin). Used by prepare, which counts rows
    from exactly the bytes it pins."""
    if path.startswith("gs://"):
        bucket, name = _gcs_parts(path)
        blob = _gcs_blob(path, bucket, name, generation=None)
        local, digest = _fetch_to_cache(path, blob.download_to_file, _suffix(name), expect=None)
        return local, InputPin(digest, int(blob.generation))
    local = sources.hub_download(path) if path.startswith(sources.HF_PREFIX) else _local(path)
    try:
        return local, InputPin(sha256_file(local))
    except OSError as e:
        raise InputError(f"{path}: cannot read the dataset ({e.strerror})") from None


def pinned_input(path: str, pin: InputPin) -> Path:
    """The content-addressed local copy of exactly the pinned dataset bytes; InputError if the source no
    longer holds them (edited, replaced, or a GCS generation that is gone)."""
    suffix = _suffix(path)
    cached = _cached(pin.sha256, suffix)
    if cached is not None:
        return cached
    if path.startswith("gs://"):
        bucket, name = _gcs_parts(path)
        blob = _gcs_blob(path, bucket, name, generation=pin.generation)
        return _fetch_to_cache(path, blob.download_to_file, suffix, expect=pin.sha256)[0]
    # A hub file is named at its commit; its bytes are still checked, as a local file's are.
    local = sources.hub_download(path) if path.startswith(sources.HF_PREFIX) else _local(path)

    def copy(f) -> None:
        with open(local, "rb") as src:
            shutil.copyfileobj(src, f, 1 << 22)

    return _fetch_to_cache(path, copy, suffix, expect=pin.sha256)[0]


def pin_files(refs: list[str], max_rows: int = 0, per: int = 1) -> tuple[list, list[Path]]:
    """For prepare: pin each data file and describe it (rows and seek index, actfleet.worker.sources), in
    order; with max_rows, only the files holding the first max_rows rows (`per` samples per row).
    (files, the local paths prepare read them from)."""
    files, locals_, rows = [], [], 0
    for ref in refs:
        if max_rows and rows * per >= max_rows:
            break
        kind = sources.file_kind(ref)
        local, pin = pin_input(ref)
        f = inputs.describe(ref, local, kind, pin.sha256, pin.generation)
        files.append(f)
        locals_.append(local)
        rows += f.rows
    return files, locals_


def pinned_file(f: sources.DataFile) -> Path:
    """For a worker: a local copy of exactly the pinned bytes of one data file, in the form its seek index
    addresses (compressed JSONL: its decompressed copy, the compressed one fetched only to make it)."""
    if _compressed(f) and f.plain_sha256:
        cached = _cached(f.plain_sha256, ".jsonl")
        if cached is not None:
            return cached
    return plain_copy(f, pinned_input(f.path, InputPin(f.sha256, f.generation)))


def plain_copy(f: sources.DataFile, local: Path) -> Path:
    """For compressed JSONL: its decompressed bytes in the data cache, which the index's offsets address
    (made once per machine, checked against f.plain_sha256 when prepare recorded it). Other kinds: `local`."""
    if not _compressed(f):
        return local
    if f.plain_sha256:
        cached = _cached(f.plain_sha256, ".jsonl")
        if cached is not None:
            return cached

    def decompress(out) -> None:
        with inputs.open_text_stream(local, f.kind) as src:
            while chunk := src.read(1 << 22):
                out.write(chunk)

    return _fetch_to_cache(f.path, decompress, ".jsonl", expect=f.plain_sha256 or None)[0]


def _compressed(f: sources.DataFile) -> bool:
    return f.kind not in ("jsonl", "parquet", "arrow", "csv")


def _cached(sha256: str, suffix: str) -> Path | None:
    """The cache file named `sha256`, if it is there and still holds those bytes. One whose bytes differ (an
    edit in place, a bad disk) is deleted, so that it is made again from the source: never trusted by name."""
    cached = data_cache() / "sha256" / f"{sha256}{suffix}"
    try:
        found = sha256_file(cached)
    except FileNotFoundError:
        return None
    if found == sha256:
        return cached
    cached.unlink(missing_ok=True)  # a reader that opened it keeps its descriptor; the next one refetches
    return None


def _fetch_to_cache(path: str, write, suffix: str, expect: str | None) -> tuple[Path, str]:
    """Write the source into a temporary file, hash it, and rename it to its content address (the only
    way a file enters the data cache)."""
    root = data_cache() / "sha256"
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=root, prefix=".fetch-")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            hashing = _HashingWriter(f)
            write(hashing)  # hashed while it is written: one pass over the bytes
        digest = hashing.hexdigest()
        if expect is not None and digest != expect:
            raise InputError(
                f"dataset {path} changed since prepare (sha256 {expect[:12]}..., now {digest[:12]}...): "
                f"refusing to mix; prepare a new job"
            )
        final = root / f"{digest}{suffix}"
        os.replace(tmp, final)
        return final, digest
    except InputError:
        raise
    except Exception as e:  # google.api_core errors, OSError
        if is_disk_full(e):  # this machine's cache is full: not bad input (exit 74, not 2)
            raise disk_full_error(e, f"caching dataset {path} in") from None
        raise InputError(f"dataset {path}: cannot read it ({type(e).__name__}: {e})") from None
    finally:
        tmp.unlink(missing_ok=True)


class _HashingWriter:
    """A binary file that hashes what is written to it (for copyfileobj and GCS downloads)."""

    def __init__(self, f):
        import hashlib

        self.f, self.h = f, hashlib.sha256()

    def write(self, data) -> int:
        self.h.update(data)
        return self.f.write(data)

    def hexdigest(self) -> str:
        return self.h.hexdigest()

    def __getattr__(self, name):  # flush, tell... for clients that ask
        return getattr(self.f, name)


def _local(path: str) -> Path:
    p = Path(path[len("file://") :] if path.startswith("file://") else path)
    if not p.is_file():
        raise InputError(f"{path}: no such dataset file")
    return p


def _suffix(name: str) -> str:
    """The dataset's type suffix (the readers choose a format by it): '.jsonl', '.parquet', '.jsonl.gz'..."""
    base = name.rsplit("/", 1)[-1]
    m = re.search(r"(\.[A-Za-z0-9]+){1,2}$", base)
    return m.group(0).lower() if m else ""


def _gcs_parts(path: str) -> tuple[str, str]:
    from actfleet.store import parse_gs

    bucket, name = parse_gs(path, "dataset")
    if not name:
        raise InputError(f"{path}: a dataset in a bucket looks like gs://bucket/path/data.jsonl")
    return bucket, name


def _gcs_blob(path: str, bucket: str, name: str, generation: int | None):
    from google.api_core import exceptions as gexc
    from google.cloud import storage

    try:
        blob = storage.Client().bucket(bucket).get_blob(name, generation=generation)
    except gexc.GoogleAPICallError as e:
        raise InputError(f"dataset {path}: cannot read it ({type(e).__name__}: {e})") from None
    if blob is None:
        if generation is not None:
            raise InputError(
                f"dataset {path}: generation {generation}, which prepare pinned, is gone (the object "
                f"was replaced since prepare): refusing to mix; prepare a new job"
            )
        raise InputError(f"dataset {path}: no such object")
    return blob


# ----------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelPin:
    sha256: str  # over the sorted (file, sha256) pairs
    files: dict[str, str] = field(default_factory=dict)  # relative name -> sha256
    revision: str | None = None  # the hub commit a moving revision ("main") resolved to; None off the hub
    mirror: str | None = None  # where prepare mirrored a hub model in the store (worker/model_mirror.py)

    def to_json(self) -> dict:
        out = asdict(self)
        if out["mirror"] is None:
            del out["mirror"]  # job.json of a model read where it is stays as it was
        return out

    @staticmethod
    def from_json(d: dict) -> "ModelPin":
        return ModelPin(
            sha256=str(d["sha256"]),
            files={str(k): str(v) for k, v in dict(d["files"]).items()},
            revision=d.get("revision"),
            mirror=d.get("mirror"),
        )


def model_pin(model_dir: Path) -> ModelPin:
    files = {}
    for f in sorted(model_dir.rglob("*")):
        rel = f.relative_to(model_dir).as_posix()
        if f.is_file() and f.name.endswith(MODEL_FILE_SUFFIXES) and not any(p.startswith(".") for p in rel.split("/")):
            files[rel] = sha256_file(f)
    digest = _digest(files)
    m = re.search(r"/snapshots/([0-9a-f]{40})/?$", model_dir.resolve().as_posix())
    return ModelPin(digest, files, m.group(1) if m else None)


def pin_model(ref: str, revision: str) -> tuple[Path, ModelPin]:
    """For prepare: resolve the model and pin what it resolved to."""
    model_dir = model_files.resolve(ref, revision=revision)
    return model_dir, model_pin(model_dir)


def pinned_model(ref: str, revision: str, pin: ModelPin) -> Path:
    """For a worker: the model directory holding exactly the pinned files, or InputError. A hub model is read
    from the job's mirror of it when prepare made one (workers need not reach the hub)."""
    model_dir = model_files.resolve(pin.mirror or ref, revision=pin.revision or revision)
    found = model_pin(model_dir)
    if found.sha256 != pin.sha256:
        changed = sorted(set(pin.files) ^ set(found.files)) or sorted(
            f for f in pin.files if pin.files[f] != found.files.get(f)
        )
        raise InputError(
            f"model {ref} changed since prepare ({', '.join(changed[:3])} differ): refusing to mix; prepare a new job"
        )
    return model_dir


def _digest(files: dict[str, str]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(sorted(files.items())).encode()).hexdigest()
