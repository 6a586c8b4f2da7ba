"""Hugging Face safetensors checkpoint -> the weights pytree of actfleet.worker.models.qwen2 (numpy, then device).

Reads `model.safetensors` or the shards listed in `model.safetensors.index.json`, memory-mapped, and only
the tensors the requested layers need (the LM head and final norm are never loaded). Linear weights are
transposed from torch's [out, in] to [in, out] so the forward pass is `x @ w`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from actfleet.worker.models.qwen2 import Config
from actfleet.worker.shards import ShardFormatError, open_file

_LAYER_KEYS = {  # ours: (HF name under model.layers.{i}., transpose)
    "ln1": ("input_layernorm.weight", False),
    "wq": ("self_attn.q_proj.weight", True), "bq": ("self_attn.q_proj.bias", False),
    "wk": ("self_attn.k_proj.weight", True), "bk": ("self_attn.k_proj.bias", False),
    "wv": ("self_attn.v_proj.weight", True), "bv": ("self_attn.v_proj.bias", False),
    "wo": ("self_attn.o_proj.weight", True),
    "q_norm": ("self_attn.q_norm.weight", False), "k_norm": ("self_attn.k_norm.weight", False),
    "ln2": ("post_attention_layernorm.weight", False),
    "w_gate": ("mlp.gate_proj.weight", True), "w_up": ("mlp.up_proj.weight", True),
    "w_down": ("mlp.down_proj.weight", True),
}


class CheckpointError(ValueError):
    """The checkpoint is missing a tensor or a file, or a tensor has the wrong shape."""


def weight_files(model_dir: Path) -> dict[str, Path]:
    """HF tensor name -> the file holding it."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        return {name: model_dir / file for name, file in weight_map.items()}
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")
    try:
        tensors, _ = open_file(single)
    except (ShardFormatError, OSError) as e:
        raise CheckpointError(f"{single}: unreadable ({e})") from None
    return {name: single for name in tensors}


def load_weights(model_dir: str | Path, cfg: Config, *, n_layers: int, dtype=np.float32) -> dict:
    """The pytree for embeddings and the first `n_layers` decoder layers, as numpy arrays of `dtype`."""
    model_dir = Path(model_dir)
    files = weight_files(model_dir)
    opened: dict[Path, dict] = {}

    def get(name: str, shape: tuple, transpose: bool) -> np.ndarray:
        if name not in files:
            raise CheckpointError(f"{model_dir}: checkpoint has no tensor {name}")
        path = files[name]
        if path not in opened:
            try:
                opened[path] = open_file(path)[0]
            except (ShardFormatError, OSError) as e:
                raise CheckpointError(f"{path}: unreadable ({e})") from None
        arr = opened[path][name]
        arr = arr.T if transpose else arr
        if arr.shape != shape:
            raise CheckpointError(f"{path}: {name} has shape {list(arr.shape)}, config says {list(shape)}")
        return np.asarray(arr, dtype=dtype)

    d, hd, i = cfg.hidden, cfg.head_dim, cfg.intermediate
    shapes = {"ln1": (d,), "wq": (d, cfg.heads * hd), "bq": (cfg.heads * hd,), "wk": (d, cfg.kv_heads * hd),
              "bk": (cfg.kv_heads * hd,), "wv": (d, cfg.kv_heads * hd), "bv": (cfg.kv_heads * hd,),
              "wo": (cfg.heads * hd, d), "q_norm": (hd,), "k_norm": (hd,), "ln2": (d,), "w_gate": (d, i),
              "w_up": (d, i), "w_down": (i, d)}
    wanted = [k for k in _LAYER_KEYS if (cfg.qkv_bias or k not in ("bq", "bk", "bv"))
              and (cfg.qk_norm or k not in ("q_norm", "k_norm"))]
    layers = []
    for li in range(n_layers):
        layers.append({k: get(f"model.layers.{li}.{_LAYER_KEYS[k][0]}", shapes[k], _LAYER_KEYS[k][1]) for k in wanted})
    return {"embed": get("model.embed_tokens.weight", (cfg.vocab, d), False), "layers": layers}
