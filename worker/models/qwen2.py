"""The Qwen2 / Qwen2.5 decoder in plain JAX: config dataclass, weights as a pytree, forward as pure functions.

Llama, Mistral and Qwen3 are the same network with switches: `qkv_bias` (Qwen2 has it, Llama/Mistral/Qwen3
do not) and `qk_norm` (Qwen3's per-head RMSNorm on q and k before RoPE). Numerics follow `transformers`:
RMSNorm in float32 then cast back, RoPE "rotate half" with the frequency table in float32.

Activations are captured under TransformerLens names (actfleet.sites) and the network runs only up to
the deepest requested layer; the final norm and LM head never run.

Weights pytree (linear weights stored [in, out]):
    {"embed": [V, D],
     "layers": [{"ln1": [D], "wq": [D, H*hd], "bq": [H*hd], "wk": [D, K*hd], "bk": [K*hd], "wv": ..., "bv": ...,
                 "wo": [H*hd, D], ("q_norm": [hd], "k_norm": [hd]), "ln2": [D],
                 "w_gate": [D, I], "w_up": [D, I], "w_down": [I, D]}, ...]}
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from actfleet import sites as site_names
from actfleet.worker.attention import attention


@dataclass(frozen=True)
class Config:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    rope_theta: float
    rms_eps: float
    max_pos: int
    tie: bool = True
    qkv_bias: bool = True
    qk_norm: bool = False

    @staticmethod
    def from_hf(c: dict) -> "Config":
        """From a Hugging Face config.json dict (qwen2, qwen3, llama, mistral)."""
        kind = c.get("model_type", "qwen2")
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise ValueError(f"rope scaling {rope.get('rope_type') or rope.get('type')!r} is not supported")
        theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
        heads = c["num_attention_heads"]
        return Config(
            vocab=c["vocab_size"], hidden=c["hidden_size"], intermediate=c["intermediate_size"],
            layers=c["num_hidden_layers"], heads=heads, kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads, rope_theta=float(theta),
            rms_eps=float(c.get("rms_norm_eps", 1e-6)), max_pos=int(c.get("max_position_embeddings", 32768)),
            tie=bool(c.get("tie_word_embeddings", False)),
            qkv_bias=kind == "qwen2" or bool(c.get("attention_bias", False)),
            qk_norm=kind == "qwen3",
        )


# ----------------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------------


def rms_norm(x, weight, eps):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)


def rope(x, positions, theta):
    """x: [B, T, N, hd]; rotate-half RoPE as in transformers (cos/sin computed in float32, cast to x's dtype)."""
    hd = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, hd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def attention_block(cfg: Config, w: dict, x, segment_ids, positions, attn_block: int):
    b, t, _ = x.shape
    q, k, v = x @ w["wq"], x @ w["wk"], x @ w["wv"]
    if cfg.qkv_bias:
        q, k, v = q + w["bq"], k + w["bk"], v + w["bv"]
    q = q.reshape(b, t, cfg.heads, cfg.head_dim)
    k = k.reshape(b, t, cfg.kv_heads, cfg.head_dim)
    v = v.reshape(b, t, cfg.kv_heads, cfg.head_dim)
    if cfg.qk_norm:
        q, k = rms_norm(q, w["q_norm"], cfg.rms_eps), rms_norm(k, w["k_norm"], cfg.rms_eps)
    q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
    out = attention(q, k, v, segment_ids, positions, block=attn_block)
    return out.reshape(b, t, cfg.heads * cfg.head_dim) @ w["wo"]


def mlp_block(w: dict, x):
    return (jax.nn.silu(x @ w["w_gate"]) * (x @ w["w_up"])) @ w["w_down"]


def forward(cfg: Config, weights: dict, token_ids, segment_ids, positions, *, sites: tuple[str, ...],
            attn_block: int = 512) -> dict:
    """Run the decoder on packed rows [B, T] and return {site: [B, T, D]} in the weights' dtype.

    Only layers up to the deepest site run. `weights` holds at least that many layers.
    """
    captured = {}
    x = weights["embed"][token_ids]
    if site_names.EMBED in sites:
        captured[site_names.EMBED] = x
    for i in range(site_names.layers_needed(sites)):
        w = weights["layers"][i]
        attn_out = attention_block(cfg, w, rms_norm(x, w["ln1"], cfg.rms_eps), segment_ids, positions, attn_block)
        x = x + attn_out
        mlp_out = mlp_block(w, rms_norm(x, w["ln2"], cfg.rms_eps))
        x = x + mlp_out
        for kind, value in (("attn_out", attn_out), ("mlp_out", mlp_out), ("resid_post", x)):
            if site_names.name(kind, i) in sites:
                captured[site_names.name(kind, i)] = value
    return captured
