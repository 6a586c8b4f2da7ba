"""Shards round-trip through the reader; their bytes are deterministic and readable by safetensors itself."""

import json

import ml_dtypes
import numpy as np
import pytest

from actfleet.work_queue import shard_name, shard_unit_part
from actfleet.worker.reader import iter_batches, load, shard_metadata
from actfleet.worker.samples import Batch
from actfleet.worker.shards import (
    ShardFormatError,
    ShardWriter,
    read_tensors,
    safetensors_bytes,
    shard_bytes,
    shard_index,
)

SITES = ("hook_embed", "blocks.0.hook_resid_post")


def batch(sample_ids, d=8, seed=0):
    rng = np.random.default_rng(seed)
    sids = np.repeat(np.asarray(sample_ids, np.int64), 3)
    pos = np.tile(np.arange(3, dtype=np.int32), len(sample_ids))
    return Batch(
        token_ids=(sids * 10 + pos).astype(np.int32),
        sample_ids=sids,
        positions=pos,
        acts={s: rng.standard_normal((len(sids), d)).astype(np.float32) for s in SITES},
    )


def write(tmp_path, batches, store_dtype="float32", shard_mb=0.0005):
    w = ShardWriter(
        shard_mb=shard_mb,
        model="m",
        revision="r",
        job="j",
        unit=4,
        sites=SITES,
        store_dtype=store_dtype,
        random_weights=True,
    )
    for b in batches:
        w.add(b)
    shards = w.close()
    for s in shards:
        (tmp_path / s.name).write_bytes(s.data)
    return shards


def test_round_trip_with_filters(tmp_path):
    batches = [batch(range(0, 10), seed=1), batch(range(10, 30), seed=2)]
    shards = write(tmp_path, batches)
    assert len(shards) > 3 and [s.name for s in shards][:2] == ["000004-0000.safetensors", "000004-0001.safetensors"]
    got = load(str(tmp_path))
    for k in ("sample_ids", "positions", "token_ids", *SITES):
        np.testing.assert_array_equal(
            got[k],
            np.concatenate(
                [getattr(b, k) if k in ("sample_ids", "positions", "token_ids") else b.acts[k] for b in batches]
            ),
        )
    sub = load(f"file://{tmp_path}", sites=["blocks.0.hook_resid_post"], samples=[3, 17], positions=[0, 2])
    assert set(sub) == {"sample_ids", "token_ids", "positions", "blocks.0.hook_resid_post"}
    assert sub["sample_ids"].tolist() == [3, 3, 17, 17] and sub["positions"].tolist() == [0, 2, 0, 2]
    assert load(str(tmp_path), samples=range(5, 7), positions=lambda p: p > 0)["positions"].tolist() == [1, 2, 1, 2]
    small = list(iter_batches(str(tmp_path), batch_rows=4))
    assert max(len(b["sample_ids"]) for b in small) == 4 and sum(len(b["sample_ids"]) for b in small) == 90
    meta = shard_metadata(str(tmp_path))
    assert meta[0]["sites"] == list(SITES) and meta[0]["random_weights"] == "true" and meta[0]["unit"] == "4"
    with pytest.raises(KeyError, match="no site"):
        load(str(tmp_path), sites=["blocks.9.hook_mlp_out"])


def test_bytes_deterministic_and_readable_by_safetensors(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors import safe_open

    a = write(tmp_path, [batch(range(5), seed=3)], store_dtype="bfloat16", shard_mb=1)
    b = write(
        tmp_path,
        [
            batch(range(2), seed=3),
        ],
        store_dtype="bfloat16",
        shard_mb=1,
    )
    again = write(tmp_path, [batch(range(5), seed=3)], store_dtype="bfloat16", shard_mb=1)
    assert a == again and a != b
    (tmp_path / "x.safetensors").write_bytes(a[0].data)
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        assert f.get_tensor("hook_embed").dtype == torch.bfloat16
        assert f.get_tensor("sample_ids").dtype == torch.int64
        assert json.loads(f.metadata()["sites"]) == list(SITES) and f.metadata()["dtype"] == "bfloat16"
        np.testing.assert_array_equal(
            f.get_tensor("hook_embed").float().numpy(),
            batch(range(5), seed=3).acts["hook_embed"].astype(ml_dtypes.bfloat16).astype(np.float32),
        )


def test_corrupt_bytes_are_refused():
    good = shard_bytes(
        sample_ids=[1],
        token_ids=[2],
        positions=[0],
        acts={"hook_embed": np.ones((1, 2), np.float32)},
        sites=["hook_embed"],
        store_dtype="float32",
        model="m",
        revision="r",
        job="j",
        unit=0,
        part=0,
        random_weights=False,
    )
    for bad in (b"", good[:6], b"\xff" * 8 + good[8:], good[:-4]):
        with pytest.raises(ShardFormatError):
            read_tensors(bad)


def test_shards_carry_their_name_and_token_count(tmp_path):
    shards = write(tmp_path, [batch(range(0, 10), seed=1), batch(range(10, 30), seed=2)])
    assert [(s.unit, s.part) for s in shards] == [(4, p) for p in range(len(shards))]
    for s in shards:
        ids, positions = shard_index(s.data, s.name)
        assert s.tokens == len(ids) == len(positions) == len(read_tensors(s.data)[0]["token_ids"]) > 0
        assert shard_unit_part(f"job/shards/{s.name}") == (4, s.part) and s.name == shard_name(4, s.part)
    assert sum(s.tokens for s in shards) == 90
    assert shard_unit_part("job/shards/.000004-0001.safetensors.tmp") is None
    assert shard_unit_part("job/shards/notes.safetensors") is None


def test_shard_index_refuses_what_is_not_a_shard():
    no_positions = safetensors_bytes({"sample_ids": np.arange(3, dtype=np.int64)})
    for bad in (b"half-written", safetensors_bytes({}), no_positions, b"\x02" + b"\x00" * 7 + b"[]"):
        with pytest.raises(ShardFormatError, match="k.safetensors: not a readable safetensors shard"):
            shard_index(bad, "k.safetensors")


@pytest.mark.parametrize("store_dtype", ["bfloat16", "float32"])
def test_writer_cuts_batches_into_the_bytes_of_their_concatenation(store_dtype):
    """The writer serializes row pieces straight into each shard (one copy); the bytes must be exactly those of
    shard_bytes over the concatenated rows, whatever the batch sizes and wherever the shard cuts fall."""
    sizes = [1, 5, 2, 13, 1, 1, 8, 21, 3]  # rows per batch: cuts inside, at the edge of and across batches
    batches, start = [], 0
    for i, n in enumerate(sizes):
        batches.append(batch(range(start, start + n), seed=i))
        start += n
    bytes_per_row = 16 + sum(
        8 * np.dtype(ml_dtypes.bfloat16 if store_dtype == "bfloat16" else np.float32).itemsize for _ in SITES
    )
    for rows_per_shard in (1, 4, 7, 10, 1000):
        w = ShardWriter(
            shard_mb=rows_per_shard * bytes_per_row / 2**20,
            model="m",
            revision="r",
            job="j",
            unit=2,
            sites=SITES,
            store_dtype=store_dtype,
        )
        for b in batches:
            w.add(b)
        shards = w.close()
        cat = {k: np.concatenate([getattr(b, k) for b in batches]) for k in ("sample_ids", "token_ids", "positions")}
        acts = {s: np.concatenate([b.acts[s] for b in batches]) for s in SITES}
        total = len(cat["sample_ids"])
        assert [s.tokens for s in shards] == [min(rows_per_shard, total - lo) for lo in range(0, total, rows_per_shard)]
        for part, (shard, lo) in enumerate(zip(shards, range(0, total, rows_per_shard))):
            hi = lo + rows_per_shard
            want = shard_bytes(
                sample_ids=cat["sample_ids"][lo:hi],
                token_ids=cat["token_ids"][lo:hi],
                positions=cat["positions"][lo:hi],
                acts={s: a[lo:hi] for s, a in acts.items()},
                sites=SITES,
                store_dtype=store_dtype,
                model="m",
                revision="r",
                job="j",
                unit=2,
                part=part,
                random_weights=False,
            )
            assert shard.data == want, (rows_per_shard, part)
