"""The JAX extractor agrees with transformers' PyTorch Qwen2 at every stored (sample, position, site).

Tiny random models are made in the test (actfleet.demo.tiny_model). The reference runs each sample alone through
`Qwen2ForCausalLM` with PyTorch forward hooks: on each decoder layer (resid_pre: its input; resid_post: its output,
before the final norm for the last layer), on self_attn (attn_out), on o_proj's input (attn_z), on
post_attention_layernorm's input (resid_mid), on mlp (mlp_out), on gate_proj's output (mlp_pre) and on
down_proj's input (mlp_post); ln1/ln2 are TransformerLens's hook_normalized, x / sqrt(mean(x^2) + eps) of the
norm's input (before its weight), checked against the norm's own output. hook_embed is the embedding output.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from actfleet import sites as site_names  # noqa: E402
from actfleet.demo.tiny_model import make_tiny_model  # noqa: E402
from actfleet.job_options import JobOptions  # noqa: E402
from actfleet.worker.attention import NEG_INF, attention  # noqa: E402
from actfleet.worker.engine import Engine  # noqa: E402


def reference_attention(q, k, v, segment_ids, positions):
    """The plain T x T attention the blockwise kernel must equal."""
    b, t, h, hd = q.shape
    g = h // k.shape[2]
    k = jnp.repeat(k, g, axis=2).astype(jnp.float32)
    v = jnp.repeat(v, g, axis=2).astype(jnp.float32)
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k) * hd**-0.5
    idx = jnp.arange(t)
    mask = (idx[None, :] <= idx[:, None])[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])
    s = jnp.where(mask[:, None], s, NEG_INF)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v).astype(q.dtype)


SITES = ("hook_embed", *(f"blocks.*.{hook}" for hook in site_names.HOOKS.values()))  # every kind, every layer

# 1-token inputs next to long ones, so rows pack several sequences and span several attention blocks.
TEXTS = [
    "a",
    "The quick brown fox jumps over the lazy dog. " * 9,
    "7",
    "Example 1\ninput 2x2\n0: 1 2\n1: 3 4",
    "x y",
    "hello world " * 30,
    "z",
]


def hf_reference(model_dir, token_lists):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    eps = model.config.rms_norm_eps
    caps: dict = {}

    def keep(name):
        def hook(module, args, out):
            caps[name] = (out[0] if isinstance(out, tuple) else out)[0].numpy()

        return hook

    def keep_input(name, then=lambda x: x):
        def hook(module, args, kwargs):
            caps[name] = then(args[0] if args else kwargs["hidden_states"])[0].numpy()

        return hook

    def normalized(x):  # TransformerLens RMSNorm(Pre).hook_normalized: float32, before the weight
        x = x.to(torch.float32)
        return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()

    model.model.embed_tokens.register_forward_hook(keep("hook_embed"))
    for i, layer in enumerate(model.model.layers):
        name = lambda kind: site_names.name(kind, i)  # noqa: E731
        layer.register_forward_pre_hook(keep_input(name("resid_pre")), with_kwargs=True)
        layer.input_layernorm.register_forward_pre_hook(keep_input(name("ln1"), normalized), with_kwargs=True)
        layer.input_layernorm.register_forward_hook(keep(f"{i}.ln1_out"))
        layer.self_attn.o_proj.register_forward_pre_hook(keep_input(name("attn_z")), with_kwargs=True)
        layer.self_attn.register_forward_hook(keep(name("attn_out")))
        layer.post_attention_layernorm.register_forward_pre_hook(keep_input(name("resid_mid")), with_kwargs=True)
        layer.post_attention_layernorm.register_forward_pre_hook(keep_input(name("ln2"), normalized), with_kwargs=True)
        layer.post_attention_layernorm.register_forward_hook(keep(f"{i}.ln2_out"))
        layer.mlp.gate_proj.register_forward_hook(keep(name("mlp_pre")))
        layer.mlp.down_proj.register_forward_pre_hook(keep_input(name("mlp_post")), with_kwargs=True)
        layer.mlp.register_forward_hook(keep(name("mlp_out")))
        layer.register_forward_hook(keep(name("resid_post")))
    out = []
    for ids in token_lists:
        caps.clear()
        with torch.no_grad():
            hs = model(torch.tensor(np.asarray(ids, np.int64)[None]), output_hidden_states=True).hidden_states
        # Cross-check the hooks against output_hidden_states and each other where they mean the same thing.
        for i, layer in enumerate(model.model.layers):
            if i < len(model.model.layers) - 1:
                np.testing.assert_array_equal(caps[f"blocks.{i}.hook_resid_post"], hs[i + 1][0].numpy())
            np.testing.assert_array_equal(caps[f"blocks.{i}.hook_resid_pre"], hs[i][0].numpy())
            for ln, norm in (("ln1", layer.input_layernorm), ("ln2", layer.post_attention_layernorm)):
                np.testing.assert_allclose(
                    caps[f"blocks.{i}.{ln}.hook_normalized"] * norm.weight.detach().numpy(),
                    caps.pop(f"{i}.{ln}_out"),
                    rtol=1e-5,
                    atol=1e-6,
                )
        np.testing.assert_array_equal(caps["hook_embed"], hs[0][0].numpy())
        out.append(dict(caps))
    return out


def extract_all(model_dir, texts, attn_block=512, **opts):
    engine = Engine(JobOptions(model=str(model_dir), sites=SITES, positions="all", **opts), attn_block=attn_block)
    batches = list(engine.run([(i, t, None) for i, t in enumerate(texts)]))
    cat = {k: np.concatenate([getattr(b, k) for b in batches]) for k in ("sample_ids", "positions", "token_ids")}
    acts = {s: np.concatenate([b.acts[s] for b in batches]).astype(np.float32) for s in engine.sites}
    return engine, batches, cat, acts


def worst_relative_error(engine, texts, cat, acts, ref):
    worst = 0.0
    for sid, text in enumerate(texts):
        ids = engine.tokenize([text])[0]
        sel = cat["sample_ids"] == sid
        np.testing.assert_array_equal(cat["positions"][sel], np.arange(len(ids)))  # every token, sorted
        np.testing.assert_array_equal(cat["token_ids"][sel], ids)
        for site in engine.sites:
            got, want = acts[site][sel], ref[sid][site]
            err = np.linalg.norm(got - want, axis=-1) / np.maximum(np.linalg.norm(want, axis=-1), 1e-6)
            worst = max(worst, float(err.max()))
    return worst


@pytest.mark.parametrize(
    "shape",
    [
        dict(layers=2, heads=4, kv_heads=2, tie=True),  # GQA 2:1, tied embeddings
        dict(layers=3, heads=4, kv_heads=1, tie=False),  # multi-query, untied
        dict(layers=2, heads=2, kv_heads=2, hidden=32, intermediate=96, tie=True),  # plain multi-head
    ],
    ids=["gqa2-tied", "mqa-untied", "mha"],
)
def test_float32_matches_transformers(tmp_path, shape):
    model_dir = make_tiny_model(tmp_path / "m", seed=3, **shape)
    # Small batches and attention blocks: several batches, packed rows, many key blocks per query block.
    engine, batches, cat, acts = extract_all(
        model_dir, TEXTS, compute_dtype="float32", store_dtype="float32", batch_tokens=512, attn_block=32
    )
    assert len(batches) >= 2 and any(b.padded_tokens < b.computed_tokens for b in batches)
    assert sum(b.rows for b in batches) == len(TEXTS)
    ref = hf_reference(model_dir, [engine.tokenize([t])[0] for t in TEXTS])
    assert worst_relative_error(engine, TEXTS, cat, acts, ref) < 1e-4


def test_bfloat16_within_stated_tolerance(tmp_path):
    """bf16 compute and storage: each stored vector within 5% (relative L2) of float32 transformers."""
    model_dir = make_tiny_model(tmp_path / "m", seed=4, layers=2)
    engine, _, cat, acts = extract_all(
        model_dir, TEXTS, compute_dtype="bfloat16", store_dtype="bfloat16", batch_tokens=1024, attn_block=64
    )
    ref = hf_reference(model_dir, [engine.tokenize([t])[0] for t in TEXTS])
    err = worst_relative_error(engine, TEXTS, cat, acts, ref)
    assert 1e-4 < err < 0.05  # really bf16 (not silently float32), and close


def test_same_rows_same_bits(tmp_path):
    model_dir = make_tiny_model(tmp_path / "m", seed=5)
    engine = Engine(
        JobOptions(model=str(model_dir), sites=("blocks.1.hook_resid_post",), batch_tokens=256), attn_block=32
    )
    rows = [(10 + i, t, None) for i, t in enumerate(TEXTS)]
    a, b = list(engine.run(rows)), list(engine.run(list(rows)))
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.sample_ids, y.sample_ids)
        assert x.acts["blocks.1.hook_resid_post"].tobytes() == y.acts["blocks.1.hook_resid_post"].tobytes()


def test_a_stream_of_units_gives_each_unit_its_own_bits(tmp_path):
    """run_stream over several prepared units (the work loop's cross-unit stream) yields, per unit, exactly
    the batches `run` gives that unit alone: same bits, same row accounting (windows too)."""
    model_dir = make_tiny_model(tmp_path / "m", seed=5)
    for extra in ({}, {"context_size": 16}):
        engine = Engine(
            JobOptions(model=str(model_dir), sites=("blocks.1.hook_resid_post",), batch_tokens=256, **extra),
            attn_block=32,
        )
        units = [[(u * 100 + i, t, None) for i, t in enumerate(TEXTS)] for u in range(4)]
        units[1] = [(100, None, "bad json")]  # a unit with nothing to compute between units that compute
        alone = [list(engine.run(rows)) for rows in units]
        streamed: list[list] = [[] for _ in units]
        for k, batch in engine.run_stream(engine.prepare(rows) for rows in units):
            streamed[k].append(batch)
        assert [len(b) for b in streamed] == [len(b) for b in alone] and len(streamed[1]) == 1 < len(streamed[2])
        for got, want in zip(streamed, alone):
            assert sum(b.rows for b in got) == sum(b.rows for b in want)
            for x, y in zip(got, want):
                np.testing.assert_array_equal(x.sample_ids, y.sample_ids)
                assert (x.rows, x.skipped) == (y.rows, y.skipped)
                assert x.acts["blocks.1.hook_resid_post"].tobytes() == y.acts["blocks.1.hook_resid_post"].tobytes()


def test_blockwise_attention_matches_dense():
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    b, t, h, kvh, hd = 2, 96, 4, 2, 8
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, n, hd)), jnp.float32) for n in (h, kvh, kvh))
    # Row 0: sequences of 40, 1 and 50 tokens then 5 padding; row 1: one sequence of 96.
    seg = np.zeros((b, t), np.int32)
    pos = np.zeros((b, t), np.int32)
    at = 0
    for s, n in enumerate((40, 1, 50), start=1):
        seg[0, at : at + n], pos[0, at : at + n] = s, np.arange(n)
        at += n
    pos[0, at:] = np.arange(t - at)
    seg[1], pos[1] = 1, np.arange(t)
    seg, pos = jnp.asarray(seg), jnp.asarray(pos)
    with jax.default_matmul_precision("highest"):  # true float32 products on GPUs and TPUs too
        want = reference_attention(q, k, v, seg, pos)
        for block in (16, 128):  # six blocks walked by the loop; one block for the whole row (no loop)
            got = jax.jit(lambda *a: attention(*a, block=block))(q, k, v, seg, pos)
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)

    # bfloat16 inputs (products on the matrix units, float32 accumulation and softmax) stay within bfloat16's
    # rounding of the float32 answer on the same rounded inputs.
    qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
    with jax.default_matmul_precision("highest"):
        want16 = reference_attention(*(x.astype(jnp.float32) for x in (qb, kb, vb)), seg, pos)
    for block in (16, 128):
        got16 = jax.jit(lambda *a: attention(*a, block=block))(qb, kb, vb, seg, pos)
        assert got16.dtype == jnp.bfloat16
        err = np.linalg.norm(np.asarray(got16, np.float32) - np.asarray(want16)) / np.linalg.norm(want16)
        assert err < 1e-2


def test_32k_context_never_materialises_s_by_s():
    """Compile one 32,768-token sequence: XLA's planned temporaries stay far below one S x S score matrix, and
    grow linearly (not quadratically) from 8,192 to 32,768 tokens."""
    import jax
    import jax.numpy as jnp

    h, kvh, hd = 14, 2, 64  # Qwen2.5-0.5B's heads

    def temp_bytes(t):
        spec = lambda n: jax.ShapeDtypeStruct((1, t, n, hd), jnp.bfloat16)  # noqa: E731
        ids = jax.ShapeDtypeStruct((1, t), jnp.int32)
        compiled = (
            jax.jit(lambda q, k, v, s, p: attention(q, k, v, s, p, block=512))
            .lower(spec(h), spec(kvh), spec(kvh), ids, ids)
            .compile()
        )
        mem = compiled.memory_analysis()
        if mem is None:
            pytest.skip("this backend reports no memory analysis")
        return mem.temp_size_in_bytes

    small, large = temp_bytes(8192), temp_bytes(32768)
    assert large < 32768 * 32768 * 4 / 4  # a quarter of ONE head's float32 S x S (4 GiB); all heads: 56 GiB
    assert large < 6 * small  # 4x the tokens: linear growth is 4x, quadratic would be 16x


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_other_families_are_a_config_away(tmp_path, family):
    """Qwen3 (per-head q/k RMSNorm, no QKV bias, explicit head_dim) and Llama (no bias) from transformers'
    own random init, saved as safetensors, agree in float32 too."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    tiny = make_tiny_model(tmp_path / "tok")
    common = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    if family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=24, **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    with torch.no_grad():  # transformers initialises norms to 1: randomise them so they are really tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path / "m")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny / f).exists():
            shutil.copy(tiny / f, tmp_path / "m" / f)
    engine, _, cat, acts = extract_all(
        tmp_path / "m", TEXTS, compute_dtype="float32", store_dtype="float32", batch_tokens=512, attn_block=32
    )
    assert engine.config.qk_norm == (family == "qwen3") and not engine.config.qkv_bias
    ref = hf_reference(tmp_path / "m", [engine.tokenize([t])[0] for t in TEXTS])
    assert worst_relative_error(engine, TEXTS, cat, acts, ref) < 1e-4


# The packing plan decides which tokens share a row, so it lives with the parity tests.


@pytest.mark.parametrize("n_devices", [1, 4])
def test_packing_plan_covers_each_row_once_with_little_padding(n_devices):
    from actfleet.worker.batching import plan

    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(2048 / 4), 1.0, 1000), 1, 2048).astype(int).tolist()
    batches = plan(lengths, batch_tokens=16384, n_devices=n_devices)
    assert plan(lengths, batch_tokens=16384, n_devices=n_devices) == batches  # pure
    placed = sorted(i for b in batches for row in b.rows for i in row)
    assert placed == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= b.row_len for b in batches for row in b.rows)
    assert all(len(b.rows) % n_devices == 0 for b in batches)
    assert len({b.shape for b in batches}) <= 2
    computed = sum(b.shape[0] * b.shape[1] for b in batches)
    assert 1 - sum(lengths) / computed < 0.03


def test_packing_plan_edge_cases():
    from actfleet.worker.batching import plan

    assert plan([], batch_tokens=100) == []
    one = plan([32768], batch_tokens=16384)  # longer than a batch: one row of its own
    assert [b.shape for b in one] == [(1, 32768)]
    with pytest.raises(ValueError):
        plan([3, 0], batch_tokens=100)


@pytest.mark.slow
def test_sites_of_every_width_reach_the_shards_and_resid_pre_is_the_previous_resid_post(tmp_path):
    """Default dtypes (bfloat16), every site kind: resid_pre of layer L is resid_post of L - 1 (hook_embed for
    L = 0) bit for bit; d_mlp- and heads*head_dim-wide sites keep their widths through the engine's gather,
    ShardWriter and the reader; an all-skipped run's empty batch has the same widths."""
    import shutil

    # Qwen3 shape with head_dim 24: attn_z is 4 x 24 = 96 wide next to d_model 64 and d_mlp 96 + 32.
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from actfleet.worker.reader import load
    from actfleet.worker.shards import ShardWriter

    tiny = make_tiny_model(tmp_path / "tok")
    torch.manual_seed(1)
    Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=320,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=24,
            max_position_embeddings=512,
        )
    ).save_pretrained(tmp_path / "m")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / f, tmp_path / "m" / f)
    engine = Engine(
        JobOptions(model=str(tmp_path / "m"), sites=SITES, positions="all", batch_tokens=256), attn_block=32
    )
    widths = {"attn_z": 96, "mlp_pre": 128, "mlp_post": 128}
    writer = ShardWriter(shard_mb=0.05, model="m", revision="r", job="t", unit=0, sites=engine.sites)
    for b in engine.run([(i, t, None) for i, t in enumerate(TEXTS)]):
        for site in engine.sites:
            assert b.acts[site].shape == (b.stored_tokens, widths.get(site_names.parse(site)[1], 64)), site
        assert b.acts["blocks.0.hook_resid_pre"].tobytes() == b.acts["hook_embed"].tobytes()
        assert b.acts["blocks.1.hook_resid_pre"].tobytes() == b.acts["blocks.0.hook_resid_post"].tobytes()
        assert b.acts["blocks.1.hook_resid_pre"].tobytes() != b.acts["blocks.1.hook_resid_mid"].tobytes()
        writer.add(b)
    (tmp_path / "out").mkdir()
    for shard in writer.close():
        (tmp_path / "out" / shard.name).write_bytes(shard.data)
    assert len(writer.shards) > 1
    back = load(str(tmp_path / "out"))
    assert back["blocks.1.mlp.hook_post"].shape == (len(back["sample_ids"]), 128)
    assert back["blocks.0.attn.hook_z"].shape == (len(back["sample_ids"]), 96)

    empty = list(engine.run([(0, None, "bad json")]))
    assert [b.acts["blocks.1.mlp.hook_pre"].shape for b in empty] == [(0, 128)]
