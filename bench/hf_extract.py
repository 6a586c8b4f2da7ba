"""The peer of `actfleet extract` in bench/whole_process.py: a plain transformers script, as a researcher would
write it. Loads the model and tokenizer, tokenizes a JSONL file's "text" field, runs padded batches of
--batch consecutive rows with `output_hidden_states=True`, and saves every layer's resid_post (hidden_states[i+1]:
the output of layer i) for the real tokens as bfloat16 safetensors, one file per batch, with sample ids and
positions. No LM head (`AutoModel`: logits are not an activation), float32 compute, torch's default threads.

    python bench/hf_extract.py MODEL_DIR DATA.jsonl OUT_DIR [--batch 8]

Prints one JSON line: {"stored_tokens": N, "seconds_after_imports": S}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("data")
    ap.add_argument("out")
    ap.add_argument("--batch", type=int, default=8)
    a = ap.parse_args()

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoTokenizer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModel.from_pretrained(a.model, dtype=torch.float32).eval()
    texts = [json.loads(line)["text"] for line in Path(a.data).read_text().splitlines() if line.strip()]
    ids = tok(texts)["input_ids"]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stored = 0
    with torch.inference_mode():
        for lo in range(0, len(ids), a.batch):
            chunk = ids[lo : lo + a.batch]
            width = max(len(s) for s in chunk)
            x = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, s in enumerate(chunk):
                x[r, : len(s)] = torch.tensor(s)
                mask[r, : len(s)] = 1
            hs = model(input_ids=x, attention_mask=mask, output_hidden_states=True).hidden_states
            keep = mask.bool()
            tensors = {
                f"blocks.{i}.hook_resid_post": hs[i + 1][keep].to(torch.bfloat16).contiguous()
                for i in range(len(hs) - 1)
            }
            tensors["sample_ids"] = (torch.arange(lo, lo + len(chunk))[:, None].expand(-1, width))[keep].contiguous()
            tensors["positions"] = torch.arange(width)[None, :].expand(len(chunk), -1)[keep].contiguous()
            save_file(tensors, str(out / f"{lo // a.batch:06d}.safetensors"))
            stored += int(keep.sum())
    print(json.dumps({"stored_tokens": stored, "seconds_after_imports": round(time.perf_counter() - t0, 3)}))


if __name__ == "__main__":
    main()
