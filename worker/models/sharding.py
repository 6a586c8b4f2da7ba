"""Logical axis names and the one table that maps them onto the device mesh (data, model).

Every parameter is created by `param` with a logical name per dimension (stored as the nnx.Param's
`out_sharding` metadata, where Flax keeps sharding annotations); `RULES` says which mesh axis each logical
axis is split over. Changing how the model is sharded means changing RULES, nothing else. The scheme is
Megatron's tensor parallelism: attention heads and the MLP's hidden units are split over `model`, so each
device computes whole heads and whole hidden units, and the two output projections end in one all-reduce
each (XLA's SPMD partitioner inserts it); the batch's rows are split over `data`.

    embed     d_model, the residual stream                  replicated
    vocab     the embedding table's rows                    model
    heads     query heads (wq, bq, wo)                      model
    kv_heads  key/value heads (wk, wv, bk, bv)              model (replicated when kv_heads % N != 0)
    head_dim  within a head                                 replicated
    mlp       the MLP's hidden units (d_mlp)                model
    pos       learned position embeddings' rows (GPT-2)     replicated (small, and gathered from)
    batch     rows of a packed batch                        data
"""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

MESH_AXES = ("data", "model")

RULES: Mapping[str, str | None] = {
    "batch": "data",
    "embed": None,
    "vocab": "model",
    "heads": "model",
    "kv_heads": "model",
    "head_dim": None,
    "mlp": "model",
    "pos": None,
}


def param(shape: tuple[int, ...], axes: tuple[str, ...], dtype) -> nnx.Param:
    """A parameter of `shape` whose dimensions carry the logical names `axes`. Created as zeros: the engine
    builds the model under nnx.eval_shape (nothing allocated) and fills it from the checkpoint
    (actfleet.worker.convert), each array straight into its shards."""
    if len(shape) != len(axes) or any(a not in RULES for a in axes):
        raise ValueError(f"param of shape {shape}: logical axes {axes} must name each dimension from {sorted(RULES)}")
    # eager_sharding=False: placement is the engine's business (it knows the mesh), not construction's.
    return nnx.Param(jnp.zeros(shape, dtype), out_sharding=tuple(axes), eager_sharding=False)


def logical_axes(variable: nnx.Variable) -> tuple[str, ...]:
    """The logical names `param` gave a parameter's dimensions."""
    return tuple(variable.get_metadata()["out_sharding"])


def partition_spec(axes: tuple[str | None, ...], rules: Mapping[str, str | None] = RULES) -> PartitionSpec:
    """Logical names -> a PartitionSpec over MESH_AXES (None in `axes`: not split)."""
    return PartitionSpec(*(None if a is None else rules[a] for a in axes))


def rules_for(config, model_parallel: int) -> dict[str, str | None]:
    """RULES for a model split `model_parallel` ways, or ValueError naming what cannot be split so.

    Heads and MLP units must divide evenly (each device computes whole heads). Key/value heads fewer than
    (or not a multiple of) N are replicated instead: grouped-query models have few of them (Qwen2.5-72B: 8
    for 64 query heads), they are small, and every device then holds the ones its query heads read.
    The embedding table is replicated when the vocabulary does not divide (it is only gathered from)."""
    n = model_parallel
    rules = dict(RULES)
    if n == 1:
        return rules
    sizes = {"heads": config.heads, "mlp": config.intermediate}
    for axis, size in sizes.items():
        if rules[axis] == "model" and size % n:
            what = {"heads": "attention heads", "mlp": "MLP intermediate size"}[axis]
            raise ValueError(f"model_parallel {n}: the model's {what} ({size}) is not a multiple of {n}")
    if config.kv_heads % n:
        rules["kv_heads"] = None
    if config.vocab % n:
        rules["vocab"] = None
    return rules
