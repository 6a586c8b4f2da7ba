"""Gemma 2 and Gemma 3 (text) decoders as Flax NNX modules, with transformers' numerics.

What sets them apart from Qwen2/Llama (transformers' modeling_gemma2.py / modeling_gemma3.py):
- RMSNorm scales by (1 + w), computed in float32 and cast back afterwards: `(n * (1 + w.float())).type_as(x)`;
- four norms per layer: input_layernorm (ln1) -> attention -> post_attention_layernorm (ln1_post) -> + residual;
  pre_feedforward_layernorm (ln2) -> MLP -> post_feedforward_layernorm (ln2_post) -> + residual;
- GeGLU MLP: act(gate) * up with `hidden_activation` (gelu_pytorch_tanh: the tanh approximation);
- embeddings times sqrt(hidden_size), the factor rounded to the embedding's dtype first;
- attention scores scaled by query_pre_attn_scalar ** -0.5 (not head_dim ** -0.5);
- sliding-window layers (window `sliding_window`, transformers' `q - k < window`) between global ones, per
  `layer_types` or the default pattern (Gemma 2: even layers slide; Gemma 3: every `sliding_window_pattern`-th
  layer is global);
- Gemma 2 only: attention logit soft-capping, tanh(s / cap) * cap before the mask;
- Gemma 3 only: per-head (1 + w) RMSNorm on q and k before RoPE, and two RoPE tables: sliding layers use
  the local base (rope_local_base_freq), global layers rope_theta with their rope scaling (linear on 4b+).
final_logit_softcapping acts on the LM head's logits only: no site sees it.

Sites (TransformerLens's Gemma 2 hooks, on the unprocessed model): hook_embed is after the sqrt(d) scale (TL
folds it into W_E); hook_attn_out / hook_mlp_out are after the post-norms (what is added to the residual);
ln1 / ln2 hook_normalized are the pre-norms' (input_layernorm, pre_feedforward_layernorm) x / rms(x).

Parameters (projections [in, out], heads on their own axis, as in qwen2):
    embed.table [vocab, embed]
    layers[i].ln1.weight, ln1_post.weight, ln2.weight, ln2_post.weight [embed]   (the raw w of 1 + w)
    layers[i].attn.wq [embed, heads, head_dim]; wk, wv [embed, kv_heads, head_dim]; wo [heads, head_dim, embed]
    layers[i].attn.q_norm.weight, k_norm.weight [head_dim]                       (Gemma 3)
    layers[i].mlp.w_gate, w_up [embed, mlp]; w_down [mlp, embed]
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from actfleet import sites as site_names
from actfleet.worker.attention import attention
from actfleet.worker.models import qwen2
from actfleet.worker.models.config_check import refuse
from actfleet.worker.models.sharding import param

FAMILY = "gemma"
ACTIVATIONS = {"gelu_pytorch_tanh": True, "gelu_new": True, "gelu": False}  # name -> tanh approximation
LAYER_TYPES = ("sliding_attention", "full_attention")


@dataclass(frozen=True)
class Config:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    rms_eps: float
    max_pos: int
    query_scale: float  # query_pre_attn_scalar ** -0.5
    softcap: float | None  # attention logits (Gemma 2)
    sliding_window: int | None
    sliding: tuple[int, ...]  # the layers with the sliding window
    rope_local: tuple[float, float]  # (theta, linear factor) of sliding layers
    rope_global: tuple[float, float]  # of global layers
    qk_norm: bool  # Gemma 3
    gelu_tanh: bool = True

    @staticmethod
    def from_hf(c: dict) -> "Config":
        """From a config.json dict with model_type gemma2 or gemma3_text."""
        kind = c.get("model_type")
        if kind not in ("gemma2", "gemma3_text"):
            raise ValueError(f"model_type {kind!r}: not a Gemma 2 / Gemma 3 text config")
        g3 = kind == "gemma3_text"
        n = int(c["num_hidden_layers"])
        act = c.get("hidden_activation", "gelu_pytorch_tanh")
        if act not in ACTIVATIONS:
            refuse(FAMILY, "hidden_activation", act, f"only {', '.join(ACTIVATIONS)} are implemented")
        for field in ("attention_bias", "use_bidirectional_attention"):
            if c.get(field):
                refuse(FAMILY, field, c[field], "not implemented")

        types = c.get("layer_types")
        if types is None:
            # Gemma2Config: layer i slides when (i + 1) % 2; Gemma3TextConfig: when (i + 1) % sliding_window_pattern.
            pattern = int(c.get("sliding_window_pattern", c.get("_sliding_window_pattern", 6))) if g3 else 2
            types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
        if len(types) != n or not set(types) <= set(LAYER_TYPES):
            refuse(FAMILY, "layer_types", types, f"want {n} entries of {' / '.join(LAYER_TYPES)}")
        sliding = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
        window = c.get("sliding_window")
        if sliding and window is not None and int(window) < 1:
            refuse(FAMILY, "sliding_window", window, "must be a positive number of tokens")
        if window is None:
            sliding = ()  # transformers' sliding mask without a window is the causal mask

        local, glob = _rope(c, g3)
        softcap = c.get("attn_logit_softcapping") if not g3 else None  # Gemma3Attention never applies it
        heads = int(c["num_attention_heads"])
        head_dim = int(c.get("head_dim") or c["hidden_size"] // heads)
        return Config(
            vocab=int(c["vocab_size"]),
            hidden=int(c["hidden_size"]),
            intermediate=int(c["intermediate_size"]),
            layers=n,
            heads=heads,
            kv_heads=int(c.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            rms_eps=float(c.get("rms_norm_eps", 1e-6)),
            max_pos=int(c.get("max_position_embeddings", 8192)),
            query_scale=float(c.get("query_pre_attn_scalar", 256)) ** -0.5,
            softcap=None if softcap is None else float(softcap),
            sliding_window=None if window is None else int(window),
            sliding=sliding,
            rope_local=local,
            rope_global=glob,
            qk_norm=g3,
            gelu_tanh=ACTIVATIONS[act],
        )

    def window(self, layer: int) -> int | None:
        return self.sliding_window if layer in self.sliding else None

    def rope_of(self, layer: int) -> tuple[float, float]:
        return self.rope_local if layer in self.sliding else self.rope_global

    def site_width(self, kind: str) -> int:
        if kind == "attn_z":
            return self.heads * self.head_dim
        if kind in ("mlp_pre", "mlp_post"):
            return self.intermediate
        return self.hidden


def _rope_params(p: dict | None, theta: float, field: str) -> tuple[float, float]:
    """(theta, linear factor) from one rope parameters dict; refuses the types not implemented here."""
    p = p or {}
    kind = p.get("rope_type", p.get("type", "default"))
    if kind not in ("default", "linear"):
        refuse(FAMILY, field, p, f"rope type {kind!r} is not implemented (default and linear are)")
    factor = float(p["factor"]) if kind == "linear" else 1.0
    return float(p.get("rope_theta", theta)), factor


def _rope(c: dict, g3: bool) -> tuple[tuple[float, float], tuple[float, float]]:
    """RoPE of sliding and of global layers. Gemma 2: one table for both. Gemma 3: `rope_parameters` keyed by
    layer type (transformers >= 5), or the older rope_theta / rope_local_base_freq / rope_scaling (which
    applies to the global layers only, as Gemma3TextConfig.convert_rope_params_to_dict)."""
    params = c.get("rope_parameters")
    if not g3:
        glob = _rope_params(params or c.get("rope_scaling"), float(c.get("rope_theta", 10000.0)), "rope_parameters")
        return glob, glob
    if params and set(params) <= set(LAYER_TYPES):
        return (
            _rope_params(params.get("sliding_attention"), 10000.0, "rope_parameters"),
            _rope_params(params.get("full_attention"), 1_000_000.0, "rope_parameters"),
        )
    if params:
        refuse(FAMILY, "rope_parameters", params, "want one entry per layer type (sliding_attention, full_attention)")
    local = (float(c.get("rope_local_base_freq", 10000.0)), 1.0)
    return local, _rope_params(c.get("rope_scaling"), float(c.get("rope_theta", 1_000_000.0)), "rope_scaling")


# Every field of Gemma2Config / Gemma3TextConfig (and the PretrainedConfig base) and what from_hf does with it.
CONFIG_FIELDS: dict[str, str] = {
    **{
        f: "honoured"
        for f in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "hidden_activation",
            "max_position_embeddings",
            "rms_norm_eps",
            "rope_parameters",
            "query_pre_attn_scalar",
            "sliding_window",
            "layer_types",
            "_sliding_window_pattern",
            "attn_logit_softcapping",
            "model_type",
        )
    },
    **{f: "refused" for f in ("attention_bias", "use_bidirectional_attention")},
    **{
        f: "irrelevant"
        for f in (
            # token ids, generation and training settings, the LM head (we never run it), bookkeeping
            "bos_token_id",
            "eos_token_id",
            "pad_token_id",
            "use_cache",
            "initializer_range",
            "attention_dropout",
            "tie_word_embeddings",
            "final_logit_softcapping",
            "_name_or_path",
            "architectures",
            "chunk_size_feed_forward",
            "dtype",
            "id2label",
            "label2id",
            "is_encoder_decoder",
            "output_attentions",
            "output_hidden_states",
            "problem_type",
            "return_dict",
            "transformers_version",
        )
    },
}
# Gemma 3's attn_logit_softcapping is read by Gemma3Attention but never passed to its attention function, so
# transformers does not compute it either: honoured for Gemma 2, a no-op for Gemma 3 (from_hf ignores it there).

# The checkpoint (convert.LAYOUTS' format; layer entries relative to HF_LAYER).
HF_LAYER = "model.layers.{i}."
LAYOUTS: dict[str, tuple[str, tuple[tuple[str, ...], ...], str]] = {
    "embed.table": ("model.embed_tokens.weight", (("v",), ("d",)), "vd"),
    "ln1.weight": ("input_layernorm.weight", (("d",),), "d"),
    "ln1_post.weight": ("post_attention_layernorm.weight", (("d",),), "d"),
    "ln2.weight": ("pre_feedforward_layernorm.weight", (("d",),), "d"),
    "ln2_post.weight": ("post_feedforward_layernorm.weight", (("d",),), "d"),
    "attn.wq": ("self_attn.q_proj.weight", (("h", "e"), ("d",)), "dhe"),
    "attn.wk": ("self_attn.k_proj.weight", (("k", "e"), ("d",)), "dke"),
    "attn.wv": ("self_attn.v_proj.weight", (("k", "e"), ("d",)), "dke"),
    "attn.wo": ("self_attn.o_proj.weight", (("d",), ("h", "e")), "hed"),
    "attn.q_norm.weight": ("self_attn.q_norm.weight", (("e",),), "e"),
    "attn.k_norm.weight": ("self_attn.k_norm.weight", (("e",),), "e"),
    "mlp.w_gate": ("mlp.gate_proj.weight", (("f",), ("d",)), "df"),
    "mlp.w_up": ("mlp.up_proj.weight", (("f",), ("d",)), "df"),
    "mlp.w_down": ("mlp.down_proj.weight", (("d",), ("f",)), "fd"),
}
UNUSED = (r"lm_head\.weight", r"model\.norm\.weight")


def sizes(cfg: Config) -> dict[str, int]:
    return {
        "v": cfg.vocab,
        "d": cfg.hidden,
        "h": cfg.heads,
        "k": cfg.kv_heads,
        "e": cfg.head_dim,
        "f": cfg.intermediate,
    }


# ----------------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------------


def rope(x, positions, theta: float, factor: float):
    """Rotate-half RoPE as transformers: inv_freq in float32 (divided by the linear factor), cos/sin in
    float32, cast to x's dtype. x: [B, T, N, hd]."""
    hd = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    if factor != 1.0:
        inv_freq = inv_freq / factor
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class RMSNorm(qwen2.RMSNorm):
    """Gemma's RMSNorm: x / rms(x) * (1 + w), all in float32, then cast to x's dtype (qwen2's `normalize`, so
    `hook_normalized` is the same quantity)."""

    def __call__(self, x, normalized=None):
        n = self.normalize(x) if normalized is None else normalized
        return (n * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)


class Embedding(nnx.Module):
    def __init__(self, vocab: int, dim: int, dtype):
        self.table = param((vocab, dim), ("vocab", "embed"), dtype)
        # transformers: the float32 buffer sqrt(hidden_size) cast to the weight's dtype, then the product.
        self.scale = float(np.float32(dim**0.5))

    def __call__(self, token_ids):
        table = self.table[...]
        return table[token_ids] * jnp.asarray(self.scale, jnp.float32).astype(table.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: Config, layer: int, dtype):
        d, h, k, hd = cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim
        self.cfg = cfg
        self.window = cfg.window(layer)
        self.theta, self.factor = cfg.rope_of(layer)
        self.wq = param((d, h, hd), ("embed", "heads", "head_dim"), dtype)
        self.wk = param((d, k, hd), ("embed", "kv_heads", "head_dim"), dtype)
        self.wv = param((d, k, hd), ("embed", "kv_heads", "head_dim"), dtype)
        self.wo = param((h, hd, d), ("heads", "head_dim", "embed"), dtype)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_eps, dtype, axis="head_dim")
            self.k_norm = RMSNorm(hd, cfg.rms_eps, dtype, axis="head_dim")

    def __call__(self, x, segment_ids, positions, attn_block: int):
        """x: [B, T, D] (already normalized) -> (z [B, T, H, hd] before o_proj, o_proj's output [B, T, D])."""
        cfg = self.cfg
        q = jnp.einsum("btd,dhk->bthk", x, self.wq[...])
        k = jnp.einsum("btd,dhk->bthk", x, self.wk[...])
        v = jnp.einsum("btd,dhk->bthk", x, self.wv[...])
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope(q, positions, self.theta, self.factor), rope(k, positions, self.theta, self.factor)
        z = attention(
            q,
            k,
            v,
            segment_ids,
            positions,
            block=attn_block,
            window=self.window,
            softcap=cfg.softcap,
            scale=cfg.query_scale,
        )
        return z, jnp.einsum("bthk,hkd->btd", z, self.wo[...])


class MLP(nnx.Module):
    def __init__(self, cfg: Config, dtype):
        self.w_gate = param((cfg.hidden, cfg.intermediate), ("embed", "mlp"), dtype)
        self.w_up = param((cfg.hidden, cfg.intermediate), ("embed", "mlp"), dtype)
        self.w_down = param((cfg.intermediate, cfg.hidden), ("mlp", "embed"), dtype)
        self.gelu_tanh = cfg.gelu_tanh

    def __call__(self, x):
        """x: [B, T, D] (already normalized) -> (gate pre-activation, gelu(gate) * up, down_proj's output)."""
        pre = x @ self.w_gate[...]
        post = jax.nn.gelu(pre, approximate=self.gelu_tanh) * (x @ self.w_up[...])
        return pre, post, post @ self.w_down[...]


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: Config, layer: int, dtype):
        d, eps = cfg.hidden, cfg.rms_eps
        self.ln1, self.ln1_post = RMSNorm(d, eps, dtype), RMSNorm(d, eps, dtype)
        self.attn = Attention(cfg, layer, dtype)
        self.ln2, self.ln2_post = RMSNorm(d, eps, dtype), RMSNorm(d, eps, dtype)
        self.mlp = MLP(cfg, dtype)

    def __call__(self, x, segment_ids, positions, attn_block: int, want=frozenset()):
        """One sandwich-norm block; returns (resid_post, {kind: value} for the site kinds in `want`)."""
        b, t, _ = x.shape
        found = {"resid_pre": x}
        found["ln1"] = n1 = self.ln1.normalize(x)
        z, a = self.attn(self.ln1(x, n1), segment_ids, positions, attn_block)
        found["attn_z"] = z.reshape(b, t, -1)  # head-major
        found["attn_out"] = self.ln1_post(a)  # what is added to the residual stream (TL: after ln1_post)
        x = found["resid_mid"] = x + found["attn_out"]
        found["ln2"] = n2 = self.ln2.normalize(x)
        found["mlp_pre"], found["mlp_post"], m = self.mlp(self.ln2(x, n2))
        found["mlp_out"] = self.ln2_post(m)
        x = found["resid_post"] = x + found["mlp_out"]
        return x, {k: v for k, v in found.items() if k in want}


class Decoder(nnx.Module):
    """The scaled embedding and the first `n_layers` decoder layers (as many as the deepest site needs)."""

    def __init__(self, cfg: Config, n_layers: int, dtype=jnp.float32):
        self.embed = Embedding(cfg.vocab, cfg.hidden, dtype)
        self.layers = nnx.List([DecoderLayer(cfg, i, dtype) for i in range(n_layers)])

    def __call__(self, token_ids, segment_ids, positions, *, sites: tuple[str, ...], attn_block: int = 512) -> dict:
        captured = {}
        x = self.embed(token_ids)
        if site_names.EMBED in sites:
            captured[site_names.EMBED] = x
        for i in range(site_names.layers_needed(sites)):
            want = frozenset(k for k in site_names.LAYER_KINDS if site_names.name(k, i) in sites)
            x, found = self.layers[i](x, segment_ids, positions, attn_block, want)
            captured.update({site_names.name(k, i): v for k, v in found.items()})
        return captured
