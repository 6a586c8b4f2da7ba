"""Model families, one file each: a config dataclass, weights as a plain pytree, forward as pure functions.

`family_for(model_type)` maps a Hugging Face `config.json` model_type to its module.
"""

from __future__ import annotations

from types import ModuleType

from actfleet.worker.models import gemma, gemma3_mm, gpt2, gpt_neox, qwen2

FAMILIES: dict[str, ModuleType] = {
    # Llama/Mistral/Qwen3 are Qwen2 with different switches (QKV/o/MLP biases, q/k norm, activation, rope scaling,
    # sliding window), see qwen2.Config.
    "qwen2": qwen2,
    "llama": qwen2,
    "mistral": qwen2,
    "qwen3": qwen2,
    "gpt2": gpt2,
    "gpt_neox": gpt_neox,  # Pythia
    "gemma2": gemma,  # Gemma 2
    "gemma3_text": gemma,  # Gemma 3 text, Gemma3ForCausalLM
    "gemma3": gemma3_mm,  # Gemma 3's text tower in Gemma3ForConditionalGeneration checkpoints
}


def family_for(model_type: str) -> ModuleType:
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise KeyError(
            f"model_type {model_type!r} is not supported (supported: {', '.join(sorted(FAMILIES))})"
        ) from None
