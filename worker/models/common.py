"""Pieces more than one family uses: activations by their transformers names, LayerNorm with bias, and RoPE
parameters read from config.json (both the transformers 5 `rope_parameters` and the older `rope_scaling` +
`rope_theta` spellings), with Llama 3.1's frequency scaling computed as transformers computes it."""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from actfleet.worker.models.config_check import refuse
from actfleet.worker.models.sharding import param

# transformers' ACT2FN names -> the same function. gelu is the exact (erf) form; gelu_new and gelu_pytorch_tanh
# are both the tanh approximation.
# Fields every transformers config has (PretrainedConfig's own bookkeeping, output switches and task heads; token
# ids, caching and weight initialisation) that never change the forward computed here. Each family's
# CONFIG_FIELDS starts from these.
PRETRAINED_IRRELEVANT = (
    "_name_or_path",
    "architectures",
    "chunk_size_feed_forward",
    "dtype",
    "id2label",
    "is_encoder_decoder",
    "label2id",
    "model_type",
    "output_attentions",
    "output_hidden_states",
    "problem_type",
    "return_dict",
    "transformers_version",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "use_cache",
    "initializer_range",
)

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": partial(jax.nn.gelu, approximate=False),
    "gelu_new": partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}


def check_activation(family: str, field: str, name) -> str:
    if name not in ACTIVATIONS:
        refuse(family, field, name, f"only {', '.join(sorted(ACTIVATIONS))} are implemented")
    return name


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm (biased variance, eps inside the root) with weight and bias."""

    def __init__(self, dim: int, eps: float, dtype):
        self.weight = param((dim,), ("embed",), dtype)
        self.bias = param((dim,), ("embed",), dtype)
        self.eps = eps

    def normalize(self, x):
        """(x - mean) / std in float32, before weight and bias: TransformerLens's LayerNorm `hook_normalized`."""
        x32 = x.astype(jnp.float32)
        c = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        return c * jax.lax.rsqrt(jnp.mean(c * c, axis=-1, keepdims=True) + self.eps)

    def __call__(self, x, normalized=None):
        n = self.normalize(x) if normalized is None else normalized
        return self.weight[...] * n.astype(x.dtype) + self.bias[...]


# ----------------------------------------------------------------------------------------------------
# RoPE parameters
# ----------------------------------------------------------------------------------------------------

ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_from_hf(family: str, c: dict, theta_default: float = 10000.0) -> tuple[float, tuple]:
    """(rope_theta, scaling) from config.json; scaling is () for plain RoPE, ("linear", factor),
    ("llama3", factor, low_freq_factor, high_freq_factor, original_max_position_embeddings) or
    ("yarn", factor, attention_factor, beta_fast, beta_slow, original_max_position_embeddings, truncate).
    Anything else is refused by name."""
    params = c.get("rope_parameters") or c.get("rope_scaling") or {}
    field = "rope_parameters" if c.get("rope_parameters") else "rope_scaling"
    if not isinstance(params, dict):
        refuse(family, field, params, "expected a mapping")
    kind = params.get("rope_type", params.get("type")) or "default"
    theta = float(params.get("rope_theta", c.get("rope_theta", theta_default)))
    if kind == "default":
        return theta, ()
    try:
        if kind == "linear":
            return theta, ("linear", float(params["factor"]))
        if kind == "llama3":
            return theta, (
                "llama3",
                float(params["factor"]),
                float(params["low_freq_factor"]),
                float(params["high_freq_factor"]),
                int(params["original_max_position_embeddings"]),
            )
        if kind == "yarn":
            return theta, _yarn(params)
    except (KeyError, TypeError, ValueError) as e:
        refuse(family, f"{field}.rope_type", kind, f"its parameters are incomplete ({type(e).__name__}: {e})")
    why = {
        "dynamic": "dynamic NTK rescales by the sequence length of each forward call (the batch's in "
        "transformers), which packed rows cannot reproduce exactly",
    }.get(kind, f"only rope types {', '.join(ROPE_TYPES)} are implemented")
    refuse(family, f"{field}.rope_type", kind, why)


def _yarn(params: dict) -> tuple:
    """transformers' _compute_yarn_parameters, the scalars: factor, attention_factor (cos/sin scale), beta_fast,
    beta_slow, original_max_position_embeddings, truncate."""
    factor = float(params["factor"])
    attention_factor = params.get("attention_factor")
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")

    def get_mscale(scale, m=1):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    return (
        "yarn",
        factor,
        float(attention_factor),
        float(params.get("beta_fast") or 32),
        float(params.get("beta_slow") or 1),
        int(params["original_max_position_embeddings"]),
        bool(params.get("truncate", True)),
    )


def attention_scaling(scaling: tuple) -> float:
    """The factor transformers multiplies cos and sin by (YaRN's attention_factor; 1 otherwise)."""
    return scaling[2] if scaling and scaling[0] == "yarn" else 1.0


def inv_freq(dim: int, theta: float, scaling: tuple) -> np.ndarray:
    """RoPE inverse frequencies [dim / 2] in float32, in transformers' float32 arithmetic
    (_compute_default/linear_scaling/llama3_parameters in modeling_rope_utils)."""
    f32 = np.float32
    inv = (f32(1.0) / (f32(theta) ** (np.arange(0, dim, 2).astype(f32) / f32(dim)))).astype(f32)
    if not scaling:
        return inv
    if scaling[0] == "linear":
        return (inv / f32(scaling[1])).astype(f32)
    if scaling[0] == "yarn":
        _, factor, _, beta_fast, beta_slow, old, truncate = scaling

        def correction_dim(rotations):
            return (dim * math.log(old / (rotations * 2 * math.pi))) / (2 * math.log(theta))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # transformers' guard against a zero-width ramp
        pos_freqs = (f32(theta) ** (np.arange(0, dim, 2).astype(f32) / f32(dim))).astype(f32)
        extrapolation, interpolation = (
            (f32(1) / pos_freqs).astype(f32),
            (f32(1) / (f32(factor) * pos_freqs)).astype(f32),
        )
        ramp = np.clip((np.arange(dim // 2, dtype=f32) - f32(low)) / f32(high - low), 0, 1).astype(f32)
        keep = (f32(1) - ramp).astype(f32)
        return (interpolation * (f32(1) - keep) + extrapolation * keep).astype(f32)
    _, factor, low, high, old = scaling
    low_wavelen, high_wavelen = f32(old / low), f32(old / high)
    wavelen = (f32(2 * math.pi) / inv).astype(f32)
    llama = np.where(wavelen > low_wavelen, inv / f32(factor), inv).astype(f32)
    smooth = ((f32(old) / wavelen - f32(low)) / f32(high - low)).astype(f32)
    smoothed = ((f32(1) - smooth) * llama / f32(factor) + smooth * llama).astype(f32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, llama).astype(f32)
