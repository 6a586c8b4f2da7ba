"""Per-device memory with the model split N ways (`model_parallel`), N = 1, 2, 4, side by side in one run.

Each N runs in a fresh child process (so nothing of another N is alive in it) on the same model and rows:
load the model (each parameter straight into its shards), extract one batch of rows, then report per device:
  params     bytes of parameter shards on the device (sum of addressable shards' nbytes)
  live       bytes of every live JAX array on the device after the batch (jax.live_arrays())
  temp       the compiled forward step's temporaries per device (XLA memory_analysis)
  peak       device.memory_stats()["peak_bytes_in_use"] where the backend has it (GPU, TPU; not CPU)
and the child's peak host RSS (no full host copy of the model per device: it should not grow with devices).

On CPU the devices are XLA's host-platform devices (--devices, default 4, via
XLA_FLAGS=--xla_force_host_platform_device_count); on a GPU/TPU host the real devices are used.

    .venv/bin/python bench/model_parallel_memory.py                       # 1.5B shape, 2 layers, CPU
    .venv/bin/python bench/model_parallel_memory.py --shape 3b --layers 4 --vocab 151936
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {  # name -> (hidden, heads, kv_heads, intermediate): the Qwen2.5 family's published configs
    "0.5b": (896, 14, 2, 4864),
    "1.5b": (1536, 12, 2, 8960),
    "3b": (2048, 16, 2, 11008),
    "7b": (3584, 28, 4, 18944),
}


def child(model_dir: str, n: int, rows: int, length: int, dtype: str) -> dict:
    import resource

    import jax
    import numpy as np
    from flax import nnx

    from actfleet.job_options import JobOptions
    from actfleet.worker.engine import Engine

    t = time.perf_counter()
    engine = Engine(
        JobOptions(
            model=model_dir,
            sites=("blocks.*.hook_resid_post",),
            positions="all",
            compute_dtype=dtype,
            store_dtype="bfloat16",
            batch_tokens=rows * length,
            model_parallel=n,
        )
    )
    jax.block_until_ready(engine.runner.params)
    load_s = time.perf_counter() - t
    params: dict[str, int] = {}
    for _, variable in nnx.to_flat_state(engine.runner.params):
        for shard in variable.get_value().addressable_shards:
            params[str(shard.device)] = params.get(str(shard.device), 0) + shard.data.nbytes
    rng = np.random.default_rng(0)
    seqs = [(i, rng.integers(0, 256, length).astype(np.int32), None) for i in range(rows)]
    t = time.perf_counter()
    stored = sum(b.stored_tokens for b in engine.run_tokens(seqs))
    run_s = time.perf_counter() - t
    live: dict[str, int] = {}
    seen = set()  # a shard's .data is itself a live array over the same buffer: count each buffer once
    for a in jax.live_arrays():
        for shard in a.addressable_shards:
            key = (str(shard.device), shard.data.unsafe_buffer_pointer())
            if key not in seen:
                seen.add(key)
                live[str(shard.device)] = live.get(str(shard.device), 0) + shard.data.nbytes
    z = engine.runner.put_batch(
        np.zeros((rows // engine.runner.data_devices * engine.runner.data_devices or 1, length), np.int32)
    )
    mem = engine.runner.step.lower(engine.runner.params, z, z, z).compile().memory_analysis()
    stats = [d.memory_stats() or {} for d in engine.runner.devices]
    return {
        "n": n,
        "mesh": dict(engine.runner.mesh.shape),
        "params": params,
        "live": live,
        "temp": getattr(mem, "temp_size_in_bytes", None),
        "peak": [s.get("peak_bytes_in_use") for s in stats],
        "host_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "load_s": load_s,
        "run_s": run_s,
        "stored": stored,
    }


def mib(x) -> str:
    return "-" if x is None else f"{x / 2**20:,.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1.5b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=32768, help="vocabulary rows (151,936 for the real Qwen2.5)")
    ap.add_argument("--splits", default="1,2,4", help="the N to compare")
    ap.add_argument("--devices", type=int, default=4, help="CPU only: XLA host-platform devices")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--child", nargs=2, metavar=("MODEL_DIR", "N"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], int(a.child[1]), a.rows, a.length, a.dtype)))
        return

    from actfleet.demo.tiny_model import make_tiny_model

    hidden, heads, kv_heads, intermediate = SHAPES[a.shape]
    env = dict(os.environ)
    if env.get("JAX_PLATFORMS", "cpu") == "cpu":
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={a.devices}")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_model(
            Path(tmp) / "m",
            layers=a.layers,
            hidden=hidden,
            heads=heads,
            kv_heads=kv_heads,
            intermediate=intermediate,
            vocab=a.vocab,
            tie=True,
            max_pos=32768,
        )
        weights = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
        print(
            f"model: Qwen2.5-{a.shape} shape, {a.layers} layers, vocab {a.vocab:,}; checkpoint {mib(weights)} MiB "
            f"(float32); compute {a.dtype}; one batch of {a.rows} x {a.length} tokens, resid_post of every layer"
        )
        results = []
        for n in [int(x) for x in a.splits.split(",")]:
            r = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    str(model_dir),
                    str(n),
                    "--rows",
                    str(a.rows),
                    "--length",
                    str(a.length),
                    "--dtype",
                    a.dtype,
                ],
                env=env,
                capture_output=True,
                text=True,
            )
            if r.returncode:
                print(f"N={n}: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
                continue
            results.append(json.loads(r.stdout.strip().splitlines()[-1]))
    if not results:
        return
    base = max(results[0]["params"].values())
    print(
        f"\n{'N':>3} {'mesh':>16} {'params/dev MiB':>15} {'vs N=1':>7} {'live/dev MiB':>13} {'step temp MiB':>14} "
        f"{'peak/dev MiB':>13} {'host RSS MiB':>13} {'load s':>7} {'batch s':>8}"
    )
    for r in results:
        p = max(r["params"].values())
        peaks = [x for x in r["peak"] if x is not None]
        mesh = f"data {r['mesh']['data']} x model {r['mesh']['model']}"
        print(
            f"{r['n']:>3} {mesh:>16} {mib(p):>15} {p / base:>7.3f} {mib(max(r['live'].values())):>13} "
            f"{mib(r['temp']):>14} {mib(max(peaks) if peaks else None):>13} {mib(r['host_rss']):>13} "
            f"{r['load_s']:>7.1f} {r['run_s']:>8.1f}"
        )


if __name__ == "__main__":
    main()
