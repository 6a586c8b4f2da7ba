"""The packing plan's shapes come from a small fixed set and its padding stays small (deterministic
properties of actfleet.worker.batching, no timings); a second process compiles nothing (the persistent
compilation cache, counted by jax.monitoring events in a real `actfleet extract` subprocess)."""

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from actfleet.worker import batching
from actfleet.worker.batching import bucket_rows, plan, rows_per_batch


def row_buckets(*, per_batch: int, n_devices: int = 1) -> list[int]:
    """Every batch size (rows) a plan can use with this full batch: the fixed set the shapes come from."""
    return sorted({bucket_rows(n, per_batch=per_batch, n_devices=n_devices) for n in range(1, per_batch + 1)})


def lognormal_lengths(seed: int, rows: int, median: float, cap: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.lognormal(np.log(median), 1.0, rows)), 1, cap).astype(int).tolist()


def padding(lengths, batches) -> float:
    return 1 - sum(lengths) / sum(b.shape[0] * b.shape[1] for b in batches)


@pytest.mark.parametrize("n_devices", [1, 4])
def test_shapes_come_from_the_fixed_set_whatever_the_length_mix(n_devices):
    batch_tokens, max_seq = 16384, 2048
    allowed = {
        (r, p)
        for p in (128, 256, 512, 1024, 2048)
        for r in row_buckets(
            per_batch=rows_per_batch(p, batch_tokens=batch_tokens, n_devices=n_devices), n_devices=n_devices
        )
    }
    # The set's size is a constant of (batch_tokens, max_seq, devices): per row length, every per-device
    # count up to 16 and 8 per doubling above, plus the full batch.
    for p in (128, 256, 512, 1024, 2048):
        per_batch = rows_per_batch(p, batch_tokens=batch_tokens, n_devices=n_devices)
        per_device = per_batch // n_devices
        bound = min(per_device, 16) + 8 * max(0, math.ceil(math.log2(per_device / 16))) + 1
        assert len(row_buckets(per_batch=per_batch, n_devices=n_devices)) <= bound
    assert len(allowed) <= (120 if n_devices == 1 else 60)

    seen = set()
    rng = np.random.default_rng(1)
    for seed in range(60):
        rows = int(rng.integers(1, 1500))
        lengths = lognormal_lengths(seed, rows, float(rng.choice([8, 60, 300, 1200])), max_seq)
        batches = plan(lengths, batch_tokens=batch_tokens, n_devices=n_devices)
        shapes = {b.shape for b in batches}
        assert shapes <= allowed
        assert len(shapes) <= 2  # one run: its full batches and its last one
        assert all(b.shape[0] % n_devices == 0 for b in batches)
        seen |= shapes
    assert len(seen) > 10  # the mixes did exercise many tails


def test_padding_stays_small_on_mixed_lengths():
    # The whole-process bench's workload: 48 rows, lognormal lengths (median 64, at most 256), one batch.
    # Rounding a short run up to eighths of a full batch computed 6,144 tokens for these 4,502 (27%).
    lengths = lognormal_lengths(0, 48, 64, 256)
    batches = plan(lengths, batch_tokens=16384)
    assert [b.shape for b in batches] == [(18, 256)]
    assert padding(lengths, batches) < 0.03

    # The stated bound for any run: the last batch's empty rows are fewer than 1/8 of its rows (none at all
    # up to 16 rows per device), and every full batch is full.
    for seed in range(40):
        rng = np.random.default_rng(seed)
        lengths = lognormal_lengths(seed, int(rng.integers(1, 1500)), float(rng.choice([20, 100, 500])), 2048)
        for n_devices in (1, 4):
            batches = plan(lengths, batch_tokens=8192, n_devices=n_devices)
            *full, last = batches
            assert all(len(row) > 0 for b in full for row in b.rows)
            empty = sum(1 for row in last.rows if not row)
            per_device = last.shape[0] // n_devices
            assert empty < n_devices or empty * 8 < last.shape[0], (seed, n_devices, last.shape, empty)
            if per_device <= 16:
                assert empty < n_devices
        if len(lengths) >= 500:  # several batches: padding is the packing's, a few %
            assert padding(lengths, plan(lengths, batch_tokens=8192)) < 0.06


def test_bucket_edges():
    assert [batching.bucket_rows(n, per_batch=64) for n in (1, 16, 17, 18, 19, 33, 63, 64)] == [
        1,
        16,
        18,
        18,
        20,
        36,
        64,
        64,
    ]
    assert [batching.bucket_rows(n, per_batch=48, n_devices=4) for n in (1, 4, 5, 47)] == [4, 4, 8, 48]
    assert row_buckets(per_batch=6) == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_a_second_process_compiles_nothing(tmp_path):
    """Two `actfleet extract` processes with the same cache directory: the first compiles its programs and
    writes them, the second loads every one of them (cache misses counted by jax.monitoring, not time)."""
    from actfleet.demo.tiny_model import make_tiny_model

    model = make_tiny_model(tmp_path / "m", max_pos=256)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": "lorem ipsum " * (1 + i % 7)}) + "\n" for i in range(12)))
    env = dict(os.environ, ACTFLEET_JAX_CACHE=str(tmp_path / "jax-cache"), JAX_PLATFORMS="cpu")

    def extract(out: str) -> dict:
        """The `compilation:` line extract prints on stderr, as numbers."""
        r = subprocess.run(
            [
                sys.executable,
                "-c",
                "from actfleet.cli import main; main()",
                "extract",
                "--model",
                str(model),
                "--input",
                str(data),
                "--out",
                str(tmp_path / out),
                "--unit-rows",
                "5",
                "--json",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr
        m = re.search(r"compilation: (\d+) programs compiled, (\d+) loaded from the cache", r.stderr)
        assert m, r.stderr
        return {"compiled": int(m[1]), "cache_hits": int(m[2]), "summary": json.loads(r.stdout)}

    first, second = extract("a"), extract("b")
    assert first["compiled"] >= 3 and first["cache_hits"] == 0  # 3 units: steps and gathers
    assert second["compiled"] == 0
    assert second["cache_hits"] == first["compiled"]
    assert [s["sha256"] for s in second["summary"]["shards"]] == [s["sha256"] for s in first["summary"]["shards"]]
