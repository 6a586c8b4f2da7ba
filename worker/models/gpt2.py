"""GPT-2 as Flax NNX modules, and the block GPT-NeoX (Pythia) shares with it (actfleet.worker.models.gpt_neox).

Pre-norm blocks with torch LayerNorm (weight and bias), multi-head attention with biased q/k/v/o projections
and an MLP in -> act -> out with biases. GPT-2 adds learned absolute positions (wpe) to the token embedding;
positions restart at 0 for each packed sequence, as transformers numbers a sequence run alone. GPT-NeoX
instead rotates the first `rotary_ndims` dims of each q/k head (rotate-half RoPE) and may add attention and
MLP in parallel (`parallel`: x + attn(ln1(x)) + mlp(ln2(x))).

TransformerLens's meanings (SAELens loads GPT-2 unprocessed): hook_embed is the token embedding alone,
blocks.0.hook_resid_pre = token + position embedding; ln1/ln2.hook_normalized are (x - mean) / std before the
LayerNorm's weight and bias; mlp.hook_pre is c_fc's output (bias included), mlp.hook_post act(hook_pre);
hook_attn_out and hook_mlp_out include their projection's bias.

Parameters (actfleet.worker.models.sharding.param; [in, out], heads as their own axis):
    embed.table [vocab, embed]          pos.table [pos, embed] (GPT-2 only)
    layers[i].ln1.weight, bias; ln2.weight, bias [embed]
    layers[i].attn.wq, wk, wv [embed, heads, head_dim]     bq, bk, bv [heads, head_dim]   (bias: `attn_bias`)
    layers[i].attn.wo [heads, head_dim, embed]             bo [embed]
    layers[i].mlp.w_in [embed, mlp]  b_in [mlp]  w_out [mlp, embed]  b_out [embed]
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
from flax import nnx

from actfleet import sites as site_names
from actfleet.worker.attention import attention
from actfleet.worker.models.common import ACTIVATIONS, PRETRAINED_IRRELEVANT, LayerNorm, check_activation
from actfleet.worker.models.config_check import refuse
from actfleet.worker.models.qwen2 import rope
from actfleet.worker.models.sharding import param

FAMILY = "gpt2"

_IRRELEVANT = (
    *PRETRAINED_IRRELEVANT,
    "tie_word_embeddings",
    "attn_pdrop",
    "embd_pdrop",
    "resid_pdrop",  # dropout: off at inference
    # the sequence-summary head of GPT2DoubleHeadsModel
    "summary_type",
    "summary_use_proj",
    "summary_activation",
    "summary_proj_to_labels",
    "summary_first_dropout",
    "n_ctx",  # older config.json files: the same number as n_positions, read by nothing
)
_HONOURED = (
    "vocab_size",
    "n_positions",
    "n_embd",
    "n_layer",
    "n_head",
    "n_inner",
    "activation_function",
    "layer_norm_epsilon",
    # Upcasting and reordering the score product to float32: actfleet's scores are always float32.
    "reorder_and_upcast_attn",
)
# from_hf refuses a non-default value of these by name.
_REFUSED = ("scale_attn_weights", "scale_attn_by_inverse_layer_idx", "add_cross_attention")
CONFIG_FIELDS: dict[str, str] = {
    **{f: "irrelevant" for f in _IRRELEVANT},
    **{f: "honoured" for f in _HONOURED},
    **{f: "refused" for f in _REFUSED},
}


@dataclass(frozen=True)
class Config:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    head_dim: int
    eps: float
    max_pos: int
    act: str = "gelu_new"
    attn_bias: bool = True
    learned_pos: bool = True  # GPT-2's wpe; False: rotary (GPT-NeoX)
    rotary_ndims: int = 0
    rope_theta: float = 10000.0
    rope_scaling: tuple = ()
    parallel: bool = False

    @property
    def kv_heads(self) -> int:
        return self.heads

    @staticmethod
    def from_hf(c: dict) -> "Config":
        if c.get("scale_attn_weights", True) is not True:
            refuse(FAMILY, "scale_attn_weights", c["scale_attn_weights"], "unscaled attention scores")
        if c.get("scale_attn_by_inverse_layer_idx", False):
            refuse(
                FAMILY,
                "scale_attn_by_inverse_layer_idx",
                c["scale_attn_by_inverse_layer_idx"],
                "scores scaled by 1 / (layer + 1)",
            )
        if c.get("add_cross_attention", False):
            refuse(FAMILY, "add_cross_attention", c["add_cross_attention"], "cross-attention to an encoder")
        d, h = c["n_embd"], c["n_head"]
        return Config(
            vocab=c["vocab_size"],
            hidden=d,
            intermediate=c.get("n_inner") or 4 * d,
            layers=c["n_layer"],
            heads=h,
            head_dim=d // h,
            eps=float(c.get("layer_norm_epsilon", 1e-5)),
            max_pos=int(c["n_positions"]),
            act=check_activation(FAMILY, "activation_function", c.get("activation_function", "gelu_new")),
        )

    def site_width(self, kind: str) -> int:
        if kind == "attn_z":
            return self.heads * self.head_dim
        if kind in ("mlp_pre", "mlp_post"):
            return self.intermediate
        return self.hidden

    def check_sites(self, sites) -> None:
        """ValueError for a site this model does not have (TransformerLens has no resid_mid for a parallel
        attention + MLP block: nothing is added between them)."""
        if self.parallel:
            for s in sites:
                if site_names.parse(s)[1] == "resid_mid":
                    raise ValueError(
                        f'site "{s}": this model adds attention and MLP in parallel '
                        f"(use_parallel_residual), so there is no residual stream between them"
                    )


class Attention(nnx.Module):
    def __init__(self, cfg: Config, dtype):
        d, h, hd = cfg.hidden, cfg.heads, cfg.head_dim
        self.cfg = cfg
        self.wq = param((d, h, hd), ("embed", "heads", "head_dim"), dtype)
        self.wk = param((d, h, hd), ("embed", "heads", "head_dim"), dtype)
        self.wv = param((d, h, hd), ("embed", "heads", "head_dim"), dtype)
        self.wo = param((h, hd, d), ("heads", "head_dim", "embed"), dtype)
        if cfg.attn_bias:
            self.bq = param((h, hd), ("heads", "head_dim"), dtype)
            self.bk = param((h, hd), ("heads", "head_dim"), dtype)
            self.bv = param((h, hd), ("heads", "head_dim"), dtype)
            self.bo = param((d,), ("embed",), dtype)

    def __call__(self, x, segment_ids, positions, attn_block: int):
        """x: [B, T, D] (already normalized) -> (z [B, T, H, hd] before the output projection, out [B, T, D])."""
        cfg = self.cfg
        q = jnp.einsum("btd,dhk->bthk", x, self.wq[...])
        k = jnp.einsum("btd,dhk->bthk", x, self.wk[...])
        v = jnp.einsum("btd,dhk->bthk", x, self.wv[...])
        if cfg.attn_bias:
            q, k, v = q + self.bq[...], k + self.bk[...], v + self.bv[...]
        if cfg.rotary_ndims:  # NeoX: rotate the first rotary_ndims dims of each head, pass the rest
            r = cfg.rotary_ndims

            def rot(t):
                turned = rope(t[..., :r], positions, cfg.rope_theta, cfg.rope_scaling)
                return turned if r == cfg.head_dim else jnp.concatenate([turned, t[..., r:]], axis=-1)

            q, k = rot(q), rot(k)
        z = attention(q, k, v, segment_ids, positions, block=attn_block)
        out = jnp.einsum("bthk,hkd->btd", z, self.wo[...])
        return z, (out + self.bo[...] if cfg.attn_bias else out)


class MLP(nnx.Module):
    def __init__(self, cfg: Config, dtype):
        self.w_in = param((cfg.hidden, cfg.intermediate), ("embed", "mlp"), dtype)
        self.b_in = param((cfg.intermediate,), ("mlp",), dtype)
        self.w_out = param((cfg.intermediate, cfg.hidden), ("mlp", "embed"), dtype)
        self.b_out = param((cfg.hidden,), ("embed",), dtype)
        self.act = cfg.act

    def __call__(self, x):
        """x: [B, T, D] (already normalized) -> (pre-activation, act(pre), out)."""
        pre = x @ self.w_in[...] + self.b_in[...]
        post = ACTIVATIONS[self.act](pre)
        return pre, post, post @ self.w_out[...] + self.b_out[...]


class Block(nnx.Module):
    def __init__(self, cfg: Config, dtype):
        self.ln1 = LayerNorm(cfg.hidden, cfg.eps, dtype)
        self.attn = Attention(cfg, dtype)
        self.ln2 = LayerNorm(cfg.hidden, cfg.eps, dtype)
        self.mlp = MLP(cfg, dtype)
        self.parallel = cfg.parallel

    def __call__(self, x, segment_ids, positions, attn_block: int, want=frozenset()):
        """One block; returns (resid_post, {kind: value} for the kinds in `want`)."""
        b, t, _ = x.shape
        found = {"resid_pre": x}
        found["ln1"] = n1 = self.ln1.normalize(x)
        z, found["attn_out"] = self.attn(self.ln1(x, n1), segment_ids, positions, attn_block)
        found["attn_z"] = z.reshape(b, t, -1)  # head-major
        if self.parallel:  # both branches read the layer's input; there is no resid_mid
            mid = x
        else:
            mid = found["resid_mid"] = x + found["attn_out"]
        found["ln2"] = n2 = self.ln2.normalize(mid)
        found["mlp_pre"], found["mlp_post"], found["mlp_out"] = self.mlp(self.ln2(mid, n2))
        if self.parallel:
            x = found["resid_post"] = found["mlp_out"] + found["attn_out"] + x  # transformers' order of sums
        else:
            x = found["resid_post"] = mid + found["mlp_out"]
        return x, {k: v for k, v in found.items() if k in want}


class Decoder(nnx.Module):
    """The embeddings and the first `n_layers` blocks (as many as the deepest site needs)."""

    def __init__(self, cfg: Config, n_layers: int, dtype=jnp.float32):
        self.embed = _Table(cfg.vocab, cfg.hidden, "vocab", dtype)
        if cfg.learned_pos:
            self.pos = _Table(cfg.max_pos, cfg.hidden, "pos", dtype)
        self.learned_pos, self.max_pos = cfg.learned_pos, cfg.max_pos
        self.layers = nnx.List([Block(cfg, dtype) for _ in range(n_layers)])

    def __call__(self, token_ids, segment_ids, positions, *, sites: tuple[str, ...], attn_block: int = 512) -> dict:
        captured = {}
        x = self.embed(token_ids)
        if site_names.EMBED in sites:
            captured[site_names.EMBED] = x  # TransformerLens's hook_embed: the token embedding alone
        if self.learned_pos:
            # Clipped: a packed row's padding may count past the table (its values are never stored).
            x = x + self.pos(jnp.minimum(positions, self.max_pos - 1))
        for i in range(site_names.layers_needed(sites)):
            want = frozenset(k for k in site_names.LAYER_KINDS if site_names.name(k, i) in sites)
            x, found = self.layers[i](x, segment_ids, positions, attn_block, want)
            captured.update({site_names.name(k, i): v for k, v in found.items()})
        return captured


class _Table(nnx.Module):
    def __init__(self, rows: int, dim: int, axis: str, dtype):
        self.table = param((rows, dim), (axis, "embed"), dtype)

    def __call__(self, ids):
        return self.table[...][ids]


# ----------------------------------------------------------------------------------------------------
# The checkpoint layout (actfleet.worker.convert)
# ----------------------------------------------------------------------------------------------------

HF_LAYER = "transformer.h.{i}."
BASE_PREFIX = "transformer."  # the hub's gpt2 checkpoint was saved from GPT2Model: "h.0.attn.c_attn.weight"
# Conv1D stores [in, out]; c_attn's out axis is (q | k | v) x heads x head_dim: "3" picks one of the three.
LAYOUTS: dict[str, tuple] = {
    "embed.table": ("transformer.wte.weight", (("v",), ("d",)), "vd"),
    "pos.table": ("transformer.wpe.weight", (("p",), ("d",)), "pd"),
    "ln1.weight": ("ln_1.weight", (("d",),), "d"),
    "ln1.bias": ("ln_1.bias", (("d",),), "d"),
    "ln2.weight": ("ln_2.weight", (("d",),), "d"),
    "ln2.bias": ("ln_2.bias", (("d",),), "d"),
    **{f"attn.w{n}": ("attn.c_attn.weight", (("d",), ("3", "h", "e")), "dhe", {"3": j}) for j, n in enumerate("qkv")},
    **{f"attn.b{n}": ("attn.c_attn.bias", (("3", "h", "e"),), "he", {"3": j}) for j, n in enumerate("qkv")},
    "attn.wo": ("attn.c_proj.weight", (("h", "e"), ("d",)), "hed"),
    "attn.bo": ("attn.c_proj.bias", (("d",),), "d"),
    "mlp.w_in": ("mlp.c_fc.weight", (("d",), ("f",)), "df"),
    "mlp.b_in": ("mlp.c_fc.bias", (("f",),), "f"),
    "mlp.w_out": ("mlp.c_proj.weight", (("f",), ("d",)), "fd"),
    "mlp.b_out": ("mlp.c_proj.bias", (("d",),), "d"),
}
# The LM head, the final LayerNorm (after the last resid_post) and the causal-mask buffers older checkpoints
# carry ("h.0.attn.bias", "h.0.attn.masked_bias").
UNUSED = (r"lm_head\.weight", r"transformer\.ln_f\.(weight|bias)", r"transformer\.h\.\d+\.attn\.(masked_)?bias")


def sizes(cfg: Config) -> dict[str, int]:
    return {
        "v": cfg.vocab,
        "p": cfg.max_pos,
        "d": cfg.hidden,
        "h": cfg.heads,
        "e": cfg.head_dim,
        "f": cfg.intermediate,
        "3": 3,
    }
