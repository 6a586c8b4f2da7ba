"""The column SAELens looks for, per --model-class (issue 23, item 3): TransformerLens names for
HookedTransformer; for AutoModelForCausalLM the module whose output is the site, checked against the real
transformers module tree and forward of every family in the table."""

from __future__ import annotations

import json

import pytest

from actfleet.errors import InputError
from actfleet.worker.saelens_names import HF_LAYERS, hook_name
from tests.fakes.gcs_server import fake_gcs  # noqa: F401  (fixture)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
CONFIGS = {
    "qwen2": dict(SMALL, num_key_value_heads=2),
    "qwen3": dict(SMALL, num_key_value_heads=2, head_dim=8),
    "llama": dict(SMALL, num_key_value_heads=2),
    "mistral": dict(SMALL, num_key_value_heads=2),
    "gemma2": dict(SMALL, num_key_value_heads=2, head_dim=8),
    "gemma3_text": dict(SMALL, num_key_value_heads=2, head_dim=8),
    "gpt2": dict(vocab_size=100, n_embd=32, n_layer=2, n_head=4),
    "gpt_neox": dict(SMALL),
}


def test_every_family_in_the_table_is_tested():
    assert set(CONFIGS) == set(HF_LAYERS)


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_the_module_named_for_resid_post_outputs_it(tmp_path, model_type):
    """For each family: the named module exists in AutoModelForCausalLM (as SAELens's HookedProxyLM looks it
    up) and its output is the residual stream after layer 0 (transformers' hidden_states[1])."""
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(model_type, **CONFIGS[model_type])
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    config.save_pretrained(tmp_path)
    meta = {"model": str(tmp_path), "revision": "main"}
    name = hook_name("blocks.0.hook_resid_post", "hf", meta)
    assert name == hook_name("blocks.1.hook_resid_pre", "hf", meta) == f"{HF_LAYERS[model_type]}.0"
    modules = dict(model.named_modules())
    assert name in modules, sorted(modules)[:20]
    got = {}
    modules[name].register_forward_hook(lambda m, i, o: got.setdefault("out", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        hidden = model(torch.arange(7)[None] % 100, output_hidden_states=True).hidden_states
    torch.testing.assert_close(got["out"], hidden[1])


def test_transformer_lens_names_are_the_sites_and_others_are_refused_by_name(tmp_path):
    assert hook_name("blocks.3.attn.hook_z", "transformer_lens", {}) == "blocks.3.attn.hook_z"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    meta = {"model": str(tmp_path)}
    for site in ("blocks.1.hook_resid_mid", "blocks.0.hook_resid_pre", "blocks.1.ln1.hook_normalized", "hook_embed"):
        with pytest.raises(InputError, match=f"--model-class hf: {site} is no module's output"):
            hook_name(site, "hf", meta)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3"}))
    with pytest.raises(InputError, match="model_type 'gemma3' has no known layer path.*--hook-name"):
        hook_name("blocks.1.hook_resid_post", "hf", meta)
    with pytest.raises(InputError, match="cannot read config.json of the shards' model 'org/none'.*--hook-name"):
        hook_name("blocks.1.hook_resid_post", "hf", {"model": "org/none", "revision": "main"})


def test_a_model_in_a_bucket(fake_gcs):  # noqa: F811
    from actfleet.store import open_store

    open_store("gs://acts/models/m").put("config.json", json.dumps({"model_type": "gpt_neox"}).encode())
    assert hook_name("blocks.4.hook_resid_post", "hf", {"model": "gs://acts/models/m"}) == "gpt_neox.layers.4"
