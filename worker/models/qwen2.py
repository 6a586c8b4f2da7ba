"""The Qwen2 / Qwen2.5 decoder as Flax NNX modules: Config, RMSNorm, Embedding, Attention, MLP, DecoderLayer, Decoder.

Llama, Mistral and Qwen3 are the same network with switches: `qkv_bias` (Qwen2 has it, Llama/Mistral/Qwen3
do not) and `qk_norm` (Qwen3's per-head RMSNorm on q and k before RoPE). Numerics follow `transformers`:
RMSNorm in float32 then cast back, RoPE "rotate half" with the frequency table in float32.

Activations are captured under TransformerLens names (actfleet.sites) and the network runs only up to
the deepest requested layer; the final norm and LM head do not exist here.

Parameters (nnx.Param, created by actfleet.worker.models.sharding.param with logical axis names; the names
map to mesh axes through sharding.RULES). Projections are stored [in, out] with heads as their own axis:
    embed.table [vocab, embed]
    layers[i].ln1.weight, ln2.weight [embed]
    layers[i].attn.wq [embed, heads, head_dim]     bq [heads, head_dim]       (bias: qkv_bias only)
    layers[i].attn.wk, wv [embed, kv_heads, head_dim]   bk, bv [kv_heads, head_dim]
    layers[i].attn.wo [heads, head_dim, embed]
    layers[i].attn.q_norm.weight, k_norm.weight [head_dim]                    (qk_norm only)
    layers[i].mlp.w_gate, w_up [embed, mlp]    w_down [mlp, embed]
actfleet.worker.convert maps each to its Hugging Face tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from actfleet import sites as site_names
from actfleet.worker.attention import attention
from actfleet.worker.models.sharding import param


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
    # Sliding-window attention: the window (None: every layer attends to its whole sequence) and the layers
    # that use it (see sliding_layers).
    sliding_window: int | None = None
    sliding: tuple[int, ...] = ()

    def window(self, layer: int) -> int | None:
        """Layer `layer`'s attention window, or None for full attention."""
        return self.sliding_window if layer in self.sliding else None

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
            **sliding_layers(c, kind),
        )

    def site_width(self, kind: str) -> int:
        """How wide a stored vector of this site kind is (actfleet.sites kinds)."""
        if kind == "attn_z":
            return self.heads * self.head_dim
        if kind in ("mlp_pre", "mlp_post"):
            return self.intermediate
        return self.hidden


def sliding_layers(c: dict, kind: str) -> dict:
    """Config.sliding_window / sliding from config.json, as transformers decides them. Mistral: `sliding_window`
    on every layer (MistralModel ignores layer_types). Qwen2/Qwen3: the window only with `use_sliding_window`;
    the sliding layers are `layer_types`' "sliding_attention" entries when config.json has them, else layers
    i >= max_window_layers (Qwen2Config.__post_init__). Llama has no sliding window."""
    n = c["num_hidden_layers"]
    if kind == "mistral":
        window = c.get("sliding_window")
        layers = tuple(range(n))
    elif kind in ("qwen2", "qwen3"):
        window = c.get("sliding_window", 4096) if c.get("use_sliding_window", False) else None
        types = c.get("layer_types")
        if types is not None:
            if len(types) != n or not set(types) <= {"full_attention", "sliding_attention"}:
                raise ValueError(f"layer_types {types!r}: want {n} of 'full_attention'/'sliding_attention'")
            layers = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
        else:
            layers = tuple(range(int(c.get("max_window_layers", 28)), n))
    else:
        window, layers = None, ()
    if window is None or not layers:
        return {}
    if int(window) < 1:
        raise ValueError(f"sliding_window {window!r}: must be a positive number of tokens")
    return {"sliding_window": int(window), "sliding": layers}


# ----------------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------------


def rope(x, positions, theta):
    """x: [B, T, N, hd]; rotate-half RoPE as in transformers (cos/sin computed in float32, cast to x's dtype)."""
    hd = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, hd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype, axis: str = "embed"):
        self.weight = param((dim,), (axis,), dtype)
        self.eps = eps

    def normalize(self, x):
        """x / rms(x) in float32, before the weight: TransformerLens's `hook_normalized`."""
        x32 = x.astype(jnp.float32)
        return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)

    def __call__(self, x, normalized=None):
        n = self.normalize(x) if normalized is None else normalized
        return self.weight[...] * n.astype(x.dtype)


class Embedding(nnx.Module):
    def __init__(self, vocab: int, dim: int, dtype):
        self.table = param((vocab, dim), ("vocab", "embed"), dtype)

    def __call__(self, token_ids):
        return self.table[...][token_ids]


class Attention(nnx.Module):
    def __init__(self, cfg: Config, dtype, window: int | None = None):
        d, h, k, hd = cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim
        self.cfg = cfg
        self.window = window
        self.wq = param((d, h, hd), ("embed", "heads", "head_dim"), dtype)
        self.wk = param((d, k, hd), ("embed", "kv_heads", "head_dim"), dtype)
        self.wv = param((d, k, hd), ("embed", "kv_heads", "head_dim"), dtype)
        self.wo = param((h, hd, d), ("heads", "head_dim", "embed"), dtype)
        if cfg.qkv_bias:
            self.bq = param((h, hd), ("heads", "head_dim"), dtype)
            self.bk = param((k, hd), ("kv_heads", "head_dim"), dtype)
            self.bv = param((k, hd), ("kv_heads", "head_dim"), dtype)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_eps, dtype, axis="head_dim")
            self.k_norm = RMSNorm(hd, cfg.rms_eps, dtype, axis="head_dim")

    def __call__(self, x, segment_ids, positions, attn_block: int):
        """x: [B, T, D] (already normalized) -> (z [B, T, H, hd] before o_proj, out [B, T, D])."""
        cfg = self.cfg
        q = jnp.einsum("btd,dhk->bthk", x, self.wq[...])
        k = jnp.einsum("btd,dhk->bthk", x, self.wk[...])
        v = jnp.einsum("btd,dhk->bthk", x, self.wv[...])
        if cfg.qkv_bias:
            q, k, v = q + self.bq[...], k + self.bk[...], v + self.bv[...]
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
        z = attention(q, k, v, segment_ids, positions, block=attn_block, window=self.window)
        return z, jnp.einsum("bthk,hkd->btd", z, self.wo[...])


class MLP(nnx.Module):
    def __init__(self, cfg: Config, dtype):
        self.w_gate = param((cfg.hidden, cfg.intermediate), ("embed", "mlp"), dtype)
        self.w_up = param((cfg.hidden, cfg.intermediate), ("embed", "mlp"), dtype)
        self.w_down = param((cfg.intermediate, cfg.hidden), ("mlp", "embed"), dtype)

    def __call__(self, x):
        """x: [B, T, D] (already normalized) -> (gate pre-activation, silu(gate) * up, out)."""
        pre = x @ self.w_gate[...]
        post = jax.nn.silu(pre) * (x @ self.w_up[...])
        return pre, post, post @ self.w_down[...]


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: Config, dtype, window: int | None = None):
        self.ln1 = RMSNorm(cfg.hidden, cfg.rms_eps, dtype)
        self.attn = Attention(cfg, dtype, window)
        self.ln2 = RMSNorm(cfg.hidden, cfg.rms_eps, dtype)
        self.mlp = MLP(cfg, dtype)

    def __call__(self, x, segment_ids, positions, attn_block: int, want=frozenset()):
        """One pre-norm block; returns (resid_post, {kind: value} for the site kinds in `want`). Values not
        asked for are never stored, and XLA drops what nothing reads."""
        b, t, _ = x.shape
        found = {"resid_pre": x}
        found["ln1"] = n1 = self.ln1.normalize(x)
        z, found["attn_out"] = self.attn(self.ln1(x, n1), segment_ids, positions, attn_block)
        found["attn_z"] = z.reshape(b, t, -1)  # head-major: head h is columns h*hd .. (h+1)*hd - 1
        x = found["resid_mid"] = x + found["attn_out"]
        found["ln2"] = n2 = self.ln2.normalize(x)
        found["mlp_pre"], found["mlp_post"], found["mlp_out"] = self.mlp(self.ln2(x, n2))
        x = found["resid_post"] = x + found["mlp_out"]
        return x, {k: v for k, v in found.items() if k in want}


class Decoder(nnx.Module):
    """The embedding and the first `n_layers` decoder layers (as many as the deepest site needs)."""

    def __init__(self, cfg: Config, n_layers: int, dtype=jnp.float32):
        self.embed = Embedding(cfg.vocab, cfg.hidden, dtype)
        self.layers = nnx.List([DecoderLayer(cfg, dtype, cfg.window(i)) for i in range(n_layers)])

    def __call__(self, token_ids, segment_ids, positions, *, sites: tuple[str, ...], attn_block: int = 512) -> dict:
        """Run on packed rows [B, T]; returns {site: [B, T, width]} in the parameters' dtype (the ln1/ln2
        sites in float32, as TransformerLens hooks them)."""
        captured = {}
        x = self.embed(token_ids)
        if site_names.EMBED in sites:
            captured[site_names.EMBED] = x
        for i in range(site_names.layers_needed(sites)):
            want = frozenset(k for k in site_names.LAYER_KINDS if site_names.name(k, i) in sites)
            x, found = self.layers[i](x, segment_ids, positions, attn_block, want)
            captured.update({site_names.name(k, i): v for k, v in found.items()})
        return captured
