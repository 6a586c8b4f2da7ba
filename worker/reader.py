"""Read activation shards back as numpy: stream batches from a directory, a file:// URL or a gs:// prefix.

    from actfleet.worker.reader import iter_batches, load
    for b in iter_batches("out/", sites=["blocks.6.hook_resid_post"], positions=lambda p: p > 0):
        b["sample_ids"], b["positions"], b["token_ids"], b["blocks.6.hook_resid_post"]   # numpy arrays

Local shards are memory-mapped (only the filtered rows are copied); bucket shards are read through
actfleet.store. Filters: `sites` (which activation tensors to return), `samples` (an iterable of sample ids, or
a (start, stop) range), `positions` (an iterable of positions, or a predicate on the positions array).
bfloat16 comes back as `ml_dtypes.bfloat16` arrays (`.astype(np.float32)` to compute; torch.from_numpy
needs a float32 or a `.view(np.uint16)` then `.view(torch.bfloat16)`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from actfleet.worker.shards import INDEX_TENSORS, open_file, read_tensors


def shard_locations(location: str) -> tuple[object, list[str]]:
    """(store or None, shard keys/paths) for a directory, a single .safetensors file, file:// or gs:// URL."""
    if location.startswith("gs://"):
        from actfleet.store import open_store

        store = open_store(location)
        return store, [k for k in store.list("") if k.endswith(".safetensors")]
    if location.startswith("file://"):
        location = location[len("file://"):]
    p = Path(location)
    if p.is_file():
        return None, [str(p)]
    if not p.is_dir():
        raise FileNotFoundError(f"{location}: no such shard file or directory")
    return None, sorted(str(f) for f in p.rglob("*.safetensors") if not f.name.startswith("."))


def shard_metadata(location: str) -> list[dict]:
    """Each shard's string metadata (sites decoded from JSON), in reading order."""
    store, keys = shard_locations(location)
    out = []
    for key in keys:
        tensors, meta = _open(store, key, names=("sample_ids",))
        meta = dict(meta)
        if "sites" in meta:
            meta["sites"] = json.loads(meta["sites"])
        meta["tokens"] = int(len(tensors["sample_ids"]))
        meta["path"] = key
        out.append(meta)
    return out


def _open(store, key: str, names=None):
    if store is None:
        return open_file(key, names)
    data, _ = store.read(key)
    return read_tensors(data, names)


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


def iter_batches(location: str, *, sites: Iterable[str] | None = None, samples=None,
                 positions: Iterable[int] | Callable | None = None, batch_rows: int = 65536) -> Iterator[dict]:
    """Dicts of numpy arrays (sample_ids, token_ids, positions, and each site) of at most batch_rows rows."""
    if samples is not None and not isinstance(samples, (range, tuple)):
        samples = list(samples)
    store, keys = shard_locations(location)
    wanted_sites = None if sites is None else list(sites)
    for key in keys:
        tensors, meta = _open(store, key)
        shard_sites = json.loads(meta.get("sites", "[]")) or [k for k in tensors if k not in INDEX_TENSORS]
        names = shard_sites if wanted_sites is None else wanted_sites
        missing = [s for s in names if s not in tensors]
        if missing:
            raise KeyError(f"{key}: no site {missing[0]} (this shard has {', '.join(shard_sites)})")
        keep = _row_filter(tensors, samples, positions)
        idx = np.arange(len(tensors["sample_ids"])) if keep is None else np.nonzero(keep)[0]
        for lo in range(0, len(idx), batch_rows):
            sel = idx[lo: lo + batch_rows]
            yield {name: np.array(tensors[name][sel]) for name in (*INDEX_TENSORS, *names)}


def load(location: str, **filters) -> dict[str, np.ndarray]:
    """Everything iter_batches yields, concatenated and sorted by (sample_id, position)."""
    parts = list(iter_batches(location, **filters))
    if not parts:
        return {}
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.lexsort((out["positions"], out["sample_ids"]))
    return {k: v[order] for k, v in out.items()}
