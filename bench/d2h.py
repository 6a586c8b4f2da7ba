"""Device-to-host copy rate of one batch's activations, JAX vs torch, side by side on one accelerator.

Every-layer capture moves 2 * hidden bytes per token per layer to the host (Qwen2.5-0.5B, 24 layers: 43 KB
per token), so on a GPU this copy, not the forward pass, can bound extraction. The figure is GB/s of a
[sites, tokens, hidden] bfloat16 array copied to a numpy array, fresh on the device for every copy.

    python3 bench/d2h.py --sites 24 --tokens 32768 --hidden 896
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")


def best_rate(copy, make, nbytes: int, reps: int) -> float:
    best = float("inf")
    for _ in range(reps + 1):  # the first is a warm-up
        x = make()
        t = time.perf_counter()
        copy(x)
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in {"sites": 24, "tokens": 32768, "hidden": 896, "reps": 5}.items():
        ap.add_argument(f"--{name}", type=int, default=default)
    a = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    shape = (a.sites, a.tokens, a.hidden)
    nbytes = 2 * a.sites * a.tokens * a.hidden
    key = [jax.random.key(0)]

    def make_jax():
        key[0], k = jax.random.split(key[0])
        return jax.block_until_ready(jax.random.normal(k, shape, jnp.bfloat16))

    def make_torch():
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        torch.cuda.synchronize()
        return x

    def jax_async(x):
        x.copy_to_host_async()
        return np.asarray(x)

    rates = {
        "jax np.asarray": best_rate(np.asarray, make_jax, nbytes, a.reps),
        "jax copy_to_host_async + np.asarray": best_rate(jax_async, make_jax, nbytes, a.reps),
        "jax per-site arrays, async": best_rate(
            lambda xs: [jax_async(x) for x in xs], lambda: list(make_jax()), nbytes, a.reps
        ),
        "torch .cpu().numpy()": best_rate(lambda x: x.cpu().view(torch.int16).numpy(), make_torch, nbytes, a.reps),
        "torch pinned non_blocking": best_rate(
            lambda x: (
                torch.empty(shape, dtype=torch.bfloat16, pin_memory=True).copy_(x, non_blocking=True),
                torch.cuda.synchronize(),
            ),
            make_torch,
            nbytes,
            a.reps,
        ),
    }
    print(f"{a.sites} x {a.tokens} x {a.hidden} bfloat16 = {nbytes / 1e9:.2f} GB per copy; jax {jax.devices()[0]}")
    for name, r in rates.items():
        print(f"  {name:40s} {r:6.1f} GB/s")
    print(
        f"  ratio jax async / torch .cpu(): {rates['jax copy_to_host_async + np.asarray'] / rates['torch .cpu().numpy()']:.2f}x"
    )


if __name__ == "__main__":
    main()
