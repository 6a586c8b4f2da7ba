"""The Qwen2 / Qwen2.5 decoder as Flax NNX modules: Config, RMSNorm, Embedding, Attention, MLP, DecoderLayer, Decoder.

Llama, Mistral and Qwen3 are the same network with switches: `qkv_bias` (Qwen2 has it, Llama/Mistral/Qwen3
do not unless `attention_bias`), `o_bias` (Llama/Qwen3 `attention_bias`: o_proj too), `mlp_bias` (Llama),
`act` (`hidden_act`), `rope_scaling` (Llama 3.1's "llama3", "linear") and `qk_norm` (Qwen3's per-head
RMSNorm on q and k before RoPE). Each switch left at its default adds no operation. Numerics follow `transformers`:
RMSNorm in float32 then cast back, RoPE "rotate half" with the frequency table in float32.

Activations are captured under TransformerLens names (actfleet.sites) and the network runs only up to
the deepest requested layer; the final norm and LM head do not exist here.

Parameters (nnx.Param, created by actfleet.worker.models.sharding.param with logical axis names; the names
map to mesh axes through sharding.RULES). Projections are stored [in, out] with heads as their own axis:
    embed.table [vocab, embed]
    layers[i].ln1.weight, ln2.weight [embed]
    layers[i].attn.wq [embed, heads, head_dim]     bq [heads, head_dim]       (bias: qkv_bias only)
    layers[i].attn.wk, wv [embed, kv_heads, head_dim]   bk, bv [kv_heads, head_dim]
    layers[i].attn.wo [heads, head_dim, embed]      bo [embed]                 (o_bias only)
    layers[i].attn.q_norm.weight, k_norm.weight [head_dim]                    (qk_norm only)
    layers[i].mlp.w_gate, w_up [embed, mlp]    w_down [mlp, embed]
    layers[i].mlp.b_gate, b_up [mlp]           b_down [embed]                            (mlp_bias only)
actfleet.worker.convert maps each to its Hugging Face tensor through LAYOUTS below.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from actfleet import sites as site_names
from actfleet.worker.attention import attention
from actfleet.worker.models.common import (
    ACTIVATIONS,
    PRETRAINED_IRRELEVANT,
    attention_scaling,
    check_activation,
    inv_freq,
    rope_from_hf,
)
from actfleet.worker.models.sharding import param

FAMILY = "qwen2/llama/mistral/qwen3"

# Every field of the transformers config classes this module serves (Qwen2Config, Qwen3Config, LlamaConfig,
# MistralConfig, plus PretrainedConfig's own), and what from_hf does with it. tests/test_model_config_fields.py
# fails when transformers grows a field that is not here.
_IRRELEVANT = (
    *PRETRAINED_IRRELEVANT,
    # token ids, caching, training-only settings and the LM head (never run here)
    "attention_dropout",
    "tie_word_embeddings",
    "pretraining_tp",  # pretraining_tp: a sliced matmul, the same numbers
)
_HONOURED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_parameters",
    "rope_scaling",
    "rope_theta",
    "attention_bias",
    "mlp_bias",
    # Sliding-window attention (Mistral, Qwen2 use_sliding_window): computed in worker/attention.py.
    "sliding_window",
    "use_sliding_window",
    "max_window_layers",
    "layer_types",
)
CONFIG_FIELDS: dict[str, str] = {**{f: "irrelevant" for f in _IRRELEVANT}, **{f: "honoured" for f in _HONOURED}}


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
    o_bias: bool = False
    mlp_bias: bool = False
    act: str = "silu"
    rope_scaling: tuple = ()  # common.rope_from_hf: () for plain RoPE
    # Sliding-window attention: the window (None: every layer attends to its whole sequence) and the layers
    # that use it (see sliding_layers).
    sliding_window: int | None = None
    sliding: tuple[int, ...] = ()

    def window(self, layer: int) -> int | None:
        """Layer `layer`'s attention window, or None for full attention."""
        return self.sliding_window if layer in self.sliding else None

    @staticmethod
    def from_hf(c: dict) -> "Config":
        """From a Hugging Face config.json dict (qwen2, qwen3, llama, mistral); UnsupportedConfig naming the
        field for what this code does not compute."""
        kind = c.get("model_type", "qwen2")
        theta, scaling = rope_from_hf(FAMILY, c)
        act = check_activation(kind, "hidden_act", c.get("hidden_act", "silu"))
        # Which config fields each transformers class reads: Qwen2 always biases q/k/v (never o_proj) and
        # has no attention_bias; Llama and Qwen3 bias all four projections with it; Mistral has neither.
        attn_bias = bool(c.get("attention_bias", False)) if kind in ("llama", "qwen3") else False
        mlp_bias = bool(c.get("mlp_bias", False)) if kind == "llama" else False
        heads = c["num_attention_heads"]
        return Config(
            vocab=c["vocab_size"],
            hidden=c["hidden_size"],
            intermediate=c["intermediate_size"],
            layers=c["num_hidden_layers"],
            heads=heads,
            kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            rope_theta=theta,
            rms_eps=float(c.get("rms_norm_eps", 1e-6)),
            max_pos=int(c.get("max_position_embeddings", 32768)),
            tie=bool(c.get("tie_word_embeddings", False)),
            qkv_bias=kind == "qwen2" or attn_bias,
            o_bias=attn_bias,
            mlp_bias=mlp_bias,
            act=act,
            rope_scaling=scaling,
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


def rope(x, positions, theta, scaling: tuple = ()):
    """x: [B, T, N, hd]; rotate-half RoPE as in transformers (cos/sin computed in float32, cast to x's dtype).
    `scaling` (common.rope_from_hf) rescales the frequencies (llama3, linear, yarn; yarn also cos and sin)."""
    hd = x.shape[-1]
    if scaling:
        freq = jnp.asarray(inv_freq(hd, theta, scaling))
    else:
        freq = 1.0 / (theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    freqs = positions.astype(jnp.float32)[..., None] * freq  # [B, T, hd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    if attention_scaling(scaling) != 1.0:
        cos, sin = cos * attention_scaling(scaling), sin * attention_scaling(scaling)
    cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
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
        if cfg.o_bias:
            self.bo = param((d,), ("embed",), dtype)
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
        q = rope(q, positions, cfg.rope_theta, cfg.rope_scaling)
        k = rope(k, positions, cfg.rope_theta, cfg.rope_scaling)
        z = attention(q, k, v, segment_ids, positions, block=attn_block, window=self.window)
        out = jnp.einsum("bthk,hkd->btd", z, self.wo[...])
        return z, (out + self.bo[...] if cfg.o_bias else out)


class MLP(nnx.Module):
    def __init__(self, cfg: Config, dtype):
        self.w_gate = param((cfg.hidden, cfg.intermediate), ("embed", "mlp"), dtype)
        self.w_up = param((cfg.hidden, cfg.intermediate), ("embed", "mlp"), dtype)
        self.w_down = param((cfg.intermediate, cfg.hidden), ("mlp", "embed"), dtype)
        if cfg.mlp_bias:
            self.b_gate = param((cfg.intermediate,), ("mlp",), dtype)
            self.b_up = param((cfg.intermediate,), ("mlp",), dtype)
            self.b_down = param((cfg.hidden,), ("embed",), dtype)
        self.bias, self.act = cfg.mlp_bias, cfg.act

    def __call__(self, x):
        """x: [B, T, D] (already normalized) -> (gate pre-activation, act(gate) * up, out)."""
        if not self.bias:
            pre = x @ self.w_gate[...]
            post = ACTIVATIONS[self.act](pre) * (x @ self.w_up[...])
            return pre, post, post @ self.w_down[...]
        pre = x @ self.w_gate[...] + self.b_gate[...]
        post = ACTIVATIONS[self.act](pre) * (x @ self.w_up[...] + self.b_up[...])
        return pre, post, post @ self.w_down[...] + self.b_down[...]


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


# ----------------------------------------------------------------------------------------------------
# The checkpoint layout (actfleet.worker.convert)
# ----------------------------------------------------------------------------------------------------

HF_LAYER = "model.layers.{i}."
BASE_PREFIX = "model."  # a checkpoint saved from the bare LlamaModel/Qwen2Model lacks it
# our parameter path (under layers.{i}. for layer params) -> (HF name, split, order).
# split: the checkpoint tensor's axes, each a tuple of dimension names whose product is its length;
# order: our axes as names. "h"/"k" heads/kv heads, "e" head_dim, "d" hidden, "f" intermediate, "v" vocab.
LAYOUTS: dict[str, tuple] = {
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
    "attn.bo": ("self_attn.o_proj.bias", (("d",),), "d"),
    "attn.q_norm.weight": ("self_attn.q_norm.weight", (("e",),), "e"),
    "attn.k_norm.weight": ("self_attn.k_norm.weight", (("e",),), "e"),
    "mlp.w_gate": ("mlp.gate_proj.weight", (("f",), ("d",)), "df"),
    "mlp.w_up": ("mlp.up_proj.weight", (("f",), ("d",)), "df"),
    "mlp.w_down": ("mlp.down_proj.weight", (("d",), ("f",)), "fd"),
    "mlp.b_gate": ("mlp.gate_proj.bias", (("f",),), "f"),
    "mlp.b_up": ("mlp.up_proj.bias", (("f",),), "f"),
    "mlp.b_down": ("mlp.down_proj.bias", (("d",),), "d"),
}
# Checkpoint tensors no site needs: the LM head, the final norm (after the last layer's resid_post), and the
# rotary buffers older checkpoints carry.
UNUSED = (r"lm_head\.weight", r"model\.norm\.weight", r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def sizes(cfg: Config) -> dict[str, int]:
    return {
        "v": cfg.vocab,
        "d": cfg.hidden,
        "h": cfg.heads,
        "k": cfg.kv_heads,
        "e": cfg.head_dim,
        "f": cfg.intermediate,
    }
