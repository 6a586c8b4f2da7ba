"""The reader as a training input: a seeded shuffled stream split into disjoint parts, the torch IterableDataset
over DataLoader workers and ranks, ranged reads of one site from a bucket (bytes counted by the fake GCS), a
shard replaced mid-read, and an import that needs no torch, transformers, jax or google."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from actfleet.store import PreconditionFailed
from actfleet.worker.reader import ShardFile, iter_batches, load, open_source, shuffled_batches
from actfleet.worker.samples import Batch
from actfleet.worker.shards import ShardWriter, parse_header
from tests.fakes.gcs_server import fake_gcs  # noqa: F401  (fixture)

SITES = ("hook_embed", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post")


def make_shards(directory: Path, units=3, samples=12, d=8) -> int:
    """Shards of `units` units, about a dozen each; returns the number of rows."""
    rows = 0
    directory.mkdir(parents=True, exist_ok=True)
    for unit in range(units):
        lengths = 1 + (np.arange(samples) * 7 + unit) % 9
        sids = np.concatenate([np.full(n, unit * samples + i) for i, n in enumerate(lengths)]).astype(np.int64)
        pos = np.concatenate([np.arange(n) for n in lengths]).astype(np.int32)
        acts = {s: (np.stack([sids] * d, 1) * 10 + pos[:, None] + k).astype(np.float32) for k, s in enumerate(SITES)}
        w = ShardWriter(
            shard_mb=0.0015, model="m", revision="r", job="j", unit=unit, sites=SITES, store_dtype="bfloat16"
        )
        w.add(Batch(token_ids=(sids * 3).astype(np.int32), sample_ids=sids, positions=pos, acts=acts))
        for s in w.close():
            (directory / s.name).write_bytes(s.data)
        rows += len(sids)
    return rows


def keys_of(batches) -> list[tuple[int, int]]:
    return [(int(s), int(p)) for b in batches for s, p in zip(b["sample_ids"], b["positions"])]


def test_shuffled_stream_is_deterministic_mixed_and_exactly_once(tmp_path):
    n = make_shards(tmp_path / "s")
    shards = len(open_source(str(tmp_path / "s")).keys)
    assert shards >= 8
    everything = sorted(keys_of(iter_batches(str(tmp_path / "s"))))
    a = list(shuffled_batches(str(tmp_path / "s"), seed=5, batch_rows=16, buffer_rows=40))
    again = list(shuffled_batches(str(tmp_path / "s"), seed=5, batch_rows=16, buffer_rows=40))
    other = list(shuffled_batches(str(tmp_path / "s"), seed=5, epoch=1, batch_rows=16, buffer_rows=40))
    assert sorted(keys_of(a)) == everything and len(everything) == n
    assert keys_of(a) == keys_of(again) and keys_of(a) != keys_of(other) and sorted(keys_of(other)) == everything
    assert [len(b["sample_ids"]) for b in a[:-1]] == [16] * (len(a) - 1) and 0 < len(a[-1]["sample_ids"]) <= 16
    for b in a:  # rows stay whole: every site and index tensor of a row moves together
        np.testing.assert_array_equal(b["token_ids"], b["sample_ids"] * 3)
        for k, s in enumerate(SITES):
            np.testing.assert_array_equal(
                b[s][:, 0].astype(np.float32),
                (b["sample_ids"] * 10 + b["positions"] + k).astype(np.float32).astype(b[s].dtype).astype(np.float32),
            )
    # mixed across shards, not shard after shard: with a buffer as large as the data, the first batch
    # draws from most shards (shard by shard, it would hold one or two)
    shard_of = {}
    for i, key in enumerate(open_source(str(tmp_path / "s")).keys):
        idx = ShardFile(None, key).read(["sample_ids", "positions"])
        shard_of.update({(int(s), int(p)): i for s, p in zip(idx["sample_ids"], idx["positions"])})
    first = next(shuffled_batches(str(tmp_path / "s"), seed=5, batch_rows=16, buffer_rows=n))
    assert len({shard_of[k] for k in keys_of([first])}) >= 4
    only = list(shuffled_batches(str(tmp_path / "s"), sites=["hook_embed"], seed=5, batch_rows=16, buffer_rows=40))
    assert set(only[0]) == {"sample_ids", "token_ids", "positions", "hook_embed"}
    assert keys_of(only) == keys_of(a)  # what is read does not change the order


def test_parts_are_disjoint_balanced_and_cover_every_row(tmp_path):
    make_shards(tmp_path / "s")
    everything = sorted(keys_of(iter_batches(str(tmp_path / "s"))))
    parts = [keys_of(shuffled_batches(str(tmp_path / "s"), seed=1, part=p, parts=4, batch_rows=8)) for p in range(4)]
    assert sorted(k for p in parts for k in p) == everything
    shards = len(open_source(str(tmp_path / "s")).keys)
    assert max(map(len, parts)) - min(map(len, parts)) <= shards  # at most one row per shard apart
    with pytest.raises(ValueError):
        list(shuffled_batches(str(tmp_path / "s"), part=4, parts=4))


def test_torch_dataset_two_ranks_two_workers_read_every_row_once(tmp_path):
    torch = pytest.importorskip("torch")
    from actfleet.worker.reader import ActivationDataset

    make_shards(tmp_path / "s")
    everything = sorted(keys_of(iter_batches(str(tmp_path / "s"))))
    seen = []
    for rank in range(2):
        ds = ActivationDataset(
            str(tmp_path / "s"),
            sites=["blocks.1.hook_resid_post"],
            seed=3,
            batch_rows=8,
            buffer_rows=32,
            rank=rank,
            world_size=2,
        )
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
        for b in loader:
            assert b["blocks.1.hook_resid_post"].dtype == torch.bfloat16 and b["sample_ids"].dtype == torch.int64
            seen += list(zip(b["sample_ids"].tolist(), b["positions"].tolist()))
    assert sorted(seen) == everything  # no row twice, none lost


def test_one_site_from_a_bucket_downloads_only_its_bytes(tmp_path, fake_gcs):  # noqa: F811
    make_shards(tmp_path / "s", units=2)
    bucket = storage.Client(
        project="t", credentials=AnonymousCredentials(), client_options={"api_endpoint": fake_gcs.url}
    ).bucket("acts")
    sizes = {}
    for f in sorted((tmp_path / "s").iterdir()):
        bucket.blob(f"job/shards/{f.name}").upload_from_filename(str(f))
        sizes[f.name] = f.stat().st_size
    site = "blocks.0.hook_resid_post"
    remote = load("gs://acts/job/shards", sites=[site])
    local = load(str(tmp_path / "s"), sites=[site])
    for k in local:
        np.testing.assert_array_equal(remote[k], local[k])
    for name, size in sizes.items():
        header, _, start = parse_header((tmp_path / "s" / name).read_bytes())
        wanted = sum(
            e["data_offsets"][1] - e["data_offsets"][0]
            for k, e in header.items()
            if k in ("sample_ids", "token_ids", "positions", site)
        )
        served = fake_gcs.media[f"job/shards/{name}"]
        # 8 bytes, the header, the index tensors (adjacent: one request), the site: nothing else
        assert served == [8, start - 8, served[2], served[3]] and sum(served) == start + wanted < size
        other_sites = sum(
            e["data_offsets"][1] - e["data_offsets"][0] for k, e in header.items() if k in SITES and k != site
        )
        assert size - sum(served) == other_sites


def test_a_shard_replaced_between_header_and_data_is_refused(tmp_path, fake_gcs):  # noqa: F811
    make_shards(tmp_path / "s", units=1)
    first, second = sorted((tmp_path / "s").iterdir())[:2]
    bucket = storage.Client(
        project="t", credentials=AnonymousCredentials(), client_options={"api_endpoint": fake_gcs.url}
    ).bucket("acts")
    bucket.blob("x/a.safetensors").upload_from_filename(str(first))
    src = open_source("gs://acts/x")
    f = ShardFile(src.store, "a.safetensors")
    bucket.blob("x/a.safetensors").upload_from_filename(str(second))  # rewritten: other offsets, other rows
    with pytest.raises(PreconditionFailed, match="not at generation"):
        f.read(["hook_embed"])


def test_importing_the_reader_needs_no_torch_transformers_jax_or_google(tmp_path):
    make_shards(tmp_path / "s", units=1)
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(
        "import sys\n"
        "for name in ('torch', 'transformers', 'jax', 'jaxlib', 'google', 'datasets', 'pyarrow', 'tokenizers'):\n"
        "    sys.modules[name] = None\n"
    )
    code = (
        "import sys\n"
        "from actfleet.worker.reader import iter_batches, shuffled_batches\n"
        f"n = sum(len(b['sample_ids']) for b in shuffled_batches({str(tmp_path / 's')!r}, seed=1))\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'jax', 'google', 'datasets', 'pyarrow')\n"
        "               if sys.modules.get(m) is not None)\n"
        "print(n, heavy)\n"
    )
    probe = subprocess.run(
        [sys.executable, "-c", "import torch"],
        env={**os.environ, "PYTHONPATH": str(block)},
        capture_output=True,
        text=True,
    )
    assert probe.returncode != 0  # the blocker is in effect
    r = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(block)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[1:] == ["[]"] and int(r.stdout.split()[0]) > 0


@pytest.mark.parametrize("context, persistent", [("fork", True), ("fork", False), ("spawn", True)])
def test_torch_dataset_reshuffles_every_epoch_with_persistent_workers(tmp_path, context, persistent):
    """set_epoch reaches DataLoader workers that persist across epochs (their dataset copies were made once):
    each epoch is exactly shuffled_batches' order for that epoch, and epochs differ (issue 23, item 6). Spawned
    workers get the dataset pickled, class by name and the shared epoch with it."""
    import itertools

    torch = pytest.importorskip("torch")
    from actfleet.worker.reader import ActivationDataset

    make_shards(tmp_path / "s")
    kw = dict(sites=["hook_embed"], seed=3, batch_rows=8, buffer_rows=32)
    ds = ActivationDataset(str(tmp_path / "s"), rank=0, world_size=1, **kw)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=None, num_workers=2, persistent_workers=persistent, multiprocessing_context=context
    )

    def want(epoch):
        """Worker w reads part w of 2, and the loader takes their batches in turn (the rest of the longer)."""
        parts = [list(shuffled_batches(str(tmp_path / "s"), epoch=epoch, part=w, parts=2, **kw)) for w in (0, 1)]
        turns = itertools.chain.from_iterable(itertools.zip_longest(*parts))
        return [keys_of([b]) for b in turns if b is not None]

    orders = []
    for epoch in range(3):
        ds.set_epoch(epoch)
        got = [list(zip(b["sample_ids"].tolist(), b["positions"].tolist())) for b in loader]
        assert got == want(epoch), f"epoch {epoch}"
        orders.append(got)
    assert orders[0] != orders[1] and orders[1] != orders[2] and orders[0] != orders[2]
