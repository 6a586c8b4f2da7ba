"""Model families, one file each: a config dataclass, weights as a plain pytree, forward as pure functions.

`family_for(model_type)` maps a Hugging Face `config.json` model_type to its module.
"""

from __future__ import annotations

from types import ModuleType

from actfleet.worker.models import gemma, gemma3_mm, qwen2

# Llama/Mistral/Qwen3 are Qwen2 with different switches (no QKV bias, per-head q/k norm), see qwen2.Config.
FAMILIES: dict[str, ModuleType] = {"qwen2": qwen2, "llama": qwen2, "mistral": qwen2, "qwen3": qwen2}
FAMILIES["gemma2"] = gemma  # Gemma 2 (engineer gemma)
FAMILIES["gemma3_text"] = gemma  # Gemma 3 text, Gemma3ForCausalLM (engineer gemma)
FAMILIES["gemma3"] = gemma3_mm  # Gemma 3's text tower in Gemma3ForConditionalGeneration checkpoints (engineer gemma)


def family_for(model_type: str) -> ModuleType:
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise KeyError(f"model_type {model_type!r} is not supported (supported: {', '.join(sorted(FAMILIES))})") from None
