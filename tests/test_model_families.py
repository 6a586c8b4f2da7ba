"""The model families beyond Qwen2 agree with transformers at every site kind they have (actfleet.sites).

Each tiny model is built from transformers' own config and model classes with the real checkpoints' shape
ratios, its biases and norms randomised (transformers initialises them to 0 and 1, which would hide a missing
term), saved as safetensors, and extracted through the Engine on packed rows of mixed lengths with padding.
The reference runs each sample alone with PyTorch forward hooks: a layer's input/output (resid_pre/post), the
first norm's input normalised as TransformerLens's hook_normalized (RMS for Llama, (x - mean) / std for
LayerNorm) and cross-checked against the norm's own output, the output projection's input (attn_z), the
attention module's output (attn_out), the second norm's input (resid_mid, sequential blocks only), the MLP's
first linear's output (mlp_pre), its last linear's input (mlp_post), the MLP's output (mlp_out), and the token
embedding (hook_embed).
"""

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from actfleet import sites as site_names  # noqa: E402
from actfleet.demo.tiny_model import make_tiny_model  # noqa: E402
from actfleet.errors import InputError  # noqa: E402
from actfleet.job_options import JobOptions  # noqa: E402
from actfleet.worker.engine import Engine  # noqa: E402

TEXTS = [
    "a",
    "The quick brown fox jumps over the lazy dog. " * 9,
    "7",
    "Example 1\ninput 2x2\n0: 1 2\n1: 3 4",
    "x y",
    "hello world " * 30,
    "z",
]
VOCAB = 320  # the tiny tokenizer's (actfleet.demo.tiny_model)

# Llama-3.1-8B's ratios (GQA 4:1, d_mlp 3.5 d_model) at d_model 64; head_dim 16 puts RoPE wavelengths in all three
# of llama3's bands for original_max_position_embeddings 32 (< the long inputs' ~100 tokens).
LLAMA = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=224,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=1,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
# gpt2's ratios (d_mlp 4 d_model, head_dim 64 -> 16 here); pythia-70m's (rotary_pct 0.25, d_mlp 4 d_model).
YARN_ROPE = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32}
GPT2 = dict(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=512, bos_token_id=317, eos_token_id=317)
NEOX = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=512,
    rotary_pct=0.25,
    tie_word_embeddings=False,
)

MODELS = {
    "llama3-rope": ("LlamaConfig", "LlamaForCausalLM", dict(LLAMA, rope_parameters=LLAMA3_ROPE)),
    "llama-yarn": ("LlamaConfig", "LlamaForCausalLM", dict(LLAMA, rope_parameters=YARN_ROPE)),
    "llama-bias-gelu": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(LLAMA, attention_bias=True, mlp_bias=True, hidden_act="gelu"),
    ),
    # Qwen3's attention_bias biases o_proj as well as q/k/v (as Llama's)
    "qwen3-bias": ("Qwen3Config", "Qwen3ForCausalLM", dict(LLAMA, head_dim=24, attention_bias=True)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", GPT2),
    "pythia-parallel": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(NEOX, use_parallel_residual=True)),
    "pythia-sequential": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(NEOX, use_parallel_residual=False)),
}


def build(path, name, seed=0, tok=None, **overrides):
    """Save MODELS[name] with random weights (biases and norms perturbed) and the tiny tokenizer at `path`."""
    import transformers

    config_cls, model_cls, kwargs = MODELS[name]
    tok = tok or make_tiny_model(path.parent / f"{path.name}-tok")
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**{**kwargs, **overrides}))
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.ndim == 1:  # every bias and norm weight
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok / f, path / f)
    return path


def parts(model):
    """Per family: (embedding, layers, and per layer the modules the hooks sit on)."""
    kind = model.config.model_type
    if kind in ("llama", "qwen3"):
        base = model.model
        return base.embed_tokens, [
            dict(
                layer=b,
                ln1=b.input_layernorm,
                o=b.self_attn.o_proj,
                attn=b.self_attn,
                ln2=b.post_attention_layernorm,
                up=b.mlp.gate_proj,
                down=b.mlp.down_proj,
                mlp=b.mlp,
            )
            for b in base.layers
        ]
    if kind == "gpt2":
        base = model.transformer
        return base.wte, [
            dict(
                layer=b,
                ln1=b.ln_1,
                o=b.attn.c_proj,
                attn=b.attn,
                ln2=b.ln_2,
                up=b.mlp.c_fc,
                down=b.mlp.c_proj,
                mlp=b.mlp,
            )
            for b in base.h
        ]
    base = model.gpt_neox
    return base.embed_in, [
        dict(
            layer=b,
            ln1=b.input_layernorm,
            o=b.attention.dense,
            attn=b.attention,
            ln2=b.post_attention_layernorm,
            up=b.mlp.dense_h_to_4h,
            down=b.mlp.dense_4h_to_h,
            mlp=b.mlp,
        )
        for b in base.layers
    ]


def hf_reference(model_dir, token_lists):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    parallel = getattr(model.config, "use_parallel_residual", False)
    embed, layers = parts(model)
    caps: dict = {}

    def keep(name):
        def hook(module, args, out):
            caps[name] = (out[0] if isinstance(out, tuple) else out)[0].numpy()

        return hook

    def keep_input(name, then=lambda x: x):
        def hook(module, args, kwargs):
            caps[name] = then(args[0] if args else kwargs["hidden_states"])[0].numpy()

        return hook

    def normalized(norm):
        def f(x):
            x = x.to(torch.float32)
            if isinstance(norm, torch.nn.LayerNorm):
                x = x - x.mean(-1, keepdim=True)
                return x / (x.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt()
            return x / (x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon).sqrt()

        return f

    embed.register_forward_hook(keep("hook_embed"))
    for i, m in enumerate(layers):
        name = lambda kind: site_names.name(kind, i)  # noqa: E731
        m["layer"].register_forward_pre_hook(keep_input(name("resid_pre")), with_kwargs=True)
        m["ln1"].register_forward_pre_hook(keep_input(name("ln1"), normalized(m["ln1"])), with_kwargs=True)
        m["ln1"].register_forward_hook(keep(f"{i}.ln1_out"))
        m["o"].register_forward_pre_hook(keep_input(name("attn_z")), with_kwargs=True)
        m["attn"].register_forward_hook(keep(name("attn_out")))
        if not parallel:
            m["ln2"].register_forward_pre_hook(keep_input(name("resid_mid")), with_kwargs=True)
        m["ln2"].register_forward_pre_hook(keep_input(name("ln2"), normalized(m["ln2"])), with_kwargs=True)
        m["ln2"].register_forward_hook(keep(f"{i}.ln2_out"))
        m["up"].register_forward_hook(keep(name("mlp_pre")))
        m["down"].register_forward_pre_hook(keep_input(name("mlp_post")), with_kwargs=True)
        m["mlp"].register_forward_hook(keep(name("mlp_out")))
        m["layer"].register_forward_hook(keep(name("resid_post")))
    out = []
    for ids in token_lists:
        caps.clear()
        with torch.no_grad():
            hs = model(torch.tensor(np.asarray(ids, np.int64)[None]), output_hidden_states=True).hidden_states
        for i, m in enumerate(layers):
            np.testing.assert_array_equal(caps[f"blocks.{i}.hook_resid_pre"], hs[i][0].numpy())
            for ln in ("ln1", "ln2"):
                norm = m[ln]
                want = caps[f"blocks.{i}.{ln}.hook_normalized"] * norm.weight.detach().numpy()
                if getattr(norm, "bias", None) is not None:
                    want = want + norm.bias.detach().numpy()
                np.testing.assert_allclose(want, caps.pop(f"{i}.{ln}_out"), rtol=1e-4, atol=1e-5)
        out.append(dict(caps))
    return out


def sites_of(model_dir):
    parallel = json.loads((model_dir / "config.json").read_text()).get("use_parallel_residual", False)
    return (
        "hook_embed",
        *(f"blocks.*.{hook}" for kind, hook in site_names.HOOKS.items() if not (parallel and kind == "resid_mid")),
    )


def extract(model_dir, dtype, batch_tokens=512, attn_block=32):
    engine = Engine(
        JobOptions(
            model=str(model_dir),
            sites=sites_of(model_dir),
            positions="all",
            compute_dtype=dtype,
            store_dtype=dtype,
            batch_tokens=batch_tokens,
        ),
        attn_block=attn_block,
    )
    batches = list(engine.run([(i, t, None) for i, t in enumerate(TEXTS)]))
    assert len(batches) >= 2 and any(b.padded_tokens < b.computed_tokens for b in batches)  # packed, padded
    cat = {k: np.concatenate([getattr(b, k) for b in batches]) for k in ("sample_ids", "positions", "token_ids")}
    acts = {s: np.concatenate([b.acts[s] for b in batches]).astype(np.float32) for s in engine.sites}
    return engine, cat, acts


def worst_errors(engine, cat, acts, ref) -> dict[str, float]:
    """Per site kind, the worst relative L2 error of a stored vector."""
    worst: dict[str, float] = {}
    for sid, text in enumerate(TEXTS):
        ids = engine.tokenize([text])[0]
        sel = cat["sample_ids"] == sid
        np.testing.assert_array_equal(cat["positions"][sel], np.arange(len(ids)))
        np.testing.assert_array_equal(cat["token_ids"][sel], ids)
        for site in engine.sites:
            got, want = acts[site][sel], ref[sid][site]
            err = np.linalg.norm(got - want, axis=-1) / np.maximum(np.linalg.norm(want, axis=-1), 1e-6)
            kind = site_names.parse(site)[1]
            worst[kind] = max(worst.get(kind, 0.0), float(err.max()))
    return worst


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    tok = make_tiny_model(root / "tok")
    return {name: build(root / name, name, seed=i, tok=tok) for i, name in enumerate(MODELS)}


@pytest.mark.parametrize("name", list(MODELS))
def test_float32_matches_transformers_at_every_site(models, name):
    engine, cat, acts = extract(models[name], "float32")
    kinds = {site_names.parse(s)[1] for s in engine.sites}
    assert len({site_names.parse(s)[0] for s in engine.sites} - {None}) >= 2  # several layers
    ref = hf_reference(models[name], [engine.tokenize([t])[0] for t in TEXTS])
    worst = worst_errors(engine, cat, acts, ref)
    assert set(worst) == kinds
    print(name, {k: f"{v:.1e}" for k, v in worst.items()})
    assert max(worst.values()) < 1e-4, worst


# bf16 compute and storage: every stored vector within 5% (relative L2) of float32 transformers, the bound the
# Qwen2 parity test states; above 1e-4 so the run is really bfloat16.
@pytest.mark.parametrize("name", ["llama3-rope", "gpt2", "pythia-parallel"])
def test_bfloat16_within_stated_bound(models, name):
    engine, cat, acts = extract(models[name], "bfloat16", attn_block=64)
    ref = hf_reference(models[name], [engine.tokenize([t])[0] for t in TEXTS])
    worst = worst_errors(engine, cat, acts, ref)
    print(name, {k: f"{v:.1e}" for k, v in worst.items()})
    assert 1e-4 < max(worst.values()) < 0.05, worst


def test_llama3_frequencies_are_transformers_own():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from actfleet.worker.models.common import inv_freq

    config = LlamaConfig(**dict(LLAMA, rope_parameters=LLAMA3_ROPE))
    want, scale = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    _, scaling = __import__("actfleet.worker.models.common", fromlist=["x"]).rope_from_hf("llama", config.to_dict())
    got = inv_freq(16, 10000.0, scaling)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6)
    plain = inv_freq(16, 10000.0, ())
    assert scale == 1.0 and (got < plain).any() and (got == plain).any()  # some bands scaled, some not
    assert ((got < plain) & (got > plain / 8)).any()  # and some smoothed between


def test_linear_frequencies_are_transformers_own():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from actfleet.worker.models.common import attention_scaling, inv_freq, rope_from_hf

    config = LlamaConfig(**dict(LLAMA, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}))
    want, scale = ROPE_INIT_FUNCTIONS["linear"](config, "cpu")
    _, scaling = rope_from_hf("llama", config.to_dict())
    np.testing.assert_allclose(inv_freq(16, 10000.0, scaling), want.numpy(), rtol=1e-6)
    assert scaling == ("linear", 4.0) and attention_scaling(scaling) == scale == 1.0


def test_yarn_frequencies_and_scale_are_transformers_own():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from actfleet.worker.models.common import attention_scaling, inv_freq, rope_from_hf

    for rope in (YARN_ROPE, {**YARN_ROPE, "mscale": 0.7, "mscale_all_dim": 0.5, "beta_fast": 16, "truncate": False}):
        config = LlamaConfig(**dict(LLAMA, rope_parameters=rope))
        want, scale = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
        _, scaling = rope_from_hf("llama", config.to_dict())
        np.testing.assert_allclose(inv_freq(16, 10000.0, scaling), want.numpy(), rtol=1e-6)
        assert attention_scaling(scaling) == pytest.approx(scale, rel=1e-12) and scale != 1.0


def test_gpt2_resid_pre_adds_positions_and_pythia_parallel_has_no_resid_mid(models):
    engine, cat, acts = extract(models["gpt2"], "float32")
    from safetensors.numpy import load_file

    wpe = load_file(models["gpt2"] / "model.safetensors")["transformer.wpe.weight"]
    np.testing.assert_allclose(
        acts["blocks.0.hook_resid_pre"], acts["hook_embed"] + wpe[cat["positions"]], rtol=1e-6, atol=1e-6
    )
    with pytest.raises(InputError, match="hook_resid_mid.*parallel"):
        Engine(JobOptions(model=str(models["pythia-parallel"]), sites=("blocks.1.hook_resid_mid",)))
    # sequential Pythia has it
    Engine(JobOptions(model=str(models["pythia-sequential"]), sites=("blocks.1.hook_resid_mid",)))


@pytest.mark.parametrize(
    "field,value,what",
    [
        ("rope_parameters", {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}, "rope_type='dynamic'"),
        ("rope_parameters", {"rope_type": "longrope", "rope_theta": 10000.0}, "rope_type='longrope'"),
        ("hidden_act", "gelu_fast", "hidden_act='gelu_fast'"),
    ],
)
def test_llama_refuses_what_it_does_not_compute(tmp_path, field, value, what):
    d = build(tmp_path / "m", "llama-bias-gelu")
    config = json.loads((d / "config.json").read_text())
    config[field] = value
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=f"config.json .*{what}.*does not compute"):
        Engine(JobOptions(model=str(d), sites=("blocks.0.hook_resid_post",)))


def test_an_unannounced_checkpoint_tensor_is_an_error(tmp_path):
    """A Llama checkpoint with o_proj biases but a config.json without attention_bias would silently drop them."""
    d = build(tmp_path / "m", "llama-bias-gelu")
    config = json.loads((d / "config.json").read_text())
    config["attention_bias"] = False
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=r"tensor model\.layers\.0\.self_attn\.[a-z]_proj\.bias is not read"):
        Engine(JobOptions(model=str(d), sites=("hook_embed",)))  # even when no layer runs


def test_gpt2_checkpoint_saved_from_the_base_model_loads(tmp_path, models):
    """The hub's gpt2 names its tensors without "transformer." (saved from GPT2Model), and carries the
    attention-mask buffers h.L.attn.bias: both are read as the full model's (the buffers as unused)."""
    from safetensors.numpy import load_file, save_file

    d = tmp_path / "bare"
    shutil.copytree(models["gpt2"], d)
    tensors = load_file(d / "model.safetensors")
    bare = {k.removeprefix("transformer."): v for k, v in tensors.items() if k.startswith("transformer.")}
    bare["h.0.attn.bias"] = np.tril(np.ones((1, 1, 512, 512), np.float32))
    save_file(bare, d / "model.safetensors")
    site = ("blocks.2.hook_resid_post",)
    rows = [(0, TEXTS[1], None)]
    a = list(Engine(JobOptions(model=str(d), sites=site, compute_dtype="float32")).run(rows))
    b = list(Engine(JobOptions(model=str(models["gpt2"]), sites=site, compute_dtype="float32")).run(rows))
    assert a[0].acts[site[0]].tobytes() == b[0].acts[site[0]].tobytes()


# ----------------------------------------------------------------------------------------------------
# The commands end to end on the new families (subprocesses, the real CLI)
# ----------------------------------------------------------------------------------------------------


def actfleet(*args, cwd):
    import os
    import subprocess
    import sys

    env = dict(os.environ, ACTFLEET_JAX_CACHE=str(cwd / "jaxcache"))
    return subprocess.run(
        [sys.executable, "-c", "from actfleet.cli import main; main()", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture()
def dataset(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return path


@pytest.mark.parametrize("name", ["llama3-rope", "gpt2", "pythia-parallel"])
def test_extract_command_matches_transformers(models, name, tmp_path, dataset):
    from actfleet.worker.reader import load

    out = tmp_path / "out"
    r = actfleet(
        "extract",
        "--model",
        str(models[name]),
        "--input",
        str(dataset),
        "--out",
        str(out),
        "--layers",
        "0,2",
        "--sites",
        "resid_post,mlp_post,embed",
        "--positions",
        "all",
        "--store-dtype",
        "float32",
        "--compute-dtype",
        "float32",
        "--unit-rows",
        "4",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    got = load(str(out))
    ids = [np.asarray(got["token_ids"][got["sample_ids"] == i]) for i in range(len(TEXTS))]
    ref = hf_reference(models[name], ids)
    for site in ("hook_embed", "blocks.0.hook_resid_post", "blocks.2.mlp.hook_post", "blocks.2.hook_resid_post"):
        for i in range(len(TEXTS)):
            a, b = got[site][got["sample_ids"] == i], ref[i][site]
            assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(b), (site, i)


def test_extract_command_refuses_resid_mid_of_a_parallel_model_exit_2(models, tmp_path, dataset):
    r = actfleet(
        "extract",
        "--model",
        str(models["pythia-parallel"]),
        "--input",
        str(dataset),
        "--out",
        str(tmp_path / "o"),
        "--layers",
        "1",
        "--sites",
        "resid_mid",
        cwd=tmp_path,
    )
    assert r.returncode == 2 and "hook_resid_mid" in r.stderr and "parallel" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize("name", ["llama3-rope", "gpt2", "pythia-parallel"])
def test_prepare_work_and_export_saelens(models, name, tmp_path, dataset):
    import datasets

    store = tmp_path / "bucket"
    r = actfleet(
        "prepare",
        "--store",
        str(store),
        "--job",
        "g",
        "--model",
        str(models[name]),
        "--input",
        str(dataset),
        "--layers",
        "1",
        "--sites",
        "resid_post",
        "--positions",
        "all",
        "--store-dtype",
        "float32",
        "--compute-dtype",
        "float32",
        "--unit-rows",
        "4",
        "--json",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    w = actfleet("work", "--store", str(store), "--job", "g", "--worker-id", "w0", "--json", cwd=tmp_path)
    assert w.returncode == 0, w.stderr
    assert json.loads(w.stdout)["job_complete"]
    e = actfleet(
        "export",
        "saelens",
        str(store / "g"),
        str(tmp_path / "cache"),
        "--site",
        "blocks.1.hook_resid_post",
        "--context-size",
        "8",
        "--json",
        cwd=tmp_path,
    )
    assert e.returncode == 0, e.stderr
    summary = json.loads(e.stdout)
    assert summary["d_in"] == 64 and summary["windows"] > 0
    ds = datasets.load_from_disk(str(tmp_path / "cache"))
    ds.set_format("numpy")
    acts, tokens = ds["blocks.1.hook_resid_post"][:], ds["token_ids"][:]
    # Each exported window is transformers' resid_post at the tokens it came with: a consecutive run of one
    # row (found by its tokens) in the reference of the whole row.
    engine_ids = [np.asarray(x) for x in _tokenize(models[name], TEXTS)]
    ref = hf_reference(models[name], engine_ids)
    assert acts.shape[1:] == (8, 64)
    for window, toks in zip(acts, tokens):
        spots = [
            (i, o) for i, ids in enumerate(engine_ids) for o in range(len(ids) - 7) if (ids[o : o + 8] == toks).all()
        ]
        assert spots, toks
        wants = [ref[i]["blocks.1.hook_resid_post"][o : o + 8] for i, o in spots]  # repeated texts: several spots
        assert min(np.linalg.norm(window - w) / np.linalg.norm(w) for w in wants) <= 1e-4


def _tokenize(model_dir, texts):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)(texts)["input_ids"]


# ----------------------------------------------------------------------------------------------------
# Against TransformerLens's own hooks (the names SAEs are trained on), unprocessed as SAELens loads them
# ----------------------------------------------------------------------------------------------------


def tl_reference(name, model_dir, token_lists):
    tl = pytest.importorskip("transformer_lens")
    from transformer_lens.pretrained import weight_conversions as wc
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    c = hf.config
    if name == "gpt2":
        cfg = tl.HookedTransformerConfig(
            d_model=c.n_embd,
            d_head=c.n_embd // c.n_head,
            n_layers=c.n_layer,
            n_ctx=c.n_positions,
            n_heads=c.n_head,
            d_mlp=4 * c.n_embd,
            d_vocab=c.vocab_size,
            act_fn=c.activation_function,
            eps=c.layer_norm_epsilon,
            normalization_type="LN",
            positional_embedding_type="standard",
            original_architecture="GPT2LMHeadModel",
            device="cpu",
            dtype=torch.float32,
        )
        state = wc.convert_gpt2_weights(hf, cfg)
    else:
        hd = c.hidden_size // c.num_attention_heads
        cfg = tl.HookedTransformerConfig(
            d_model=c.hidden_size,
            d_head=hd,
            n_layers=c.num_hidden_layers,
            n_ctx=c.max_position_embeddings,
            n_heads=c.num_attention_heads,
            d_mlp=c.intermediate_size,
            d_vocab=c.vocab_size,
            act_fn=c.hidden_act,
            eps=c.layer_norm_eps,
            normalization_type="LN",
            positional_embedding_type="rotary",
            rotary_dim=int(hd * c.rope_parameters["partial_rotary_factor"]),
            rotary_base=c.rope_parameters["rope_theta"],
            rotary_adjacent_pairs=False,
            parallel_attn_mlp=c.use_parallel_residual,
            original_architecture="GPTNeoXForCausalLM",
            device="cpu",
            dtype=torch.float32,
        )
        state = wc.convert_neox_weights(hf, cfg)
    model = tl.HookedTransformer(cfg)
    model.load_and_process_state_dict(
        state,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    out = []
    for ids in token_lists:
        with torch.no_grad():
            _, cache = model.run_with_cache(torch.tensor(np.asarray(ids, np.int64)[None]))
        out.append({k: v[0].reshape(len(ids), -1).numpy() for k, v in cache.items()})
    return out


@pytest.mark.parametrize("name", ["gpt2", "pythia-parallel", "pythia-sequential"])
def test_float32_matches_transformer_lens_hooks(models, name):
    engine, cat, acts = extract(models[name], "float32")
    ref = tl_reference(name, models[name], [engine.tokenize([t])[0] for t in TEXTS])
    worst = worst_errors(engine, cat, acts, ref)
    print(name, {k: f"{v:.1e}" for k, v in worst.items()})
    assert max(worst.values()) < 1e-4, worst


def test_activations_are_transformers_own():
    """Each activation name means transformers' function (gelu exact, gelu_new and gelu_pytorch_tanh the tanh
    approximation): on tiny models the difference hides under 1e-4, so check the functions themselves."""
    import jax.numpy as jnp
    from transformers.activations import ACT2FN

    from actfleet.worker.models.common import ACTIVATIONS

    x = np.linspace(-6, 6, 2001, dtype=np.float32)
    for name, fn in ACTIVATIONS.items():
        want = ACT2FN[name](torch.tensor(x)).numpy()
        np.testing.assert_allclose(np.asarray(fn(jnp.asarray(x))), want, rtol=1e-6, atol=1e-6, err_msg=name)


MP_CHILD = r"""
import json, sys
import numpy as np
from actfleet.job_options import JobOptions
from actfleet.worker.engine import Engine
spec = json.loads(sys.argv[1])
out = {}
for model_dir in spec["models"]:
    runs = []
    for n in (1, 2, 4):
        engine = Engine(JobOptions(model=model_dir, sites=tuple(spec["sites"]), positions="all",
                                   compute_dtype="float32", store_dtype="float32", batch_tokens=512,
                                   model_parallel=n), attn_block=32)
        batches = list(engine.run([(i, t, None) for i, t in enumerate(spec["texts"])]))
        key = np.concatenate([b.sample_ids * 100000 + b.positions for b in batches])
        order = np.argsort(key)
        runs.append({s: np.concatenate([b.acts[s] for b in batches])[order] for s in engine.sites})
    out[model_dir] = max(float(np.abs(r[s] - runs[0][s]).max() / np.abs(runs[0][s]).max())
                         for r in runs[1:] for s in runs[0])
print(json.dumps(out))
"""


def test_gpt2_and_pythia_split_over_devices_store_the_same_rows(models):
    """Heads and MLP units split 2 and 4 ways over 4 host devices (LayerNorm and positions replicated):
    every site equals the unsplit run's up to float32 reduction order."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    spec = {
        "models": [str(models["gpt2"]), str(models["pythia-parallel"])],
        "texts": TEXTS,
        "sites": ["blocks.2.hook_resid_post", "blocks.1.attn.hook_z", "blocks.1.mlp.hook_post"],
    }
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    r = subprocess.run(
        [sys.executable, "-c", MP_CHILD, json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    worst = json.loads(r.stdout.strip().splitlines()[-1])
    assert max(worst.values()) < 1e-5, worst
