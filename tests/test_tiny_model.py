"""actfleet.demo.tiny_model writes a model dir that transformers loads offline, with Qwen's tokens and template."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from actfleet.demo.tiny_model import make_tiny_model


def test_tiny_model_loads_in_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    out = make_tiny_model(tmp_path / "m", layers=3, hidden=32, heads=4, kv_heads=1, intermediate=48, tie=False)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["actfleet_random_weights"] is True

    tok = AutoTokenizer.from_pretrained(out)
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert tok.convert_tokens_to_ids(special) < config["vocab_size"]
    ids = tok("Grid 3x3:\n0: 1 2 3")["input_ids"]
    assert tok.decode(ids) == "Grid 3x3:\n0: 1 2 3"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat.startswith("<|im_start|>system\n") and "<|im_start|>user\nhi<|im_end|>\n" in chat

    model = Qwen2ForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 3 and model.config.num_key_value_heads == 1
    assert not model.config.tie_word_embeddings
    with torch.no_grad():
        hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    assert len(hidden) == 4 and hidden[-1].shape == (1, len(ids), 32)


def test_seed_decides_the_weights(tmp_path):
    a = load_file(make_tiny_model(tmp_path / "a", seed=1) / "model.safetensors")
    b = load_file(make_tiny_model(tmp_path / "b", seed=1) / "model.safetensors")
    c = load_file(make_tiny_model(tmp_path / "c", seed=2) / "model.safetensors")
    assert sorted(a) == sorted(b) and "lm_head.weight" not in a  # tied by default
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["model.layers.0.self_attn.q_proj.weight"], c["model.layers.0.self_attn.q_proj.weight"])


def test_rejects_impossible_shapes(tmp_path):
    with pytest.raises(ValueError, match="kv_heads"):
        make_tiny_model(tmp_path / "bad", heads=4, kv_heads=3)


def test_model_dir_check_knows_every_family():
    from actfleet.worker.model_files import SUPPORTED_MODEL_TYPES
    from actfleet.worker.models import FAMILIES

    assert sorted(SUPPORTED_MODEL_TYPES) == sorted(FAMILIES)
