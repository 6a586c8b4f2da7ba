"""Hugging Face safetensors checkpoint -> the parameters of actfleet.worker.models.qwen2, each straight into its shards.

Reads `model.safetensors` or the shards listed in `model.safetensors.index.json`, memory-mapped, and only
the tensors the model's parameters need (the LM head and final norm are never read). Each parameter is built
with `jax.make_array_from_callback`: for every device's index into the parameter, only that block of the
checkpoint tensor is read from the mapped file, converted and handed to the device. No device and no host
buffer ever holds a split parameter whole; a replicated one is converted once and copied to each device.

Layouts: torch stores a linear layer's weight [out, in]; ours are [in, out] with heads as their own axis
(see the qwen2 module docstring). `LAYOUTS` says, per parameter, how our array is the checkpoint tensor
reshaped (`split`: each checkpoint axis as a tuple of our sizes' names) and transposed (`order`).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Callable

import numpy as np

from actfleet.worker.models.qwen2 import Config
from actfleet.worker.shards import ShardFormatError, open_file

# our parameter path (under layers.{i}. for layer params) -> (HF name, split, order).
# split: the checkpoint tensor's axes, each a tuple of dimension names whose product is its length;
# order: our axes as names. "h"/"k" heads/kv heads, "e" head_dim, "d" hidden, "f" intermediate, "v" vocab.
LAYOUTS: dict[str, tuple[str, tuple[tuple[str, ...], ...], str]] = {
    "embed.table": ("model.embed_tokens.weight", (("v",), ("d",)), "vd"),
    "ln1.weight": ("input_layernorm.weight", (("d",),), "d"),
    "ln2.weight": ("post_attention_layernorm.weight", (("d",),), "d"),
    "attn.wq": ("self_attn.q_proj.weight", (("h", "e"), ("d",)), "dhe"),
    "attn.wk": ("self_attn.k_proj.weight", (("k", "e"), ("d",)), "dke"),
    "attn.wv": ("self_attn.v_proj.weight", (("k", "e"), ("d",)), "dke"),
    "attn.bq": ("self_attn.q_proj.bias", (("h", "e"),), "he"),
    "attn.bk": ("self_attn.k_proj.bias", (("k", "e"),), "ke"),
    "attn.bv": ("self_attn.v_proj.bias", (("k", "e"),), "ke"),
    "attn.wo": ("self_attn.o_proj.weight", (("d",), ("h", "e")), "hed"),
    "attn.q_norm.weight": ("self_attn.q_norm.weight", (("e",),), "e"),
    "attn.k_norm.weight": ("self_attn.k_norm.weight", (("e",),), "e"),
    "mlp.w_gate": ("mlp.gate_proj.weight", (("f",), ("d",)), "df"),
    "mlp.w_up": ("mlp.up_proj.weight", (("f",), ("d",)), "df"),
    "mlp.w_down": ("mlp.down_proj.weight", (("d",), ("f",)), "fd"),
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


def hf_source(path: tuple, layouts=LAYOUTS, hf_layer="model.layers.{i}.") -> tuple[str, tuple[tuple[str, ...], ...], str]:
    """Our parameter path, e.g. ("layers", 3, "attn", "wq"), -> (HF tensor name, split, order)."""
    if path[0] == "layers":
        hf, split, order = layouts[".".join(map(str, path[2:]))]
        return hf_layer.format(i=path[1]) + hf, split, order
    return layouts[".".join(map(str, path))]


def read_block(tensor: np.ndarray, split, order: str, sizes: dict[str, int], index: tuple[slice, ...], dtype):
    """The block `index` (slices over our axes) of our view of the checkpoint `tensor`, as a fresh array.

    Only the rows/columns the block covers are read: for a checkpoint axis split into (outer, inner...), the
    block's outer range is one contiguous range of that axis; inner slices are taken after the reshape."""
    ours = {name: index[i].indices(sizes[name]) for i, name in enumerate(order)}  # name -> (start, stop, step)
    outer, inner = [], []
    for names in split:
        rest = int(np.prod([sizes[n] for n in names[1:]], dtype=np.int64))
        start, stop, _ = ours[names[0]]
        outer.append(slice(start * rest, stop * rest))
        inner += [slice(None)] + [slice(*ours[n][:2]) for n in names[1:]]
    block = tensor[tuple(outer)]
    block = block.reshape([ours[n][1] - ours[n][0] if i == 0 else sizes[n]
                           for names in split for i, n in enumerate(names)])[tuple(inner)]
    flat_names = [n for names in split for n in names]
    return np.ascontiguousarray(block.transpose([flat_names.index(n) for n in order])).astype(dtype, copy=False)


def load_state(model_dir: str | Path, cfg: Config, abstract_state, sharding_of: Callable):
    """Fill `abstract_state` (nnx.split of a model built under nnx.eval_shape) from the checkpoint.

    `sharding_of(variable)` gives each parameter's jax.sharding.Sharding. Returns the State of jax Arrays."""
    import jax
    from flax import nnx

    model_dir = Path(model_dir)
    files = weight_files(model_dir)
    opened: dict[Path, dict] = {}
    sizes = {"v": cfg.vocab, "d": cfg.hidden, "h": cfg.heads, "k": cfg.kv_heads, "e": cfg.head_dim,
             "f": cfg.intermediate}
    # Interim (engineer `families` makes this module generic): a family module with its own LAYOUTS.
    family = importlib.import_module(type(cfg).__module__)
    layouts, hf_layer = getattr(family, "LAYOUTS", LAYOUTS), getattr(family, "HF_LAYER", "model.layers.{i}.")

    def tensor(name: str, split) -> np.ndarray:
        if name not in files:
            raise CheckpointError(f"{model_dir}: checkpoint has no tensor {name}")
        path = files[name]
        if path not in opened:
            try:
                opened[path] = open_file(path)[0]
            except (ShardFormatError, OSError) as e:
                raise CheckpointError(f"{path}: unreadable ({e})") from None
        arr = opened[path][name]  # a view of the mapped file: nothing is read yet
        want = tuple(int(np.prod([sizes[n] for n in names])) for names in split)
        if arr.shape != want:
            raise CheckpointError(f"{path}: {name} has shape {list(arr.shape)}, config says {list(want)}")
        return arr

    flat = []
    for path, variable in nnx.to_flat_state(abstract_state):
        name, split, order = hf_source(path, layouts, hf_layer)
        src = tensor(name, split)
        shape, dtype = variable.get_value().shape, variable.get_value().dtype
        assert shape == tuple(sizes[n] for n in order), (path, shape, order)
        blocks: dict[tuple, np.ndarray] = {}  # a replicated parameter: converted once, copied to every device

        def block(index, src=src, split=split, order=order, dtype=dtype, shape=shape, blocks=blocks):
            key = tuple(s.indices(n)[:2] for s, n in zip(index, shape))
            if key not in blocks:
                blocks[key] = read_block(src, split, order, sizes, index, dtype)
            return blocks[key]

        array = jax.make_array_from_callback(shape, sharding_of(variable), block)
        flat.append((path, variable.replace(array)))
    return nnx.from_flat_state(flat)
