"""Gemma 3's text tower inside the multimodal checkpoints (model_type "gemma3", Gemma3ForConditionalGeneration:
gemma-3-4b/12b/27b): the same network as actfleet.worker.models.gemma's gemma3_text, read from `text_config`
and from the hub's tensor names (`language_model.model.*`, as transformers 4.50+ saved them; transformers 5
renames them on load). Only text goes in: the vision tower and projector are never read.

`text_config` on the hub holds only what differs from Gemma3TextConfig's defaults (gemma-3-4b-pt: sizes,
layers, rope_scaling, sliding_window), so the defaults come from transformers' own class.
"""

from __future__ import annotations

from dataclasses import fields

from actfleet.worker.models import gemma
from actfleet.worker.models.gemma import Decoder, sizes  # noqa: F401  (the family interface)


class Config(gemma.Config):
    """gemma.Config of the text tower (a subclass so the converter finds this module's LAYOUTS)."""

    @staticmethod
    def from_hf(c: dict) -> "Config":
        from transformers import Gemma3TextConfig

        text = dict(c.get("text_config") or {})
        text.pop("model_type", None)
        full = Gemma3TextConfig(**text).to_dict()
        cfg = gemma.Config.from_hf({**full, "model_type": "gemma3_text"})
        return Config(**{f.name: getattr(cfg, f.name) for f in fields(cfg)})


HF_LAYER = "language_model.model.layers.{i}."
LAYOUTS = {
    k: (("language_model." + hf) if k == "embed.table" else hf, split, order)
    for k, (hf, split, order) in gemma.LAYOUTS.items()
}
UNUSED = (
    r"language_model\.lm_head\.weight",
    r"language_model\.model\.norm\.weight",
    r"vision_tower\..*",
    r"multi_modal_projector\..*",
)

# Gemma3Config's own fields; text_config's are gemma.CONFIG_FIELDS (checked there, for gemma3_text).
CONFIG_FIELDS: dict[str, str] = {
    **{f: v for f, v in gemma.CONFIG_FIELDS.items() if v == "irrelevant"},
    "model_type": "honoured",
    "text_config": "honoured",
    # images only (no image goes in) or the LM head
    **{
        f: "irrelevant"
        for f in (
            "vision_config",
            "mm_tokens_per_image",
            "boi_token_index",
            "eoi_token_index",
            "image_token_index",
            "initializer_range",
            "tie_word_embeddings",
        )
    },
}
