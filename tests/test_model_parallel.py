"""Model parallelism on one host: `model_parallel` N splits heads and MLP over N of 4 CPU devices.

XLA's device count is fixed when JAX starts, so the runs happen in a child process started with
XLA_FLAGS=--xla_force_host_platform_device_count=4. The child extracts the same rows with N = 1, 2 and 4 (and a
grouped-query model whose 2 key/value heads are replicated at N = 4), and measures how many parameter bytes
each device holds (the sum of its addressable shards' nbytes). The parent checks: same rows within float32
1e-5 whatever N, each device holds about 1/N of the layer weights, and resid_pre of layer L is resid_post of
L - 1 (hook_embed for L = 0) bit for bit when sharded too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from actfleet.demo.tiny_model import make_tiny_model

ROOT = Path(__file__).resolve().parent.parent
SITES = [
    "hook_embed",
    "blocks.*.hook_resid_pre",
    "blocks.*.hook_resid_post",
    "blocks.*.attn.hook_z",
    "blocks.*.mlp.hook_post",
    "blocks.1.ln2.hook_normalized",
]
TEXTS = ["a", "The quick brown fox jumps over the lazy dog. " * 6, "7", "x y", "hello world " * 12, "z"]

CHILD = r"""
import json, sys
import jax
import numpy as np
from actfleet.errors import InputError
from actfleet.job_options import JobOptions
from actfleet.worker import convert
from actfleet.worker.engine import Engine

# Every block convert reads from the checkpoint, to check no parameter is read whole where it is split and
# no block twice (one host copy per distinct block, not per device).
read = []
original_read_block = convert.read_block
def counting_read_block(tensor, split, order, sizes, index, dtype, fixed=None):
    block = original_read_block(tensor, split, order, sizes, index, dtype, fixed)
    read.append((block.nbytes, int(np.prod([sizes[n] for n in order])) * block.itemsize))
    return block
convert.read_block = counting_read_block

spec = json.loads(sys.argv[1])
assert len(jax.devices()) == 4, jax.devices()
report = {}
for name, model_dir, n in spec["runs"]:
    options = JobOptions(model=model_dir, sites=tuple(spec["sites"]), positions="all", compute_dtype="float32",
                         store_dtype="float32", batch_tokens=256, model_parallel=n)
    read.clear()
    engine = Engine(options, attn_block=32)
    reads = list(read)
    batches = list(engine.run([(i, t, None) for i, t in enumerate(spec["texts"])]))
    arrays = {k: np.concatenate([getattr(b, k) for b in batches]) for k in ("sample_ids", "positions", "token_ids")}
    arrays.update({s: np.concatenate([b.acts[s] for b in batches]) for s in engine.sites})
    np.savez(f"{spec['out']}/{name}-{n}.npz", **arrays)
    per_device, total, all_params = {}, 0, 0
    for path, variable in __import__("flax").nnx.to_flat_state(engine.runner.params):
        value = variable.get_value()
        all_params += value.nbytes
        if path[0] != "layers":
            continue
        total += value.nbytes
        for shard in value.addressable_shards:
            per_device[str(shard.device)] = per_device.get(str(shard.device), 0) + shard.data.nbytes
    z = engine.runner.put_batch(np.zeros((4, 64), np.int32))
    hlo = engine.runner.step.lower(engine.runner.params, z, z, z).compile().as_text()
    report[f"{name}-{n}"] = {"mesh": dict(engine.runner.mesh.shape), "layer_bytes": total, "per_device": per_device,
                             "sites": list(engine.sites), "param_bytes": all_params,
                             "read_bytes": sum(b for b, _ in reads),
                             "largest_split_read": max([b / full for b, full in reads if b < full], default=None),
                             "all_gathers": hlo.count(" all-gather("),
                             "all_reduces": hlo.count(" all-reduce(") + hlo.count(" all-reduce-start(")}
errors = []
for model_dir, n in spec["refused"]:
    try:
        Engine(JobOptions(model=model_dir, sites=("blocks.0.hook_resid_post",), model_parallel=n))
        errors.append(None)
    except InputError as e:
        errors.append(str(e))
report["refused"] = errors
print(json.dumps(report))
"""


def four_cpu_devices_env() -> dict:
    return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mp")
    # 8 query / 4 key-value heads: every kind of head splits 1, 2 and 4 ways.
    gqa = make_tiny_model(tmp / "gqa", seed=7, layers=2, hidden=64, heads=8, kv_heads=4, intermediate=128)
    # 4 query / 2 key-value heads: at N = 4 the key/value heads are replicated.
    few_kv = make_tiny_model(tmp / "few_kv", seed=8, layers=2, hidden=64, heads=4, kv_heads=2, intermediate=96)
    odd = make_tiny_model(tmp / "odd", seed=9, layers=1, hidden=48, heads=6, kv_heads=2, intermediate=96)
    spec = {
        "out": str(tmp),
        "sites": SITES,
        "texts": TEXTS,
        "runs": [
            ("gqa", str(gqa), 1),
            ("gqa", str(gqa), 2),
            ("gqa", str(gqa), 4),
            ("few_kv", str(few_kv), 1),
            ("few_kv", str(few_kv), 4),
        ],
        "refused": [(str(odd), 4), (str(gqa), 3)],
    }
    r = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(spec)],
        env=four_cpu_devices_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    return tmp, report


def load(tmp: Path, key: str) -> dict:
    """One run's rows sorted by (sample, position): the packing, hence the batch order, depends on the mesh."""
    with np.load(tmp / f"{key}.npz") as z:
        order = np.lexsort((z["positions"], z["sample_ids"]))
        return {k: z[k][order] for k in z.files}


@pytest.mark.slow
@pytest.mark.parametrize("key", ["gqa-2", "gqa-4", "few_kv-4"])
def test_sharded_runs_store_the_unsharded_rows(runs, key):
    tmp, report = runs
    n = int(key.rsplit("-", 1)[1])
    assert report[key]["mesh"] == {"data": 4 // n, "model": n}
    got, want = load(tmp, key), load(tmp, key.rsplit("-", 1)[0] + "-1")
    assert report[key]["sites"] == report[key.rsplit("-", 1)[0] + "-1"]["sites"]
    for k in ("sample_ids", "positions", "token_ids"):
        np.testing.assert_array_equal(got[k], want[k])
    assert len(want["sample_ids"]) > 100
    for site in report[key]["sites"]:
        a, b = got[site], want[site]
        assert a.dtype == np.float32 and a.shape == b.shape
        err = np.linalg.norm(a - b, axis=-1) / np.maximum(np.linalg.norm(b, axis=-1), 1e-6)
        assert err.max() < 1e-5, (site, float(err.max()))


@pytest.mark.slow
def test_each_device_holds_about_one_nth_of_the_layer_weights(runs):
    _, report = runs
    total = report["gqa-1"]["layer_bytes"]
    assert set(report["gqa-1"]["per_device"].values()) == {total}  # N = 1: every device a whole copy
    for n in (2, 4):
        r = report[f"gqa-{n}"]
        assert r["layer_bytes"] == total and len(r["per_device"]) == 4
        for held in r["per_device"].values():
            # Only the norms' weights (2 x 64 floats a layer) are replicated: within 2% of 1/N.
            assert abs(held - total / n) / (total / n) < 0.02, (n, held, total)
    # Replicated key/value heads cost their bytes on every device, and nothing else does.
    r = report["few_kv-4"]
    d, kv, hd, layers = 64, 2, 16, 2
    replicated_kv = layers * 4 * (2 * d * kv * hd + 2 * kv * hd)
    split = r["layer_bytes"] - replicated_kv - layers * 4 * 2 * d
    for held in r["per_device"].values():
        assert held == split / 4 + replicated_kv + layers * 4 * 2 * d


@pytest.mark.slow
def test_weights_load_block_by_block_each_block_once(runs):
    """Loading reads each element of the checkpoint once whatever the device count (no host copy per device)
    and, split N ways, reads no split parameter in a block larger than 1/N of it (no whole copy anywhere)."""
    _, report = runs
    for key in ("gqa-1", "gqa-2", "gqa-4", "few_kv-4"):
        assert report[key]["read_bytes"] == report[key]["param_bytes"], key
    assert report["gqa-1"]["largest_split_read"] is None
    assert report["gqa-2"]["largest_split_read"] == 1 / 2
    assert report["gqa-4"]["largest_split_read"] == 1 / 4


@pytest.mark.slow
def test_the_split_forward_never_gathers_weights(runs):
    """Megatron-style: at N = 4 the forward pass all-reduces after o_proj and down_proj (and the embedding
    lookup) and never all-gathers anything, a weight least of all."""
    _, report = runs
    assert report["gqa-4"]["all_gathers"] == 0
    assert report["gqa-4"]["all_reduces"] >= 2 * 2 + 1  # two per layer, plus the vocab-split embedding lookup


@pytest.mark.slow
def test_resid_pre_is_the_previous_resid_post_bit_for_bit_when_sharded(runs):
    tmp, _ = runs
    got = load(tmp, "gqa-4")
    assert got["blocks.0.hook_resid_pre"].tobytes() == got["hook_embed"].tobytes()
    assert got["blocks.1.hook_resid_pre"].tobytes() == got["blocks.0.hook_resid_post"].tobytes()


@pytest.mark.slow
def test_impossible_splits_are_refused_naming_the_culprit(runs):
    _, report = runs
    heads, devices = report["refused"]
    assert heads is not None and "attention heads (6) is not a multiple of 4" in heads
    assert devices is not None and "model_parallel 3 must divide the number of devices (4)" in devices


def test_model_parallel_that_does_not_divide_the_devices_is_exit_2(tmp_path):
    model = make_tiny_model(tmp_path / "m")
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello"}\n')
    env = dict(os.environ, ACTFLEET_JAX_CACHE=str(tmp_path / "jaxcache"))
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
            str(tmp_path / "o"),
            "--model-parallel",
            "2",
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "model_parallel 2 must divide the number of devices (1)" in lines[0]
