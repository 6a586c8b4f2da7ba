"""The column name SAELens looks for: its `hook_name`, which depends on how it loads the model.

SAELens 6.54 reads a cached dataset's activations from the column named `cfg.hook_name`
(ActivationsStore.load_cached_activation_dataset), and its runner loads `model_name` with
`model_class_name` before training, even in cached mode (LanguageModelSAETrainingRunner -> load_model):

- "HookedTransformer" (`--model-class transformer_lens`): TransformerLens's hook names, which are
  actfleet's site names (`blocks.6.hook_resid_post`). TransformerLens loads hub names it knows, not a
  local directory or a bucket.
- "AutoModelForCausalLM" (`--model-class hf`): HookedProxyLM hooks `model.named_modules()` by name and
  takes each module's output (output[0] of a tuple), and refuses a hook_name that is no module
  ("hook_names not found as submodules of the model"). So the column must be the module whose output
  *is* the site: the decoder layer L's output is resid_post of L (and resid_pre of L + 1). Sites that
  are no module's output (resid_mid, hook_z, the norms before their weight, ...) are refused by name.
  The layers' module path depends on the architecture (config.json's model_type).
"""

from __future__ import annotations

import json
from pathlib import Path

from actfleet import sites as site_names
from actfleet.errors import InputError

MODEL_CLASSES = {"transformer_lens": "HookedTransformer", "hf": "AutoModelForCausalLM"}

# model_type -> the decoder layers' module path in transformers' AutoModelForCausalLM (checked against the
# real module tree for each family by tests/test_saelens_names.py).
HF_LAYERS = {
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "llama": "model.layers",
    "mistral": "model.layers",
    "gemma2": "model.layers",
    "gemma3_text": "model.layers",
    "gpt2": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
}


def hook_name(site: str, model_class: str, shard_metadata: dict) -> str:
    """The column for `site` that SAELens with `model_class` (a MODEL_CLASSES key) looks for."""
    if model_class not in MODEL_CLASSES:
        raise InputError(f"--model-class {model_class}: use one of {', '.join(MODEL_CLASSES)}")
    if model_class == "transformer_lens":
        return site
    parsed = site_names.parse(site)
    layer, kind = parsed if parsed else (None, None)
    if kind == "resid_post":
        at = layer
    elif kind == "resid_pre" and isinstance(layer, int) and layer > 0:
        at = layer - 1  # resid_pre of L is the output of layer L - 1
    else:
        raise InputError(
            f"--model-class hf: {site} is no module's output in transformers (SAELens's AutoModelForCausalLM "
            f"hooks module outputs: resid_post, or resid_pre of a layer > 0); use --model-class "
            f"transformer_lens, or --hook-name MODULE"
        )
    model_type = _model_type(shard_metadata)
    if model_type not in HF_LAYERS:
        raise InputError(
            f"--model-class hf: model_type {model_type!r} has no known layer path (known: "
            f"{', '.join(sorted(HF_LAYERS))}); pass --hook-name MODULE (a name in model.named_modules())"
        )
    return f"{HF_LAYERS[model_type]}.{at}"


def _model_type(meta: dict) -> str:
    """config.json's model_type of the model the shards were made with (their `model` metadata: a local
    directory, a gs:// prefix or a hub id at `resolved_revision`)."""
    model = meta.get("model", "")
    try:
        if model.startswith("gs://"):
            from actfleet.store import open_store

            raw = open_store(model).read("config.json")[0]
        elif Path(model.removeprefix("file://"), "config.json").is_file():
            raw = Path(model.removeprefix("file://"), "config.json").read_bytes()
        else:
            from huggingface_hub import hf_hub_download

            revision = meta.get("resolved_revision") or meta.get("revision") or None
            raw = Path(hf_hub_download(model, "config.json", revision=revision)).read_bytes()
        return str(json.loads(raw)["model_type"])
    except Exception as e:  # any way of not finding it ends the same: name the model, offer --hook-name
        raise InputError(
            f"--model-class hf: cannot read config.json of the shards' model {model!r} to name the module "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); pass --hook-name MODULE, "
            f"e.g. model.layers.6"
        ) from None
