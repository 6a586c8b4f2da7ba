"""GPT-NeoX (Pythia): GPT-2's block (actfleet.worker.models.gpt2) with partial rotary embeddings instead of
learned positions, a fused per-head query_key_value projection, and by default the parallel residual
x + attn(ln1(x)) + mlp(ln2(x)) (`use_parallel_residual`; the sequential form when false).

Sites: as GPT-2's, except that a parallel-residual model has no blocks.L.hook_resid_mid (TransformerLens has
none either: nothing is added between attention and MLP); asking for it is refused by name. ln2.hook_normalized
is then the normalized layer input that the MLP reads.
"""

from __future__ import annotations

from dataclasses import dataclass

from actfleet.worker.models import gpt2
from actfleet.worker.models.common import PRETRAINED_IRRELEVANT, check_activation, rope_from_hf
from actfleet.worker.models.gpt2 import Decoder  # noqa: F401  (the family's interface: GPT-2's network)

FAMILY = "gpt_neox"

_IRRELEVANT = (
    *PRETRAINED_IRRELEVANT,
    "tie_word_embeddings",
    "attention_dropout",
    "hidden_dropout",
    "classifier_dropout",
    "is_decoder",
)
_HONOURED = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "max_position_embeddings",
    "layer_norm_eps",
    "use_parallel_residual",
    "attention_bias",
    # RoPE: transformers 5 keeps theta and the rotary fraction in rope_parameters; Pythia's config.json spells
    # them rotary_emb_base and rotary_pct.
    "rope_parameters",
    "rope_scaling",
    "rotary_pct",
    "rotary_emb_base",
    "partial_rotary_factor",
)
CONFIG_FIELDS: dict[str, str] = {**{f: "irrelevant" for f in _IRRELEVANT}, **{f: "honoured" for f in _HONOURED}}


@dataclass(frozen=True)
class Config(gpt2.Config):
    """gpt2.Config read from a GPT-NeoX config.json (its own class, so the converter finds this module)."""

    @staticmethod
    def from_hf(c: dict) -> "Config":
        return _from_hf(c)


def _from_hf(c: dict) -> Config:
    d, h = c["hidden_size"], c["num_attention_heads"]
    head_dim = d // h
    theta, scaling = rope_from_hf(FAMILY, c, theta_default=float(c.get("rotary_emb_base", 10000.0)))
    params = c.get("rope_parameters") or c.get("rope_scaling") or {}
    pct = float(params.get("partial_rotary_factor", c.get("partial_rotary_factor", c.get("rotary_pct", 0.25))))
    return Config(
        vocab=c["vocab_size"],
        hidden=d,
        intermediate=c["intermediate_size"],
        layers=c["num_hidden_layers"],
        heads=h,
        head_dim=head_dim,
        eps=float(c.get("layer_norm_eps", 1e-5)),
        max_pos=int(c.get("max_position_embeddings", 2048)),
        act=check_activation(FAMILY, "hidden_act", c.get("hidden_act", "gelu")),
        attn_bias=bool(c.get("attention_bias", True)),
        learned_pos=False,
        rotary_ndims=int(head_dim * pct),
        rope_theta=theta,
        rope_scaling=scaling,
        parallel=bool(c.get("use_parallel_residual", True)),
    )


HF_LAYER = "gpt_neox.layers.{i}."
BASE_PREFIX = "gpt_neox."
# query_key_value's out axis is heads x (q | k | v) x head_dim (per head, q k v side by side): "3" picks one.
LAYOUTS: dict[str, tuple] = {
    "embed.table": ("gpt_neox.embed_in.weight", (("v",), ("d",)), "vd"),
    "ln1.weight": ("input_layernorm.weight", (("d",),), "d"),
    "ln1.bias": ("input_layernorm.bias", (("d",),), "d"),
    "ln2.weight": ("post_attention_layernorm.weight", (("d",),), "d"),
    "ln2.bias": ("post_attention_layernorm.bias", (("d",),), "d"),
    **{
        f"attn.w{n}": ("attention.query_key_value.weight", (("h", "3", "e"), ("d",)), "dhe", {"3": j})
        for j, n in enumerate("qkv")
    },
    **{
        f"attn.b{n}": ("attention.query_key_value.bias", (("h", "3", "e"),), "he", {"3": j})
        for j, n in enumerate("qkv")
    },
    "attn.wo": ("attention.dense.weight", (("d",), ("h", "e")), "hed"),
    "attn.bo": ("attention.dense.bias", (("d",),), "d"),
    "mlp.w_in": ("mlp.dense_h_to_4h.weight", (("f",), ("d",)), "df"),
    "mlp.b_in": ("mlp.dense_h_to_4h.bias", (("f",),), "f"),
    "mlp.w_out": ("mlp.dense_4h_to_h.weight", (("d",), ("f",)), "fd"),
    "mlp.b_out": ("mlp.dense_4h_to_h.bias", (("d",),), "d"),
}
# The LM head (embed_out), the final LayerNorm, and the mask/rotary buffers older checkpoints carry.
UNUSED = (
    r"embed_out\.weight",
    r"gpt_neox\.final_layer_norm\.(weight|bias)",
    r"gpt_neox\.layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)",
)
sizes = gpt2.sizes
