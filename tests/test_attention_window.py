"""The attention kernel's options (sliding window, logit soft-capping, query scale) against a dense reference,
the window's key-block skipping, and Mistral / Qwen2 sliding-window models against transformers on inputs
much longer than the window."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from actfleet.worker.attention import NEG_INF, attention


def dense(q, k, v, segment_ids, *, window=None, softcap=None, scale=None):
    """Plain T x T attention with transformers' eager semantics: scale, soft-cap, then the mask
    (causal, same segment, and q - k < window as masking_utils.sliding_window_overlay)."""
    b, t, h, hd = q.shape
    g = h // k.shape[2]
    k = jnp.repeat(k, g, axis=2).astype(jnp.float32)
    v = jnp.repeat(v, g, axis=2).astype(jnp.float32)
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k) * (hd**-0.5 if scale is None else scale)
    if softcap is not None:
        s = jnp.tanh(s / softcap) * softcap
    idx = jnp.arange(t)
    allowed = idx[None, :] <= idx[:, None]
    if window is not None:
        allowed &= idx[None, :] > idx[:, None] - window
    mask = allowed[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])
    s = jnp.where(mask[:, None], s, NEG_INF)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v).astype(q.dtype)


def packed(t=96):
    """Row 0: sequences of 40, 1 and 50 tokens, then 5 padding; row 1: one sequence of 96."""
    seg, pos = np.zeros((2, t), np.int32), np.zeros((2, t), np.int32)
    at = 0
    for s, n in enumerate((40, 1, 50), start=1):
        seg[0, at : at + n], pos[0, at : at + n] = s, np.arange(n)
        at += n
    pos[0, at:] = np.arange(t - at)
    seg[1], pos[1] = 1, np.arange(t)
    return jnp.asarray(seg), jnp.asarray(pos)


@pytest.mark.parametrize(
    "window,softcap,scale",
    [
        (16, None, None),
        (1, None, None),
        (23, None, None),
        (1000, None, None),  # whole blocks, self only, ragged, wide
        (None, 1.5, None),
        (None, None, 0.37),
        (13, 2.0, 0.2),
    ],
)
def test_options_match_dense(window, softcap, scale):
    rng = np.random.default_rng(0)
    b, t, h, kvh, hd = 2, 96, 4, 2, 8
    # Large scores, so a soft-cap of 1.5-2 bends them and the attention is far from uniform.
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, n, hd)) * 2, jnp.float32) for n in (h, kvh, kvh))
    seg, pos = packed(t)
    with jax.default_matmul_precision("highest"):
        want = dense(q, k, v, seg, window=window, softcap=softcap, scale=scale)
        plain = dense(q, k, v, seg)
        changed = float(jnp.abs(want - plain).max())
        # the option changes the answer (it is really tested), except a window wider than any sequence
        assert changed == 0.0 if window == 1000 else changed > 1e-2
        for block in (16, 128):  # six blocks walked by the loop; one block for the whole row (no loop)
            got = jax.jit(lambda *a: attention(*a, block=block, window=window, softcap=softcap, scale=scale))(
                q, k, v, seg, pos
            )
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_key_blocks_outside_the_window_are_never_read():
    """NaN values in the first key block poison every query block that walks it (0 * NaN is NaN): with a
    16-token window and 16-token blocks, query blocks 2.. must not walk block 0, so they stay finite."""
    rng = np.random.default_rng(1)
    t, blk = 128, 16
    q, k, v = (jnp.asarray(rng.standard_normal((1, t, 2, 8)), jnp.float32) for _ in range(3))
    v = v.at[:, :blk].set(jnp.nan)
    seg, pos = jnp.ones((1, t), jnp.int32), jnp.arange(t, dtype=jnp.int32)[None]
    out = np.asarray(jax.jit(lambda *a: attention(*a, block=blk, window=blk))(q, k, v, seg, pos))
    assert np.isnan(out[0, :blk]).all() and np.isfinite(out[0, 2 * blk :]).all()
    full = np.asarray(jax.jit(lambda *a: attention(*a, block=blk))(q, k, v, seg, pos))
    assert np.isnan(full).all()  # without the window every query reads block 0: the probe can fail


def test_defaults_compile_the_same_program():
    """Leaving the options at their defaults costs nothing: the same HLO as before the options existed
    (no tanh, no window comparison)."""
    spec = jax.ShapeDtypeStruct((1, 64, 2, 8), jnp.float32)
    ids = jax.ShapeDtypeStruct((1, 64), jnp.int32)

    def hlo(**kw):
        return jax.jit(lambda *a: attention(*a, block=16, **kw)).lower(spec, spec, spec, ids, ids).as_text()

    assert hlo() == hlo(window=None, softcap=None, scale=None) == hlo(scale=8**-0.5)
    assert "tanh" not in hlo() and "tanh" in hlo(softcap=2.0)
    assert hlo(window=8) != hlo()


# ---------------------------------------------------------------------------------------------------
# Mistral and Qwen2 with a sliding window, against transformers
# ---------------------------------------------------------------------------------------------------

torch = pytest.importorskip("torch")

WINDOW = 16


def save_with_tokenizer(model, root):
    from actfleet.demo.tiny_model import make_tiny_model

    tiny = make_tiny_model(root / "tok")
    with torch.no_grad():  # norms away from 1 so a missing term shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(root / "m")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny / f).exists():
            shutil.copy(tiny / f, root / "m" / f)
    return root / "m"


@pytest.mark.parametrize("family", ["mistral", "qwen2-max-window-layers", "qwen2-layer-types"])
def test_sliding_window_models_match_transformers(tmp_path, family):
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from tests.test_model_gemma import LONG_TEXTS
    from tests.test_model_parity import extract_all, hf_reference, worst_relative_error

    common = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        sliding_window=WINDOW,
        initializer_range=0.1,
    )
    torch.manual_seed(0)
    if family == "mistral":
        model, sliding = MistralForCausalLM(MistralConfig(**common)), (0, 1, 2)
    elif family == "qwen2-max-window-layers":  # layers >= max_window_layers slide
        model, sliding = Qwen2ForCausalLM(Qwen2Config(use_sliding_window=True, max_window_layers=1, **common)), (1, 2)
    else:
        types = ["sliding_attention", "full_attention", "sliding_attention"]
        model, sliding = Qwen2ForCausalLM(Qwen2Config(use_sliding_window=True, layer_types=types, **common)), (0, 2)
    model_dir = save_with_tokenizer(model, tmp_path)
    if family == "qwen2-max-window-layers":  # as the hub's older configs: no layer_types, the rule decides
        config = json.loads((model_dir / "config.json").read_text())
        del config["layer_types"]
        (model_dir / "config.json").write_text(json.dumps(config))
    engine, _, cat, acts = extract_all(
        model_dir, LONG_TEXTS, compute_dtype="float32", store_dtype="float32", batch_tokens=512, attn_block=16
    )
    assert engine.config.sliding == sliding and engine.config.sliding_window == WINDOW
    assert max(len(ids) for ids in engine.tokenize(LONG_TEXTS)) > 4 * WINDOW
    ref = hf_reference(model_dir, engine.tokenize(LONG_TEXTS))
    assert worst_relative_error(engine, LONG_TEXTS, cat, acts, ref) < 1e-4


def test_sliding_window_config_rules():
    from actfleet.worker.models.qwen2 import Config

    base = dict(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=4, num_attention_heads=2)
    assert Config.from_hf({**base, "model_type": "mistral", "sliding_window": None}).sliding == ()
    assert Config.from_hf({**base, "model_type": "mistral", "sliding_window": 4096}).sliding == (0, 1, 2, 3)
    # Qwen2.5's configs: use_sliding_window false -> no window whatever sliding_window says
    q = {**base, "model_type": "qwen2", "sliding_window": 131072, "max_window_layers": 2}
    assert Config.from_hf(q).sliding_window is None
    assert Config.from_hf({**q, "use_sliding_window": True}).sliding == (2, 3)
    assert Config.from_hf({**base, "model_type": "llama", "sliding_window": 8}).sliding == ()
