"""Every field of each supported family's transformers config class has been looked at.

A family module's CONFIG_FIELDS maps each field to "honoured" (from_hf reads it and the model computes it),
"irrelevant" (it does not change the activations: token ids, caching, dropout, the LM head ...) or "refused"
(from_hf refuses a non-default value by name). When transformers adds a field, the test below fails until
somebody decides which it is; a refused field's non-default value must really be refused.
"""

import pytest

transformers = pytest.importorskip("transformers")

from actfleet.worker.models import FAMILIES  # noqa: E402
from actfleet.worker.models.config_check import UnsupportedConfig  # noqa: E402

KINDS = {"honoured", "irrelevant", "refused"}


def config_class(model_type):
    return type(transformers.AutoConfig.for_model(model_type))


def default_config(model_type) -> dict:
    return config_class(model_type)().to_dict()


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_every_config_field_is_classified(model_type):
    fields = FAMILIES[model_type].CONFIG_FIELDS
    assert set(fields.values()) <= KINDS, {k: v for k, v in fields.items() if v not in KINDS}
    installed = set(default_config(model_type)) | set(transformers.PretrainedConfig().to_dict())
    unlisted = sorted(installed - set(fields))
    assert not unlisted, (
        f"transformers {transformers.__version__}'s {config_class(model_type).__name__} has fields "
        f"{FAMILIES[model_type].__name__}.CONFIG_FIELDS does not classify: {unlisted}"
    )


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_the_default_config_is_computed(model_type):
    FAMILIES[model_type].Config.from_hf(default_config(model_type))


def non_default(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "_other"
    return 1 if value is None else None


REFUSED = [(t, f) for t in sorted(FAMILIES) for f, kind in FAMILIES[t].CONFIG_FIELDS.items() if kind == "refused"]


@pytest.mark.parametrize("model_type,field", REFUSED, ids=[f"{t}-{f}" for t, f in REFUSED])
def test_a_refused_field_is_refused_by_name(model_type, field):
    config = default_config(model_type)
    config[field] = non_default(config.get(field))
    with pytest.raises(UnsupportedConfig, match=f"config.json {field}="):
        FAMILIES[model_type].Config.from_hf(config)


@pytest.mark.parametrize(
    "model_type,field,value",
    [
        ("llama", "hidden_act", "gelu_fast"),
        ("gpt2", "activation_function", "quick_gelu"),
        ("gpt_neox", "hidden_act", "tanh"),
        ("llama", "rope_parameters", {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}),
        ("qwen2", "rope_parameters", {"rope_type": "longrope", "rope_theta": 1e4}),
        ("gpt_neox", "rope_parameters", {"rope_type": "proportional", "rope_theta": 1e4}),
    ],
)
def test_honoured_fields_refuse_values_not_computed(model_type, field, value):
    config = default_config(model_type)
    config[field] = value
    with pytest.raises(UnsupportedConfig, match=f"config.json {field}"):
        FAMILIES[model_type].Config.from_hf(config)


def test_the_legacy_spellings_are_read():
    """config.json files written before transformers 5: Llama 3.1's rope_scaling + rope_theta, Pythia's
    rotary_pct + rotary_emb_base."""
    llama = {
        **default_config("llama"),
        "rope_parameters": None,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 8.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
    }
    cfg = FAMILIES["llama"].Config.from_hf(llama)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling == ("llama3", 8.0, 1.0, 4.0, 8192)
    pythia = {
        **default_config("gpt_neox"),
        "rope_parameters": None,
        "rope_scaling": None,
        "rotary_pct": 0.5,
        "rotary_emb_base": 20000,
        "hidden_size": 64,
        "num_attention_heads": 4,
    }
    cfg = FAMILIES["gpt_neox"].Config.from_hf(pythia)
    assert (cfg.rotary_ndims, cfg.rope_theta) == (8, 20000.0)
