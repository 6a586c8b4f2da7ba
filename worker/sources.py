"""Where a job's rows come from: a dataset reference resolved to an ordered list of data files (the manifest).

A reference (`--input`, `[job] input`) is one of:
  a file           .jsonl .jsonl.gz .jsonl.zst .parquet .csv .arrow (local, file:// or gs://)
  a directory      every data file under it, sorted by path; a `datasets.save_to_disk` directory (state.json)
                   is read as its Arrow files, a saved DatasetDict (dataset_dict.json) as --split's
  a glob           "data/*.parquet", "shards/**/*.jsonl.zst": the matching data files, sorted
  a hub dataset id "org/name" (not an existing path), with --split, --subset and --revision: the split's
                   data files at the commit --revision resolves to (huggingface_hub; HF_HUB_OFFLINE reads its
                   cache). Files are named hf://datasets/<id>@<commit>/<path> so a worker fetches exactly them.

Rows are numbered across the files in order. The layers, each importing only those above it:
  sources   (here) a reference -> file references; `DataFile`, what prepare records of each file;
  inputs    reading a local copy of files: rows and seek index (`describe`), any range of records, rendering;
  pinning   what a job pins, and the one content-addressed data cache its workers read from.
"""

from __future__ import annotations

import glob as globmod
import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatch
from pathlib import Path

from actfleet.errors import InputError

# suffix -> kind, longest suffixes first
KINDS = (
    (".jsonl.gz", "jsonl.gz"),
    (".ndjson.gz", "jsonl.gz"),
    (".json.gz", "jsonl.gz"),
    (".jsonl.zst", "jsonl.zst"),
    (".jsonl.zstd", "jsonl.zst"),
    (".ndjson.zst", "jsonl.zst"),
    (".json.zst", "jsonl.zst"),
    (".jsonl", "jsonl"),
    (".ndjson", "jsonl"),
    (".json", "jsonl"),
    (".parquet", "parquet"),
    (".pq", "parquet"),
    (".csv", "csv"),
    (".arrow", "arrow"),
)
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")
HF_PREFIX = "hf://datasets/"


def kind_of(path: str) -> str | None:
    name = path.lower()
    for suffix, kind in KINDS:
        if name.endswith(suffix):
            return kind
    return None


def file_kind(path: str) -> str:
    kind = kind_of(path)
    if kind is None:
        raise InputError(
            f"{path}: unknown dataset type (use .jsonl, .jsonl.gz, .jsonl.zst, .parquet, .csv or "
            f".arrow, a directory of them, a glob or a hub dataset id)"
        )
    return kind


@dataclass(frozen=True)
class DataFile:
    """One data file of a job's input, as prepare pinned it (actfleet.worker.inputs.describe makes it)."""

    path: str  # local absolute path, gs://bucket/name, or hf://datasets/<id>@<commit>/<path in the repo>
    kind: str
    rows: int
    sha256: str
    generation: int | None = None  # the GCS generation prepare hashed (gs:// only)
    index: list[int] = field(default_factory=list)  # what a range read starts from: see inputs.describe
    # compressed JSONL: the sha256 of its decompressed bytes, the copy a worker seeks in ("" when unknown:
    # a job.json from before it was recorded)
    plain_sha256: str = ""

    def to_json(self) -> dict:
        d = asdict(self)
        if not self.plain_sha256:
            del d["plain_sha256"]  # job.json unchanged for the files that have none
        return d

    @staticmethod
    def from_json(d: dict) -> "DataFile":
        return DataFile(
            path=str(d["path"]),
            kind=str(d["kind"]),
            rows=int(d["rows"]),
            sha256=str(d["sha256"]),
            generation=d.get("generation"),
            index=[int(x) for x in d.get("index") or []],
            plain_sha256=str(d.get("plain_sha256") or ""),
        )


def fingerprint(files: list[DataFile]) -> str:
    """The input's pin: a single file's sha256 (as before multi-file inputs), else a digest of the files'."""
    if len(files) == 1:
        return files[0].sha256
    return hashlib.sha256(json.dumps([f.sha256 for f in files]).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------------
# Resolving a reference into file references
# ----------------------------------------------------------------------------------------------------


def is_glob(ref: str) -> bool:
    return any(c in ref for c in "*?[")


def resolve(ref: str, *, split: str = "train", subset: str = "", revision: str = "") -> list[str]:
    """The data files `ref` names, in row order (paths, gs:// URLs or hf:// file names)."""
    if ref.startswith("file://"):
        ref = ref[len("file://") :]
    if ref.startswith("gs://"):
        from actfleet.store import parse_gs

        if not parse_gs(ref, "--input")[1]:
            raise InputError(f"--input {ref}: a dataset in a bucket looks like gs://bucket/path/data.jsonl")
        file_kind(ref)
        return [ref]
    if ref.startswith(HF_PREFIX):
        ref = ref[len(HF_PREFIX) :]
    p = Path(ref)
    if p.is_file():
        file_kind(ref)
        return [str(p.resolve())]
    if p.is_dir():
        return _directory(p, split)
    if is_glob(ref):
        found = sorted(
            str(Path(f).resolve()) for f in globmod.glob(ref, recursive=True) if Path(f).is_file() and kind_of(f)
        )
        if not found:
            raise InputError(
                f"--input {ref}: the pattern matches no data files (.jsonl, .jsonl.gz, .jsonl.zst, "
                f".parquet, .csv, .arrow)"
            )
        return found
    if HUB_ID.fullmatch(ref) and "/" in ref:
        return hub_files(ref, split=split, subset=subset, revision=revision or "main")
    raise InputError(f"--input {ref}: no such dataset file or directory (nor a hub dataset id like org/name)")


def _directory(d: Path, split: str) -> list[str]:
    if (d / "dataset_dict.json").is_file():  # DatasetDict.save_to_disk: one saved Dataset per split
        splits = json.loads((d / "dataset_dict.json").read_text()).get("splits", [])
        if split not in splits:
            raise InputError(
                f"--input {d}: a saved DatasetDict without split {split!r} (it has "
                f"{', '.join(splits) or 'none'}); pass --split"
            )
        d = d / split
    if (d / "state.json").is_file():  # Dataset.save_to_disk: Arrow files listed in state.json, in order
        try:
            names = [f["filename"] for f in json.loads((d / "state.json").read_text())["_data_files"]]
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"--input {d}: state.json does not list the data files ({e})") from None
        return [str((d / n).resolve()) for n in names]
    found = sorted(
        str(f.resolve())
        for f in d.rglob("*")
        if f.is_file() and kind_of(f.name) and not any(part.startswith(".") for part in f.relative_to(d).parts)
    )
    if not found:
        raise InputError(
            f"--input {d}: the directory holds no data files (.jsonl, .jsonl.gz, .jsonl.zst, .parquet, .csv, .arrow)"
        )
    return found


# ----------------------------------------------------------------------------------------------------
# Hub datasets
# ----------------------------------------------------------------------------------------------------

# Where a split's files are when the README declares no configs (the common layouts `datasets` recognizes).
_DEFAULT_SPLIT_PATTERNS = (
    "data/{split}-*",
    "data/{split}_*",
    "data/{split}.*",
    "data/{split}/**",
    "{split}-*",
    "{split}.*",
    "{split}/**",
    "*/{split}-*",
    "*/{split}/**",
)


def hub_files(repo: str, *, split: str, subset: str, revision: str) -> list[str]:
    """hf://datasets/<repo>@<commit>/<file> for each data file of the split, the commit being what `revision`
    resolves to now. The README's `configs:` (the dataset card YAML `datasets` reads) chooses the files of
    --subset/--split; without configs, the usual data/<split>-* layouts. With HF_HUB_OFFLINE=1 everything comes
    from the local hub cache (snapshots/<commit>/, refs/<branch>)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        card_dir = Path(snapshot_download(repo, repo_type="dataset", revision=revision, allow_patterns=["README.md"]))
    except HFValidationError as e:
        raise InputError(f"--input {repo}: not a hub dataset id ({e})") from None
    except Exception as e:  # offline without a cached snapshot, unknown repo or revision, network
        raise InputError(
            f"--input {repo}: cannot resolve the hub dataset at revision {revision!r} ({type(e).__name__}: {e})"
        ) from None
    commit = card_dir.name
    patterns = _split_patterns(card_dir / "README.md", repo, split, subset)
    try:
        files_dir = Path(snapshot_download(repo, repo_type="dataset", revision=commit, allow_patterns=patterns))
    except Exception as e:
        raise InputError(
            f"--input {repo}: cannot fetch the data files of split {split!r} at {commit} ({type(e).__name__}: {e})"
        ) from None
    names = sorted(f.relative_to(files_dir).as_posix() for f in files_dir.rglob("*") if f.is_file())
    found = [n for n in names if kind_of(n) and any(fnmatch(n, pat) for pat in patterns)]
    if not found:
        raise InputError(
            f"--input {repo}: no data files for subset {subset or '(default)'!r} split {split!r} at "
            f"{commit} (looked for {', '.join(patterns)})"
        )
    return [f"{HF_PREFIX}{repo}@{commit}/{n}" for n in found]


def _split_patterns(readme: Path, repo: str, split: str, subset: str) -> list[str]:
    configs = []
    if readme.is_file():
        from huggingface_hub import DatasetCard

        configs = DatasetCard.load(readme).data.to_dict().get("configs") or []
    if not configs:
        if subset:
            raise InputError(f"--input {repo}: --subset {subset}, but the dataset card declares no configs")
        return [p.format(split=split) for p in _DEFAULT_SPLIT_PATTERNS]
    names = [c.get("config_name", "default") for c in configs]
    if subset:
        chosen = [c for c in configs if c.get("config_name", "default") == subset]
    else:
        chosen = (
            [c for c in configs if c.get("default")]
            or [c for c in configs if c.get("config_name", "default") == "default"]
            or (configs if len(configs) == 1 else [])
        )
    if not chosen:
        raise InputError(
            f"--input {repo}: "
            + (f"no subset {subset!r}" if subset else "several subsets")
            + f"; pass --subset, one of {', '.join(names)}"
        )
    data_files = chosen[0].get("data_files")
    if isinstance(data_files, str):
        data_files = [{"split": "train", "path": data_files}]
    for entry in data_files or []:
        if entry.get("split", "train") == split:
            path = entry.get("path")
            return [path] if isinstance(path, str) else list(path)
    splits = [e.get("split", "train") for e in data_files or []]
    raise InputError(
        f"--input {repo}: subset {chosen[0].get('config_name', 'default')!r} has no split {split!r} "
        f"(it has {', '.join(splits) or 'none'}); pass --split"
    )


def hub_parts(path: str) -> tuple[str, str, str]:
    """(repo, commit, file) of an hf://datasets/<repo>@<commit>/<file> name."""
    rest = path[len(HF_PREFIX) :]
    head, _, name = rest.partition("@")
    commit, _, filename = name.partition("/")
    return head, commit, filename


def hub_download(path: str) -> Path:
    """The local (hub cache) copy of one pinned hub file."""
    from huggingface_hub import hf_hub_download

    repo, commit, filename = hub_parts(path)
    try:
        return Path(hf_hub_download(repo, filename, repo_type="dataset", revision=commit))
    except Exception as e:
        raise InputError(f"dataset {path}: cannot fetch it ({type(e).__name__}: {e})") from None
