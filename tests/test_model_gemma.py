"""Gemma 2 and Gemma 3 (text) agree with transformers at every site kind, sliding and global layers, float32
and bfloat16, on packed rows of mixed lengths longer than the sliding window; and run through `extract` and
`prepare` / `work` / `export saelens`.

The tiny models are built with transformers' own config classes at small sizes with the real checkpoints'
shape ratios (heads * head_dim != hidden_size as in gemma-2-2b, query_pre_attn_scalar != head_dim as in
gemma-2-27b, intermediate 4x hidden, grouped-query attention), a sliding window of 16 tokens, a soft-cap low
enough to bend the scores, weights wide enough that the attention is far from uniform, and every norm's w
moved away from 0 so a missing (1 + w) shows.

Reference hooks (transformers' modules; TransformerLens's names): resid_pre is the layer's input; ln1 / ln2
are input_layernorm's / pre_feedforward_layernorm's input / rms; attn_z is o_proj's input; attn_out is
post_attention_layernorm's output and mlp_out post_feedforward_layernorm's (what is added to the residual, as
TL's Gemma 2 hooks, after ln1_post / ln2_post); resid_mid is pre_feedforward_layernorm's input; mlp_pre
gate_proj's output, mlp_post down_proj's input; resid_post the layer's output; hook_embed embed_tokens's
output (after the sqrt(d) scale, as TL's W_E which has it folded in).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from actfleet import sites as site_names  # noqa: E402
from actfleet.demo.tiny_model import make_tiny_model  # noqa: E402
from tests.test_model_parity import TEXTS, extract_all, worst_relative_error  # noqa: E402

WINDOW = 16
# Long inputs (well past the window, several attention blocks) next to 1-token ones, in one batch.
LONG_TEXTS = TEXTS + ["The quick brown fox jumps over the lazy dog. " * 12, "0: 1 2\n1: 3 4\n" * 20]

SHAPES = {
    # gemma-2-2b's ratios scaled down: 8 heads x 256 = 2048 != 2304 hidden, 4 kv heads, d_mlp 4x hidden.
    # Layers: sliding, global, sliding (Gemma 2's default even/odd pattern).
    "gemma2": dict(
        vocab_size=320,
        hidden_size=72,
        intermediate_size=288,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=WINDOW,
        attn_logit_softcapping=2.0,
        final_logit_softcapping=30.0,
        max_position_embeddings=1024,
        initializer_range=0.15,
    ),
    # gemma-3-4b's ratios (8 heads, 4 kv heads, head_dim 256, hidden 2560; linear rope scaling 8 on global
    # layers); an explicit layer pattern: sliding, global, sliding, sliding.
    "gemma3": dict(
        vocab_size=320,
        hidden_size=80,
        intermediate_size=320,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=20,
        sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        },
        max_position_embeddings=1024,
        initializer_range=0.15,
    ),
}


def make_gemma(root, family: str, seed: int = 0, hub_spelling: bool = False, **overrides):
    """A tiny random Gemma 2 / Gemma 3 text model saved as safetensors with the tiny tokenizer; returns its dir.
    `hub_spelling`: config.json rewritten as the hub's checkpoints spell it (transformers 4.x: no layer_types,
    rope_theta / rope_local_base_freq / rope_scaling, Gemma 3's sliding_window_pattern), which transformers
    and actfleet must both turn into the same layer pattern and RoPE tables."""
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        Gemma3Config,
        Gemma3ForCausalLM,
        Gemma3ForConditionalGeneration,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    tiny = make_tiny_model(root / "tok")
    torch.manual_seed(seed)
    kwargs = {**SHAPES["gemma3" if family == "gemma3-multimodal" else family], **overrides}
    if family == "gemma2":
        model = Gemma2ForCausalLM(Gemma2Config(**kwargs))
    elif family == "gemma3":
        model = Gemma3ForCausalLM(Gemma3TextConfig(**kwargs))
    else:  # gemma-3-4b's form: a vision tower and projector (never read) next to the text tower
        vision = SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        )
        model = Gemma3ForConditionalGeneration(
            Gemma3Config(text_config=Gemma3TextConfig(**kwargs), vision_config=vision, mm_tokens_per_image=4)
        )
    with torch.no_grad():  # transformers initialises Gemma's norm weights to 0 (a scale of 1): move them
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    out = root / family
    model.save_pretrained(out)
    if hub_spelling:
        c = json.loads((out / "config.json").read_text())
        types, rope = c.pop("layer_types"), c.pop("rope_parameters")
        if family == "gemma2":
            assert types == ["sliding_attention", "full_attention"] * (len(types) // 2) + ["sliding_attention"] * (
                len(types) % 2
            )
            c["rope_theta"] = rope["rope_theta"]
        else:
            pattern = 2  # layers 1, 3 global: differs from the explicit pattern in SHAPES
            c.update(
                sliding_window_pattern=pattern,
                rope_local_base_freq=rope["sliding_attention"]["rope_theta"],
                rope_theta=rope["full_attention"]["rope_theta"],
                rope_scaling={k: v for k, v in rope["full_attention"].items() if k != "rope_theta"},
            )
        (out / "config.json").write_text(json.dumps(c))
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny / f).exists():
            shutil.copy(tiny / f, out / f)
    return out


def hf_reference_gemma(model_dir, token_lists):
    """Per sample, alone: {site: [T, width]} from forward hooks on transformers' float32 eager model."""
    from transformers import AutoModelForCausalLM, Gemma3ForConditionalGeneration

    multimodal = json.loads((model_dir / "config.json").read_text())["model_type"] == "gemma3"
    auto = Gemma3ForConditionalGeneration if multimodal else AutoModelForCausalLM
    model = auto.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    base = model.model.language_model if multimodal else model.model
    eps = base.config.rms_norm_eps
    caps: dict = {}

    def keep(name):
        def hook(module, args, out):
            caps[name] = (out[0] if isinstance(out, tuple) else out)[0].numpy()

        return hook

    def keep_input(name, then=lambda x: x):
        def hook(module, args, kwargs):
            caps[name] = then(args[0] if args else kwargs["hidden_states"])[0].numpy()

        return hook

    def normalized(x):  # TransformerLens RMSNorm.hook_normalized: float32, before the weight
        x = x.to(torch.float32)
        return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()

    base.embed_tokens.register_forward_hook(keep("hook_embed"))
    for i, layer in enumerate(base.layers):
        name = lambda kind: site_names.name(kind, i)  # noqa: E731
        layer.register_forward_pre_hook(keep_input(name("resid_pre")), with_kwargs=True)
        layer.input_layernorm.register_forward_pre_hook(keep_input(name("ln1"), normalized), with_kwargs=True)
        layer.self_attn.o_proj.register_forward_pre_hook(keep_input(name("attn_z")), with_kwargs=True)
        layer.post_attention_layernorm.register_forward_hook(keep(name("attn_out")))
        layer.pre_feedforward_layernorm.register_forward_pre_hook(keep_input(name("resid_mid")), with_kwargs=True)
        layer.pre_feedforward_layernorm.register_forward_pre_hook(keep_input(name("ln2"), normalized), with_kwargs=True)
        layer.mlp.gate_proj.register_forward_hook(keep(name("mlp_pre")))
        layer.mlp.down_proj.register_forward_pre_hook(keep_input(name("mlp_post")), with_kwargs=True)
        layer.post_feedforward_layernorm.register_forward_hook(keep(name("mlp_out")))
        layer.register_forward_hook(keep(name("resid_post")))
    out = []
    for ids in token_lists:
        caps.clear()
        with torch.no_grad():
            hs = model(torch.tensor(np.asarray(ids, np.int64)[None]), output_hidden_states=True).hidden_states
        np.testing.assert_array_equal(caps["hook_embed"], hs[0][0].numpy())
        for i in range(len(base.layers) - 1):
            np.testing.assert_array_equal(caps[site_names.name("resid_post", i)], hs[i + 1][0].numpy())
            # what the hooks call attn_out / mlp_out is exactly what the residual adds
            np.testing.assert_allclose(
                caps[site_names.name("resid_pre", i)] + caps[site_names.name("attn_out", i)],
                caps[site_names.name("resid_mid", i)],
                rtol=1e-6,
                atol=1e-6,
            )
        out.append(dict(caps))
    return out


def per_site_errors(engine, texts, cat, acts, ref) -> dict[str, float]:
    """The worst relative L2 error of each site over every token."""
    worst = {}
    for site in engine.sites:
        for sid in range(len(texts)):
            sel = cat["sample_ids"] == sid
            got, want = acts[site][sel], ref[sid][site]
            err = np.linalg.norm(got - want, axis=-1) / np.maximum(np.linalg.norm(want, axis=-1), 1e-6)
            worst[site] = max(worst.get(site, 0.0), float(err.max()))
    return worst


@pytest.mark.parametrize(
    "family,hub_spelling",
    [("gemma2", False), ("gemma3", False), ("gemma2", True), ("gemma3", True), ("gemma3-multimodal", False)],
    ids=["gemma2", "gemma3", "gemma2-hub", "gemma3-hub", "gemma3-multimodal"],
)
def test_float32_matches_transformers_at_every_site(tmp_path, family, hub_spelling):
    model_dir = make_gemma(tmp_path, family, hub_spelling=hub_spelling)
    engine, batches, cat, acts = extract_all(
        model_dir, LONG_TEXTS, compute_dtype="float32", store_dtype="float32", batch_tokens=512, attn_block=16
    )
    cfg = engine.config
    assert cfg.sliding and len(cfg.sliding) < cfg.layers and cfg.sliding_window == WINDOW
    assert (cfg.softcap is not None) == (family == "gemma2") and cfg.qk_norm == (family != "gemma2")
    if family != "gemma2":
        assert cfg.sliding == ((0, 2) if hub_spelling else (0, 2, 3)) and cfg.rope_global == (1e6, 8.0)
    assert len(batches) >= 2 and any(b.padded_tokens < b.computed_tokens for b in batches)
    lengths = [len(ids) for ids in engine.tokenize(LONG_TEXTS)]
    assert max(lengths) > 4 * WINDOW and min(lengths) == 1
    ref = hf_reference_gemma(model_dir, engine.tokenize(LONG_TEXTS))
    errors = per_site_errors(engine, LONG_TEXTS, cat, acts, ref)
    assert set(errors) == set(engine.sites)
    assert max(errors.values()) < 1e-4, {s: e for s, e in errors.items() if e >= 1e-4}


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_bfloat16_within_stated_bound(tmp_path, family):
    """bf16 compute and storage: each stored vector within 5% (relative L2) of float32 transformers."""
    model_dir = make_gemma(tmp_path, family, seed=1)
    engine, _, cat, acts = extract_all(
        model_dir, LONG_TEXTS, compute_dtype="bfloat16", store_dtype="bfloat16", batch_tokens=1024, attn_block=32
    )
    ref = hf_reference_gemma(model_dir, engine.tokenize(LONG_TEXTS))
    err = worst_relative_error(engine, LONG_TEXTS, cat, acts, ref)
    assert 1e-4 < err < 0.05


def test_config_pattern_rope_and_refusals():
    """from_hf reads the hub's config.json spellings (gemma-2-2b, gemma-3-1b/4b) and refuses by name."""
    from actfleet.worker.models import family_for
    from actfleet.worker.models.config_check import UnsupportedConfig

    gemma = family_for("gemma2")
    g2 = dict(
        model_type="gemma2",
        vocab_size=256000,
        hidden_size=2304,
        intermediate_size=9216,
        num_hidden_layers=26,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        rope_theta=10000.0,
        query_pre_attn_scalar=256,
        sliding_window=4096,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        hidden_activation="gelu_pytorch_tanh",
    )
    c = gemma.Config.from_hf(g2)
    assert c.sliding == tuple(range(0, 26, 2)) and c.window(0) == 4096 and c.window(1) is None
    assert c.softcap == 50.0 and c.query_scale == 256**-0.5 and c.rope_global == (10000.0, 1.0)
    g3 = dict(
        model_type="gemma3_text",
        vocab_size=262144,
        hidden_size=2560,
        intermediate_size=10240,
        num_hidden_layers=34,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        rope_theta=1e6,
        rope_local_base_freq=10000.0,
        rope_scaling={"factor": 8.0, "rope_type": "linear"},
        sliding_window=1024,
        sliding_window_pattern=6,
        query_pre_attn_scalar=256,
        attn_logit_softcapping=None,
    )
    c = family_for("gemma3_text").Config.from_hf(g3)
    assert [i for i in range(34) if i not in c.sliding] == [5, 11, 17, 23, 29]
    assert c.rope_of(0) == (10000.0, 1.0) and c.rope_of(5) == (1e6, 8.0) and c.qk_norm and c.softcap is None
    # gemma-3-4b-pt's config.json: the multimodal wrapper, text_config holding only what differs from the defaults
    g3mm = {
        "model_type": "gemma3",
        "mm_tokens_per_image": 256,
        "vision_config": {"hidden_size": 1152},
        "text_config": {
            "hidden_size": 2560,
            "intermediate_size": 10240,
            "model_type": "gemma3_text",
            "num_hidden_layers": 34,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
            "sliding_window": 1024,
        },
    }
    mm = family_for("gemma3").Config.from_hf(g3mm)
    same = (
        "hidden",
        "intermediate",
        "layers",
        "heads",
        "kv_heads",
        "head_dim",
        "query_scale",
        "softcap",
        "sliding_window",
        "sliding",
        "rope_local",
        "rope_global",
        "qk_norm",
        "gelu_tanh",
    )
    assert {k: getattr(mm, k) for k in same} == {k: getattr(c, k) for k in same}
    for field, value in (
        ("hidden_activation", "relu"),
        ("attention_bias", True),
        ("use_bidirectional_attention", True),
        ("rope_scaling", {"rope_type": "yarn", "factor": 2}),
        ("layer_types", ["full_attention"]),
    ):
        with pytest.raises(UnsupportedConfig, match=f"config.json {field}="):
            gemma.Config.from_hf({**g3, field: value})


def test_config_fields_cover_the_config_classes():
    from transformers import Gemma2Config, Gemma3Config, Gemma3TextConfig

    from actfleet.worker.models import gemma, gemma3_mm

    for cls, module in ((Gemma2Config, gemma), (Gemma3TextConfig, gemma), (Gemma3Config, gemma3_mm)):
        missing = set(cls().to_dict()) - set(module.CONFIG_FIELDS)
        assert not missing, (cls.__name__, missing)
        assert set(module.CONFIG_FIELDS.values()) <= {"honoured", "irrelevant", "refused"}


def test_gemma2_matches_transformer_lens_hooks(tmp_path):
    """The same sites from TransformerLens's own Gemma 2 (HookedTransformer built offline from the config,
    weights through TL's convert_gemma_weights, nothing folded or centred: what SAELens loads)."""
    pytest.importorskip("transformer_lens")
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.gemma import convert_gemma_weights
    from transformers import AutoModelForCausalLM

    model_dir = make_gemma(tmp_path, "gemma2", seed=2)
    engine, _, cat, acts = extract_all(
        model_dir, LONG_TEXTS, compute_dtype="float32", store_dtype="float32", batch_tokens=512, attn_block=16
    )
    c = json.loads((model_dir / "config.json").read_text())
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    cfg = HookedTransformerConfig(
        d_model=c["hidden_size"],
        d_head=c["head_dim"],
        n_heads=c["num_attention_heads"],
        n_key_value_heads=c["num_key_value_heads"],
        d_mlp=c["intermediate_size"],
        n_layers=c["num_hidden_layers"],
        n_ctx=c["max_position_embeddings"],
        eps=c["rms_norm_eps"],
        d_vocab=c["vocab_size"],
        act_fn="gelu_pytorch_tanh",
        normalization_type="RMS",
        rotary_base=10000.0,
        positional_embedding_type="rotary",
        use_attn_scale=True,
        attn_scale=c["query_pre_attn_scalar"] ** 0.5,
        window_size=c["sliding_window"],
        use_local_attn=True,
        attn_types=["local" if t == "sliding_attention" else "global" for t in c["layer_types"]],
        attn_scores_soft_cap=c["attn_logit_softcapping"],
        output_logits_soft_cap=c["final_logit_softcapping"],
        gated_mlp=True,
        final_rms=True,
        use_normalization_before_and_after=True,
        original_architecture="Gemma2ForCausalLM",
        dtype=torch.float32,
        device="cpu",
    )
    tl = HookedTransformer(cfg)
    tl.load_state_dict(convert_gemma_weights(hf, cfg), strict=False)
    tl.eval()
    ref = []
    for ids in engine.tokenize(LONG_TEXTS):
        with torch.no_grad():
            _, cache = tl.run_with_cache(torch.tensor(np.asarray(ids, np.int64)[None]))
        ref.append({s: cache[s][0].reshape(len(ids), -1).numpy() for s in engine.sites})
    errors = per_site_errors(engine, LONG_TEXTS, cat, acts, ref)
    assert max(errors.values()) < 1e-4, {s: e for s, e in errors.items() if e >= 1e-4}


# ---------------------------------------------------------------------------------------------------
# Through the commands: extract (Gemma 2); prepare / work / export saelens (Gemma 3)
# ---------------------------------------------------------------------------------------------------


def cli(*args, tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, ACTFLEET_JAX_CACHE=str(tmp_path / "jaxcache"))
    r = subprocess.run(
        [sys.executable, "-c", "from actfleet.cli import main; main()", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout) if "--json" in args else r


def dataset(tmp_path, texts):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def tokenize(model_dir, texts):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return [tok(t)["input_ids"] for t in texts]


@pytest.mark.slow
def test_gemma2_extract_end_to_end(tmp_path):
    from actfleet.worker.reader import load

    model_dir = make_gemma(tmp_path, "gemma2", seed=3)
    texts = LONG_TEXTS[1:6] + LONG_TEXTS[-2:]
    sites = ("hook_embed", "blocks.1.hook_resid_post", "blocks.0.hook_attn_out", "blocks.2.mlp.hook_post")
    cli(
        "extract",
        "--model",
        str(model_dir),
        "--input",
        str(dataset(tmp_path, texts)),
        "--out",
        str(tmp_path / "out"),
        "--sites",
        ",".join(sites),
        "--positions",
        "all",
        "--unit-rows",
        "3",
        "--store-dtype",
        "float32",
        "--compute-dtype",
        "float32",
        "--json",
        tmp_path=tmp_path,
    )
    got = load(str(tmp_path / "out"))
    ids = tokenize(model_dir, texts)
    ref = hf_reference_gemma(model_dir, ids)
    for sid, want in enumerate(ref):
        sel = got["sample_ids"] == sid
        np.testing.assert_array_equal(got["token_ids"][sel], ids[sid])
        for site in sites:
            err = np.linalg.norm(got[site][sel] - want[site], axis=-1) / np.linalg.norm(want[site], axis=-1)
            assert err.max() < 1e-4, (sid, site, err.max())


@pytest.mark.slow
def test_gemma3_prepare_work_export_saelens(tmp_path):
    datasets = pytest.importorskip("datasets")
    model_dir = make_gemma(tmp_path, "gemma3", seed=4)
    texts = LONG_TEXTS[1:6] + LONG_TEXTS[-2:]
    site, ctx = "blocks.1.hook_resid_post", 8
    store = tmp_path / "bucket"
    info = cli(
        "prepare",
        "--store",
        str(store),
        "--job",
        "g3",
        "--model",
        str(model_dir),
        "--input",
        str(dataset(tmp_path, texts)),
        "--sites",
        site,
        "--positions",
        "all",
        "--store-dtype",
        "float32",
        "--compute-dtype",
        "float32",
        "--unit-rows",
        "3",
        "--json",
        tmp_path=tmp_path,
    )
    assert info["units"] == 3
    res = cli("work", "--store", str(store), "--job", "g3", "--worker-id", "w0", "--json", tmp_path=tmp_path)
    assert res["job_complete"]
    summary = cli(
        "export",
        "saelens",
        str(store / "g3"),
        str(tmp_path / "export"),
        "--site",
        site,
        "--context-size",
        str(ctx),
        "--json",
        tmp_path=tmp_path,
    )
    ds = datasets.load_from_disk(str(tmp_path / "export"))
    ds.set_format("numpy")
    acts, tok = ds[site][:], ds["token_ids"][:]
    # Every window of every sample exactly once, each equal to transformers' activations at its tokens.
    ids = tokenize(model_dir, texts)
    ref = hf_reference_gemma(model_dir, ids)
    windows = [
        (tuple(s[k : k + ctx]), r[site][k : k + ctx]) for s, r in zip(ids, ref) for k in range(0, len(s) - ctx + 1, ctx)
    ]
    assert summary["windows"] == len(ds) == len(windows)
    for w in range(len(ds)):
        candidates = [a for t, a in windows if t == tuple(tok[w])]
        assert candidates, tok[w]
        err = min(float((np.linalg.norm(acts[w] - a, axis=-1) / np.linalg.norm(a, axis=-1)).max()) for a in candidates)
        assert err < 1e-4
