"""Hugging Face safetensors checkpoint -> a model family's parameters, each straight into its shards.

Reads `model.safetensors` or the shards listed in `model.safetensors.index.json`, memory-mapped, and only
the tensors the model's parameters need. Each parameter is built with `jax.make_array_from_callback`: for
every device's index into the parameter, only that block of the checkpoint tensor is read from the mapped
file, converted and handed to the device. No device and no host buffer ever holds a split parameter whole;
a replicated one is converted once and copied to each device.

The family module (actfleet.worker.models) says where each parameter comes from: `LAYOUTS` maps our
parameter path (layer params without "layers.{i}.") to (HF name, split, order[, fixed]): `split` is the
checkpoint tensor's axes, each a tuple of dimension names (`sizes(cfg)`) whose product is its length, `order`
our axes as names, and `fixed` {name: index} picks one slice of a fused tensor along a dimension that is not
ours (GPT-2's c_attn and NeoX's query_key_value hold q, k and v in one tensor; a dimension "3" picks one).
A transposed layout (GPT-2's Conv1D stores [in, out], torch's Linear [out, in]) is only a different `split`.
`HF_LAYER` is layer i's name prefix; `UNUSED` the regexes of tensors known to be unneeded (the LM head ...).
Every other tensor of the checkpoint that the full model would not read is a CheckpointError naming it:
a bias or norm the config does not announce is a model this code would compute wrongly.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from typing import Callable

import numpy as np

from actfleet.worker.shards import ShardFormatError, open_file


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


def hf_source(path: tuple, family=None) -> tuple[str, tuple[tuple[str, ...], ...], str, dict]:
    """Our parameter path, e.g. ("layers", 3, "attn", "wq"), -> (HF tensor name, split, order, fixed)."""
    family = family or importlib.import_module("actfleet.worker.models.qwen2")
    if path[0] == "layers":
        hf, split, order, *fixed = family.LAYOUTS[".".join(map(str, path[2:]))]
        return family.HF_LAYER.format(i=path[1]) + hf, split, order, (fixed[0] if fixed else {})
    hf, split, order, *fixed = family.LAYOUTS[".".join(map(str, path))]
    return hf, split, order, (fixed[0] if fixed else {})


def read_block(
    tensor: np.ndarray,
    split,
    order: str,
    sizes: dict[str, int],
    index: tuple[slice, ...],
    dtype,
    fixed: dict[str, int] | None = None,
):
    """The block `index` (slices over our axes) of our view of the checkpoint `tensor`, as a fresh array.

    Only the rows/columns the block covers are read: for a checkpoint axis split into (outer, inner...), the
    block's outer range is one contiguous range of that axis; inner slices are taken after the reshape.
    `fixed` dimensions (not ours) are cut to their one index and dropped."""
    fixed = fixed or {}
    ours = {name: index[i].indices(sizes[name]) for i, name in enumerate(order)}  # name -> (start, stop, step)
    ours.update({name: (j, j + 1, 1) for name, j in fixed.items()})
    outer, inner = [], []
    for names in split:
        rest = int(np.prod([sizes[n] for n in names[1:]], dtype=np.int64))
        start, stop, _ = ours[names[0]]
        outer.append(slice(start * rest, stop * rest))
        inner += [slice(None)] + [slice(*ours[n][:2]) for n in names[1:]]
    block = tensor[tuple(outer)]
    block = block.reshape(
        [ours[n][1] - ours[n][0] if i == 0 else sizes[n] for names in split for i, n in enumerate(names)]
    )[tuple(inner)]
    flat_names = [n for names in split for n in names]
    block = block.transpose([flat_names.index(n) for n in (*fixed, *order)])
    block = block.reshape(block.shape[len(fixed) :])
    return np.ascontiguousarray(block).astype(dtype, copy=False)


def family_of(cfg):
    """The family module that defines `cfg`'s Config class."""
    return importlib.import_module(type(cfg).__module__)


def check_all_read(names, expected: set[str], family, where) -> None:
    """CheckpointError naming the first checkpoint tensor that is neither read by the full model nor UNUSED."""
    unused = [re.compile(r) for r in family.UNUSED]
    for name in sorted(names):
        if name not in expected and not any(r.fullmatch(name) for r in unused):
            raise CheckpointError(
                f"{where}: checkpoint tensor {name} is not read by actfleet's "
                f"{family.__name__.rsplit('.', 1)[-1]} model for this config.json (a term "
                f"the config does not announce would be computed wrongly)"
            )


def expected_names(family, cfg, abstract_state) -> set[str]:
    """The HF names the full model (cfg.layers layers) reads: the non-layer params of `abstract_state` and,
    for every layer, the params of one layer (layers of a family are alike; a model built with no layers is
    asked for one, under eval_shape: nothing is allocated)."""
    from flax import nnx

    paths = [p for p, _ in nnx.to_flat_state(abstract_state)]
    if not any(p[0] == "layers" for p in paths) and cfg.layers:
        one = nnx.eval_shape(lambda: family.Decoder(cfg, 1))
        paths += [p for p, _ in nnx.to_flat_state(nnx.split(one)[1]) if p[0] == "layers"]
    layer_params = {p[2:] for p in paths if p[0] == "layers"}
    names = {hf_source(p, family)[0] for p in paths if p[0] != "layers"}
    names |= {hf_source(("layers", i, *rest), family)[0] for i in range(cfg.layers) for rest in layer_params}
    return names


def load_state(model_dir: str | Path, cfg, abstract_state, sharding_of: Callable, family=None):
    """Fill `abstract_state` (nnx.split of a model built under nnx.eval_shape) from the checkpoint.

    `sharding_of(variable)` gives each parameter's jax.sharding.Sharding; `family` is the model family's
    module (by default the one defining cfg's class). Returns the State of jax Arrays."""
    import jax
    from flax import nnx

    family = family or family_of(cfg)
    model_dir = Path(model_dir)
    files = weight_files(model_dir)
    # A checkpoint saved from the bare base model (GPT2Model, LlamaModel ...: the hub's gpt2 is one) names its
    # tensors without the base model's prefix ("h.0.attn.c_attn.weight"): name them as the full model does.
    prefix = getattr(family, "BASE_PREFIX", "")
    if prefix and not any(n.startswith(prefix) for n in files):
        stored = {prefix + n: n for n in files}
        files = {prefix + n: p for n, p in files.items()}
    else:
        stored = {n: n for n in files}
    check_all_read(files, expected_names(family, cfg, abstract_state), family, model_dir)
    opened: dict[Path, dict] = {}
    sizes = family.sizes(cfg)

    def tensor(name: str, split) -> np.ndarray:
        if name not in files:
            raise CheckpointError(f"{model_dir}: checkpoint has no tensor {name}")
        path = files[name]
        if path not in opened:
            try:
                opened[path] = open_file(path)[0]
            except (ShardFormatError, OSError) as e:
                raise CheckpointError(f"{path}: unreadable ({e})") from None
        arr = opened[path][stored[name]]  # a view of the mapped file: nothing is read yet
        want = tuple(int(np.prod([sizes[n] for n in names])) for names in split)
        if arr.shape != want:
            raise CheckpointError(f"{path}: {name} has shape {list(arr.shape)}, config says {list(want)}")
        return arr

    flat = []
    for path, variable in nnx.to_flat_state(abstract_state):
        name, split, order, fixed = hf_source(path, family)
        src = tensor(name, split)
        shape, dtype = variable.get_value().shape, variable.get_value().dtype
        assert shape == tuple(sizes[n] for n in order), (path, shape, order)
        blocks: dict[tuple, np.ndarray] = {}  # a replicated parameter: converted once, copied to every device

        def block(index, src=src, split=split, order=order, dtype=dtype, shape=shape, blocks=blocks, fixed=fixed):
            key = tuple(s.indices(n)[:2] for s, n in zip(index, shape))
            if key not in blocks:
                blocks[key] = read_block(src, split, order, sizes, index, dtype, fixed)
            return blocks[key]

        array = jax.make_array_from_callback(shape, sharding_of(variable), block)
        flat.append((path, variable.replace(array)))
    return nnx.from_flat_state(flat)
