"""actfleet's JAX extractor vs transformers, side by side in one run, on the same rows and capture sites.

Model: Qwen2.5-0.5B's shape (vocab 151,936, hidden 896, intermediate 4,864, 24 layers, 14 heads, 2 KV heads)
with random weights, written offline by worker.tiny_model. Sites: resid_post of every layer (what
`output_hidden_states=True` gives transformers; both store the same tokens: all real tokens, no padding).

Two workloads: "mixed" (lognormal lengths, median a quarter of --max-len, capped at --max-len) and "equal"
(every row --max-len / 2 tokens). transformers runs `Qwen2Model` (no LM head, so it does not pay for logits
actfleet never computes) in float32, batches of --hf-batch consecutive rows padded to the longest, and copies
each layer's real-token rows to numpy. actfleet runs Engine.run over all rows (float32 compute, bfloat16
store, its default). Each side gets one warm-up pass (XLA compilation / torch first-call costs are reported
separately) and then --repeat timed passes, interleaved with the other side's; the best of each is reported. Figures: useful (stored, non-padding) tokens per second, the ratio, and
actfleet's padding fraction.

    .venv/bin/python bench/extract_vs_hf.py                      # defaults: a few minutes on 2 CPU cores
    .venv/bin/python bench/extract_vs_hf.py --rows 256 --max-len 1024 --layers 24
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


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


def run_hf(model, seqs, batch_rows: int):
    import torch

    stored = 0
    with torch.inference_mode():
        for lo in range(0, len(seqs), batch_rows):
            chunk = seqs[lo: lo + batch_rows]
            width = max(len(s) for s in chunk)
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, s in enumerate(chunk):
                ids[r, : len(s)] = torch.from_numpy(s.astype(np.int64))
                mask[r, : len(s)] = 1
            hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
            keep = mask.bool()
            for layer in hs[1:]:  # resid_post of each layer (HF's last one is after the final norm)
                layer[keep].to(torch.bfloat16).view(torch.int16).numpy()  # bf16 rows on the host, like actfleet's
            stored += int(keep.sum())
    return stored


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=48)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--layers", type=int, default=24, help="decoder layers (Qwen2.5-0.5B: 24)")
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--batch-tokens", type=int, default=4096, help="actfleet tokens per batch")
    ap.add_argument("--hf-batch", type=int, default=8, help="transformers rows per padded batch")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--repeat", type=int, default=2, help="timed passes per side (interleaved; best is reported)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workloads", default="mixed,equal")
    a = ap.parse_args()

    import torch
    from transformers import AutoModel

    from worker.engine import Engine, ExtractOptions
    from worker.tiny_model import make_tiny_model

    if a.threads:
        torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        model_dir = make_tiny_model(Path(tmp) / "qwen2.5-0.5b-shape", layers=a.layers, hidden=896, heads=14,
                                    kv_heads=2, intermediate=4864, vocab=a.vocab, tie=True, max_pos=32768)
        print(f"model: Qwen2.5-0.5B shape, {a.layers} layers, random weights, written in {time.perf_counter() - t:.1f} s")
        sites = ("blocks.*.hook_resid_post",)
        engine = Engine(str(model_dir), ExtractOptions(sites=sites, positions="all", compute_dtype="float32",
                                                       store_dtype="bfloat16", batch_tokens=a.batch_tokens,
                                                       max_seq=a.max_len))
        hf = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
        print(f"sites: resid_post x {a.layers} layers; torch threads {torch.get_num_threads()}; "
              f"jax devices {len(engine.devices)}")

        for kind in a.workloads.split(","):
            lengths = lengths_for(kind, a.rows, a.max_len, a.seed)
            seqs = token_rows(lengths, 300, a.seed)
            (_, _), warm_af = timed(run_actfleet, engine, seqs)
            _, warm_hf = timed(run_hf, hf, seqs, a.hf_batch)
            t_af = t_hf = float("inf")
            for _ in range(a.repeat):  # interleaved, best of N: other load on the machine hits both sides alike
                (stored_af, pad), t = timed(run_actfleet, engine, seqs)
                t_af = min(t_af, t)
                stored_hf, t = timed(run_hf, hf, seqs, a.hf_batch)
                t_hf = min(t_hf, t)
            assert stored_af == stored_hf == sum(lengths)
            af, hfr = stored_af / t_af, stored_hf / t_hf
            print(f"\n[{kind}] {a.rows} rows, {sum(lengths)} tokens, lengths median {int(np.median(lengths))} "
                  f"max {max(lengths)}")
            print(f"  actfleet      {af:10.1f} tok/s  ({t_af:.1f} s; first pass incl. compile {warm_af:.1f} s); "
                  f"padding {pad:.1%}")
            print(f"  transformers  {hfr:10.1f} tok/s  ({t_hf:.1f} s; first pass {warm_hf:.1f} s); "
                  f"padding {1 - sum(lengths) / sum(max(lengths[i:i + a.hf_batch]) * len(lengths[i:i + a.hf_batch]) for i in range(0, len(lengths), a.hf_batch)):.1%}")
            print(f"  ratio actfleet / transformers: {af / hfr:.2f}x")


if __name__ == "__main__":
    main()
