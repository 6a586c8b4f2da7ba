"""actfleet's JAX extractor vs transformers, side by side in one run, on the same rows and capture sites.

Model: Qwen2.5-0.5B's shape (vocab 151,936, hidden 896, intermediate 4,864, 24 layers, 14 heads, 2 KV heads)
with random weights, written offline by actfleet.demo.tiny_model. Sites: resid_post of every layer (what
`output_hidden_states=True` gives transformers; both store the same tokens: all real tokens, no padding).

Two workloads: "mixed" (lognormal lengths, median a quarter of --max-len, capped at --max-len) and "equal"
(every row --max-len / 2 tokens). transformers runs `Qwen2Model` (no LM head, so it does not pay for logits
actfleet never computes) in float32, batches of --hf-batch consecutive rows padded to the longest, and copies
each layer's real-token rows to numpy. actfleet runs Engine.run over all rows (float32 compute, bfloat16
store, its default). Each side gets one warm-up pass (XLA compilation / torch first-call costs are reported
separately) and then --repeat timed passes, interleaved with the other side's; the best of each is reported. Figures: useful (stored, non-padding) tokens per second, the ratio, and
actfleet's padding fraction.

On a GPU (--device gpu) both sides run there in --dtype (bfloat16 is what one would use; transformers with
its SDPA attention), and the script also reports model FLOPs utilisation: useful FLOPs (matrix products of
the layers computed plus causal attention over each sequence's own tokens, no padding, no LM head) per
second over the peak of a large matrix product in that dtype on that device, measured in the same run.

    .venv/bin/python bench/extract_vs_hf.py                      # defaults: a few minutes on 2 CPU cores
    .venv/bin/python bench/extract_vs_hf.py --rows 256 --max-len 1024 --layers 24
    python3 bench/extract_vs_hf.py --device gpu --dtype bfloat16 --rows 2048 --max-len 1024 \
        --batch-tokens 65536 --hf-batch 32 --sites last         # one H100/H200
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHAPES = {  # name -> (hidden, heads, kv_heads, intermediate, layers): the Qwen2.5 family's published configs
    "0.5b": (896, 14, 2, 4864, 24),
    "1.5b": (1536, 12, 2, 8960, 28),
    "3b": (2048, 16, 2, 11008, 36),
}


def lengths_for(kind: str, rows: int, max_len: int, seed: int) -> list[int]:
    if kind == "equal":
        return [max_len // 2] * rows
    rng = np.random.default_rng(seed)
    # lognormal with median max_len/4 (sigma 1: a realistic long tail), clipped to [1, max_len]
    return np.clip(np.round(rng.lognormal(np.log(max_len / 4), 1.0, rows)), 1, max_len).astype(int).tolist()


def token_rows(lengths, vocab_used: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed + 1)
    return [rng.integers(0, vocab_used, n).astype(np.int32) for n in lengths]


def run_actfleet(engine, seqs):
    """Engine.run_tokens on pre-tokenized rows (tokenization is the same for both sides, so it is left out)."""
    stored = computed = padded = 0
    for batch in engine.run_tokens([(i, s, None) for i, s in enumerate(seqs)]):
        stored += batch.stored_tokens
        computed += batch.computed_tokens
        padded += batch.padded_tokens
        for a in batch.acts.values():
            assert a.shape[0] == batch.stored_tokens
    return stored, padded / max(1, computed)


def run_hf(model, seqs, batch_rows: int, keep_layers):
    import torch

    dev = next(model.parameters()).device
    stored = 0
    with torch.inference_mode():
        for lo in range(0, len(seqs), batch_rows):
            chunk = seqs[lo : lo + batch_rows]
            width = max(len(s) for s in chunk)
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, s in enumerate(chunk):
                ids[r, : len(s)] = torch.from_numpy(s.astype(np.int64))
                mask[r, : len(s)] = 1
            ids, mask = ids.to(dev), mask.to(dev)
            hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
            keep = mask.bool()
            for i in keep_layers:  # hs[i + 1] is layer i's resid_post (HF's last one is after the final norm)
                hs[i + 1][keep].to(torch.bfloat16).view(torch.int16).cpu().numpy()  # bf16 rows on the host
            stored += int(keep.sum())
    return stored


def flops_per_pass(lengths, hidden, heads, kv_heads, intermediate, layers) -> float:
    """Useful forward FLOPs: 2 per multiply-add in the layers' matrix products, plus causal attention
    (QK^T and PV, 2 * 2 * head_dim * heads per visible key) over each sequence's own tokens."""
    hd = hidden // heads
    per_token_matmul = (
        2 * layers * (hidden * (heads + 2 * kv_heads) * hd + heads * hd * hidden + 3 * hidden * intermediate)
    )
    visible_keys = sum(n * (n + 1) / 2 for n in lengths)  # token i sees i+1 keys of its own sequence
    return per_token_matmul * sum(lengths) + 4 * heads * hd * layers * visible_keys


def matmul_peak(device: str, dtype) -> float:
    """FLOP/s of a large square matrix product in `dtype` on `device` (the ceiling MFU is measured against)."""
    import torch

    n = 8192 if device == "cuda" else 2048
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)  # random, not zeros: zeros run faster
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    reps = 20 if device == "cuda" else 3
    for _ in range(3):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def dense_attention(q, k, v, segment_ids, positions, *, block=None):
    """The S x S masked attention (XLA's own fused version where it has one): a diagnostic peer only."""
    import jax
    import jax.numpy as jnp

    t = q.shape[1]
    idx = jnp.arange(t)
    mask = (idx[None, :] <= idx[:, None])[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=48)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="0.5b", help="Qwen2.5 model shape")
    ap.add_argument("--layers", type=int, default=0, help="decoder layers (0: the shape's own)")
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype, both sides")
    ap.add_argument(
        "--sites",
        choices=("all", "last"),
        default="all",
        help="resid_post of every layer, or of the last layer only (what an SAE on one layer needs)",
    )
    ap.add_argument("--batch-tokens", type=int, default=4096, help="actfleet tokens per batch")
    ap.add_argument("--hf-batch", type=int, default=8, help="transformers rows per padded batch")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--repeat", type=int, default=2, help="timed passes per side (interleaved; best is reported)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workloads", default="mixed,equal")
    ap.add_argument(
        "--attention",
        choices=("blockwise", "dense"),
        default="blockwise",
        help="diagnostic: swap actfleet's blockwise attention for a dense masked S x S one",
    )
    a = ap.parse_args()

    if a.device == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    else:  # share the card with torch: JAX would otherwise take 75% of its memory up front
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
    import torch
    from transformers import AutoModel

    from actfleet.demo.tiny_model import make_tiny_model
    from actfleet.job_options import JobOptions
    from actfleet.worker.engine import Engine

    if a.threads:
        torch.set_num_threads(a.threads)
    if a.attention == "dense":
        import actfleet.worker.models.qwen2 as qwen2

        qwen2.attention = dense_attention
    hidden, heads, kv_heads, intermediate, layers = SHAPES[a.shape]
    layers = a.layers or layers
    tdev = "cuda" if a.device == "gpu" else "cpu"
    tdtype = getattr(torch, a.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        model_dir = make_tiny_model(
            Path(tmp) / f"qwen2.5-{a.shape}-shape",
            layers=layers,
            hidden=hidden,
            heads=heads,
            kv_heads=kv_heads,
            intermediate=intermediate,
            vocab=a.vocab,
            tie=True,
            max_pos=32768,
        )
        print(
            f"model: Qwen2.5-{a.shape} shape, {layers} layers, random weights, "
            f"written in {time.perf_counter() - t:.1f} s"
        )
        keep_layers = list(range(layers)) if a.sites == "all" else [layers - 1]
        sites = tuple(f"blocks.{i}.hook_resid_post" for i in keep_layers)
        engine = Engine(
            JobOptions(
                model=str(model_dir),
                sites=sites,
                positions="all",
                compute_dtype=a.dtype,
                store_dtype="bfloat16",
                batch_tokens=a.batch_tokens,
                max_seq=a.max_len,
            )
        )
        hf = AutoModel.from_pretrained(model_dir, dtype=tdtype, attn_implementation="sdpa").to(tdev).eval()
        peak = matmul_peak(tdev, tdtype)
        print(
            f"device {a.device} ({torch.cuda.get_device_name() if tdev == 'cuda' else 'host CPU'}); "
            f"compute {a.dtype}; sites: resid_post x {len(keep_layers)} of {layers} layers; "
            f"torch threads {torch.get_num_threads()}; jax devices {engine.devices}"
        )
        print(f"measured {a.dtype} matrix-product peak: {peak / 1e12:.1f} TFLOP/s")

        for kind in a.workloads.split(","):
            lengths = lengths_for(kind, a.rows, a.max_len, a.seed)
            seqs = token_rows(lengths, 300, a.seed)
            (_, _), warm_af = timed(run_actfleet, engine, seqs)
            _, warm_hf = timed(run_hf, hf, seqs, a.hf_batch, keep_layers)
            t_af = t_hf = float("inf")
            for _ in range(a.repeat):  # interleaved, best of N: other load on the machine hits both sides alike
                (stored_af, pad), t = timed(run_actfleet, engine, seqs)
                t_af = min(t_af, t)
                stored_hf, t = timed(run_hf, hf, seqs, a.hf_batch, keep_layers)
                t_hf = min(t_hf, t)
            assert stored_af == stored_hf == sum(lengths)
            af, hfr = stored_af / t_af, stored_hf / t_hf
            flops = flops_per_pass(lengths, hidden, heads, kv_heads, intermediate, layers)
            hf_pad = 1 - sum(lengths) / sum(
                max(lengths[i : i + a.hf_batch]) * len(lengths[i : i + a.hf_batch])
                for i in range(0, len(lengths), a.hf_batch)
            )
            print(
                f"\n[{kind}] {a.rows} rows, {sum(lengths)} tokens, lengths median {int(np.median(lengths))} "
                f"max {max(lengths)}; {flops / sum(lengths) / 1e9:.2f} GFLOP per token"
            )
            print(
                f"  actfleet      {af:10.1f} tok/s  ({t_af:.2f} s; first pass incl. compile {warm_af:.1f} s); "
                f"padding {pad:.1%}; MFU {flops / t_af / peak:.1%}"
            )
            print(
                f"  transformers  {hfr:10.1f} tok/s  ({t_hf:.2f} s; first pass {warm_hf:.1f} s); "
                f"padding {hf_pad:.1%}; MFU {flops / t_hf / peak:.1%}"
            )
            print(f"  ratio actfleet / transformers: {af / hfr:.2f}x")


if __name__ == "__main__":
    main()
