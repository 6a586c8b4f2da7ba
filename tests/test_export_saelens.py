"""`actfleet export saelens`: windows, the global shuffle and the on-disk layout, checked by reading the export
back with the real `datasets`, and (slow) a real SAELens 6.54 training run through its cached-activations path
on an export of a real `actfleet extract`."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from actfleet import work_queue as q
from actfleet.errors import InputError
from actfleet.store import open_store
from actfleet.worker.export import export_saelens
from actfleet.worker.samples import Batch
from actfleet.worker.shards import ShardWriter
from tests.fakes.gcs_server import fake_gcs  # noqa: F401  (fixture)

datasets = pytest.importorskip("datasets")

ROOT = Path(__file__).resolve().parent.parent
SITE = "blocks.0.hook_resid_post"
LENGTHS = [5, 9, 12, 3, 8, 8, 20, 1, 13]  # stored tokens per sample


def sample_batch(lengths=LENGTHS, first=0, d=6):
    """Rows whose activations encode (sample, position): every exported value can be traced back."""
    sids = np.concatenate([np.full(n, first + i) for i, n in enumerate(lengths)]).astype(np.int64)
    pos = np.concatenate([np.arange(n) for n in lengths]).astype(np.int32)
    acts = np.stack([sids, pos, *[sids * 7 + pos * (k + 1) for k in range(d - 2)]], 1).astype(np.float32)
    return Batch(
        token_ids=(sids * 100 + pos).astype(np.int32),
        sample_ids=sids,
        positions=pos,
        acts={SITE: acts, "hook_embed": -acts},
    )


def write_shards(directory: Path, batches, *, unit=0, shard_mb=0.0003, store_dtype="bfloat16", attempt=None):
    """ShardWriter output, cut every few rows so samples cross shard boundaries."""
    w = ShardWriter(
        shard_mb=shard_mb,
        model="m",
        revision="r",
        job="j",
        unit=unit,
        sites=(SITE, "hook_embed"),
        store_dtype=store_dtype,
    )
    for b in batches:
        w.add(b)
    shards = w.close()
    directory.mkdir(parents=True, exist_ok=True)
    for s in shards:
        name = s.name if attempt is None else q.shard_key("", unit, s.part, attempt)
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(s.data)
    return shards


def expected_windows(lengths, ctx, first=0):
    return {(first + i, k * ctx) for i, n in enumerate(lengths) for k in range(n // ctx)}


def read_back(out: Path):
    ds = datasets.load_from_disk(str(out))
    ds.set_format("numpy")
    return ds, ds[SITE][:], ds["token_ids"][:]


def test_windows_are_whole_consecutive_and_exactly_once(tmp_path):
    shards = write_shards(tmp_path / "shards", [sample_batch()])
    assert len(shards) > 5  # samples cross shard cuts
    s = export_saelens(str(tmp_path / "shards"), tmp_path / "out", site=SITE, context_size=4, seed=3)
    ds, acts, tok = read_back(tmp_path / "out")
    assert ds.features[SITE] == datasets.Array2D(shape=(4, 6), dtype="float32")
    assert ds.column_names == [SITE, "token_ids"] and acts.shape == (s.windows, 4, 6) and tok.shape == (s.windows, 4)
    got = set()
    for w in range(len(ds)):
        sid, p0 = int(acts[w, 0, 0]), int(acts[w, 0, 1])
        np.testing.assert_array_equal(acts[w, :, 0], sid)  # one sample
        np.testing.assert_array_equal(acts[w, :, 1], p0 + np.arange(4))  # consecutive positions
        np.testing.assert_array_equal(tok[w], sid * 100 + p0 + np.arange(4))  # token ids travel with their rows
        # bfloat16 shards arrive as float32, exactly the stored bfloat16 values
        want = np.stack(
            [np.full(4, sid), p0 + np.arange(4), *[sid * 7 + (p0 + np.arange(4)) * (k + 1) for k in range(4)]], 1
        )
        np.testing.assert_array_equal(acts[w], want.astype(ml_dtypes.bfloat16).astype(np.float32))
        got.add((sid, p0))
    assert got == expected_windows(LENGTHS, 4) and len(got) == len(ds)
    assert s.tokens == sum(LENGTHS) and s.tokens_dropped == sum(n % 4 for n in LENGTHS)
    assert s.samples == len(LENGTHS) and s.samples_short == sum(n < 4 for n in LENGTHS)
    assert json.loads((tmp_path / "out" / "actfleet-export.json").read_text())["windows"] == len(ds)


def test_shuffle_is_global_deterministic_and_independent_of_file_size(tmp_path):
    write_shards(tmp_path / "shards", [sample_batch(LENGTHS * 4)])
    a = export_saelens(str(tmp_path / "shards"), tmp_path / "a", site=SITE, context_size=2, seed=1)
    export_saelens(str(tmp_path / "shards"), tmp_path / "b", site=SITE, context_size=2, seed=1)
    # tiny output files: many spill files and Arrow files, the same rows in the same order
    c = export_saelens(str(tmp_path / "shards"), tmp_path / "c", site=SITE, context_size=2, seed=1, chunk_mb=0.001)
    export_saelens(str(tmp_path / "shards"), tmp_path / "d", site=SITE, context_size=2, seed=2)
    assert a.files == 1 and c.files > 5
    assert (tmp_path / "a" / "data-00000-of-00001.arrow").read_bytes() == (
        tmp_path / "b" / "data-00000-of-00001.arrow"
    ).read_bytes()
    _, acts_a, tok_a = read_back(tmp_path / "a")
    _, acts_c, tok_c = read_back(tmp_path / "c")
    _, acts_d, _ = read_back(tmp_path / "d")
    np.testing.assert_array_equal(acts_a, acts_c)
    np.testing.assert_array_equal(tok_a, tok_c)
    keys = [(int(x[0, 0]), int(x[0, 1])) for x in acts_a]
    assert sorted(keys) == sorted((int(x[0, 0]), int(x[0, 1])) for x in acts_d) and keys != [
        (int(x[0, 0]), int(x[0, 1])) for x in acts_d
    ]
    # global: the order is the seed's permutation of the windows in reading order, not shard by shard
    reading_order = sorted(keys)
    perm = np.random.default_rng(1).permutation(len(keys))
    assert keys == [reading_order[i] for i in perm]


def test_float16_and_hook_name_option(tmp_path):
    write_shards(tmp_path / "shards", [sample_batch()], store_dtype="float32")
    export_saelens(
        str(tmp_path / "shards"),
        tmp_path / "out",
        site="hook_embed",
        context_size=3,
        dtype="float16",
        column="model.embed_tokens",
    )
    ds = datasets.load_from_disk(str(tmp_path / "out"))
    assert ds.features["model.embed_tokens"] == datasets.Array2D(shape=(3, 6), dtype="float16")


def test_a_job_root_exports_the_committed_shards_only(tmp_path):
    store = open_store(str(tmp_path / "store"))
    spec, _ = q.prepare(
        store, "job", input="d.jsonl", fingerprint="ab" * 32, rows=18, unit_rows=9, options={"model": "m"}
    )
    job = tmp_path / "store" / "job"
    for unit, first in ((0, 0), (1, 9)):
        good = write_shards(job, [sample_batch(first=first)], unit=unit, attempt=f"a1-{unit:08x}")
        write_shards(job, [sample_batch(first=first)], unit=unit, attempt="a2-deadbeef")  # a dead attempt
        lease = q.claim(store, "job", unit, "w1", 60)
        rec = q.DoneRecord(
            unit=unit,
            start=first,
            stop=first + 9,
            worker="w1",
            attempt=1,
            rows_stored=9,
            tokens=sum(LENGTHS),
            skipped={},
            committed_at=time.time(),
            seconds=1.0,
            shards=[
                q.ShardInfo(q.shard_key("", unit, s.part, f"a1-{unit:08x}"), len(s.data), "0" * 64, s.tokens)
                for s in good
            ],
        )
        if unit == 0:
            assert q.commit(store, lease, rec, 60)
    # unit 1 is not done: its shards stay out, and so do the dead attempt's
    s = export_saelens(str(job), tmp_path / "out", site=SITE, context_size=4)
    assert (s.units_done, s.units_total) == (1, 2)
    _, acts, _ = read_back(tmp_path / "out")
    assert {(int(x[0, 0]), int(x[0, 1])) for x in acts} == expected_windows(LENGTHS, 4)


def test_an_export_from_a_bucket_equals_the_local_one_and_reads_one_site(tmp_path, fake_gcs):  # noqa: F811
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    shards = write_shards(tmp_path / "shards", [sample_batch()])
    bucket = storage.Client(
        project="t", credentials=AnonymousCredentials(), client_options={"api_endpoint": fake_gcs.url}
    ).bucket("acts")
    for sh in shards:
        bucket.blob(f"run/{sh.name}").upload_from_string(sh.data)
    export_saelens("gs://acts/run", tmp_path / "remote", site=SITE, context_size=4, seed=9)
    export_saelens(str(tmp_path / "shards"), tmp_path / "local", site=SITE, context_size=4, seed=9)
    assert (tmp_path / "remote" / "data-00000-of-00001.arrow").read_bytes() == (
        tmp_path / "local" / "data-00000-of-00001.arrow"
    ).read_bytes()
    from actfleet.worker.shards import parse_header

    for sh in shards:  # each shard: its header twice (two passes), then exactly these tensors, never hook_embed
        header, _, start = parse_header(sh.data)
        size = {k: e["data_offsets"][1] - e["data_offsets"][0] for k, e in header.items()}
        served = fake_gcs.media[f"run/{sh.name}"]
        assert sum(served) == 2 * start + size["sample_ids"] + size["positions"] + size["token_ids"] + size[SITE]
        assert len(sh.data) - sum(served) == size["hook_embed"] - start


def test_bad_input_is_one_line_exit_2(tmp_path):
    write_shards(tmp_path / "shards", [sample_batch()])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    cases = [
        (
            ["--site", "blocks.9.hook_resid_post", "--context-size", "4"],
            "out1",
            "--site blocks.9.hook_resid_post: not in",
        ),
        (["--site", SITE], "out2", "--context-size: needed"),
        (["--site", SITE, "--context-size", "64"], "out3", "no sample has 64 stored tokens"),
        (["--site", SITE, "--context-size", "4"], "full", "exists and is not an empty directory"),
    ]
    for args, out, message in cases:
        r = subprocess.run(
            [
                sys.executable,
                "-c",
                "from actfleet.cli import main; main()",
                "export",
                "saelens",
                str(tmp_path / "shards"),
                str(tmp_path / out),
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 2, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
    with pytest.raises(InputError, match="no such shard file or directory"):
        export_saelens(str(tmp_path / "nowhere"), tmp_path / "o", site=SITE, context_size=4)


# ---------------------------------------------------------------------------------------------------
# Shard metadata: what made the rows
# ---------------------------------------------------------------------------------------------------

META_KEYS = (
    "positions",
    "context_size",
    "separator",
    "prepend_bos",
    "concat",
    "max_seq",
    "d_model",
    "compute_dtype",
    "store_dtype",
    "model",
    "revision",
    "resolved_revision",
    "weights_sha256",
    "tokenizer_sha256",
)


def files_sha256(directory: Path, names) -> str:
    """Independently of worker/: sha256 over sorted (name, sha256 of the file) pairs."""
    pairs = sorted(
        (n, hashlib.sha256((directory / n).read_bytes()).hexdigest()) for n in names if (directory / n).is_file()
    )
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()


def check_metadata(meta: dict, model_dir: Path, **want) -> None:
    assert set(META_KEYS) <= set(meta), sorted(set(META_KEYS) - set(meta))
    tokenizer = [
        p.name
        for p in model_dir.iterdir()
        if p.name
        in (
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "vocab.json",
            "merges.txt",
            "added_tokens.json",
            "chat_template.jinja",
        )
    ]
    assert tokenizer and meta["tokenizer_sha256"] == files_sha256(model_dir, tokenizer)
    assert meta["weights_sha256"] == files_sha256(model_dir, ["model.safetensors"])
    assert meta["d_model"] == str(json.loads((model_dir / "config.json").read_text())["hidden_size"])
    for k, v in want.items():
        assert meta[k] == v, (k, meta[k], v)


def test_job_metadata_records_the_window_options_and_the_hashes():
    from actfleet.job_options import JobOptions
    from actfleet.worker.shards import job_metadata, read_tensors, shard_bytes

    whole = job_metadata(
        JobOptions(positions="all"),
        max_seq=64,
        d_model=32,
        model_files={"model.safetensors": "a" * 64, "tokenizer.json": "b" * 64, "config.json": "c"},
    )
    assert (whole["context_size"], whole["separator"], whole["prepend_bos"], whole["concat"]) == (
        "0",
        "eos",
        "true",
        "true",
    )
    assert (
        whole["positions"] == "all"
        and whole["max_seq"] == "64"
        and whole["weights_sha256"] != whole["tokenizer_sha256"]
    )
    assert whole["weights_sha256"] and whole["tokenizer_sha256"] and whole["resolved_revision"] == ""
    new = job_metadata(
        JobOptions(
            positions="all",
            context_size=128,
            separator="bos",
            prepend_bos=False,
            concat=False,
            compute_dtype="float32",
            store_dtype="bfloat16",
        ),
        max_seq=128,
        d_model=32,
        resolved_revision="f" * 40,
    )
    assert (new["context_size"], new["separator"], new["prepend_bos"], new["concat"]) == (
        "128",
        "bos",
        "false",
        "false",
    )
    assert (new["compute_dtype"], new["store_dtype"], new["d_model"]) == ("float32", "bfloat16", "32")
    assert new["resolved_revision"] == "f" * 40 and new["weights_sha256"] == ""
    blob = shard_bytes(
        sample_ids=[0],
        token_ids=[1],
        positions=[0],
        acts={SITE: np.ones((1, 2), np.float32)},
        sites=[SITE],
        store_dtype="float32",
        model="m",
        revision="r",
        job="j",
        unit=0,
        part=0,
        random_weights=False,
        extra_metadata={**new, "model": "not this"},
    )
    meta = read_tensors(blob)[1]
    assert {k: meta[k] for k in new} == new and meta["model"] == "m"  # the format's own keys win


# ---------------------------------------------------------------------------------------------------
# The real consumer: SAELens trains from an export of a real extraction
# ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_saelens_trains_from_an_export_of_an_extraction(tmp_path):
    pytest.importorskip("sae_lens")
    from actfleet.demo.tiny_model import make_tiny_model

    model = make_tiny_model(tmp_path / "tiny", max_pos=64)
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(json.dumps({"text": f"text {i}: " + "the quick brown fox " * (2 + i % 5)}) + "\n" for i in range(24))
    )
    env = dict(os.environ, ACTFLEET_JAX_CACHE=str(tmp_path / "jax"))
    cli = [sys.executable, "-c", "from actfleet.cli import main; main()"]
    r = subprocess.run(
        [
            *cli,
            "extract",
            "--model",
            str(model),
            "--input",
            str(data),
            "--out",
            str(tmp_path / "acts"),
            "--layers",
            "1",
            "--positions",
            "all",
            "--shard-mb",
            "0.05",
            "--json",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    from actfleet.worker.reader import shard_metadata

    for meta in shard_metadata(str(tmp_path / "acts")):
        check_metadata(
            meta,
            model,
            positions="all",
            context_size="0",
            max_seq="64",
            compute_dtype="bfloat16",
            store_dtype="bfloat16",
            model=str(model),
            revision="main",
            resolved_revision="",
        )
    ctx = 8
    r = subprocess.run(
        [
            *cli,
            "export",
            "saelens",
            str(tmp_path / "acts"),
            str(tmp_path / "cache"),
            "--site",
            "blocks.1.hook_resid_post",
            "--context-size",
            str(ctx),
            "--seed",
            "7",
            "--hook-name",
            "model.layers.1",
            "--json",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    d_in, windows = summary["d_in"], summary["windows"]
    assert windows >= 32

    code = f"""
import json, sys, torch, datasets
from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig, StandardTrainingSAEConfig
torch.manual_seed(0)
cache = {str(tmp_path / "cache")!r}
# SAELens #551: in cached mode the runner still wants a token dataset. The export's own token_ids are the
# tokens of exactly these windows (the way SAELens's own tests pass override_dataset).
tokens = datasets.load_from_disk(cache).select_columns(["token_ids"]).rename_column("token_ids", "tokens")
cfg = LanguageModelSAERunnerConfig(
    sae=StandardTrainingSAEConfig(d_in={d_in}, d_sae={4 * d_in}, l1_coefficient=1e-3),
    model_class_name="AutoModelForCausalLM", model_name={str(model)!r}, hook_name="model.layers.1",
    dataset_path="", is_dataset_tokenized=True, context_size={ctx}, prepend_bos=False,
    use_cached_activations=True, cached_activations_path=cache,
    training_tokens=16 * 64, train_batch_size_tokens=64, store_batch_size_prompts=4, n_batches_in_buffer=16,
    lr=1e-2, device="cpu", dtype="float32", logger=LoggingConfig(log_to_wandb=False),
    checkpoint_path=None, n_checkpoints=0, output_path={str(tmp_path / "sae")!r}, verbose=False)
runner = LanguageModelSAETrainingRunner(cfg, override_dataset=tokens)
store = runner.activations_store
assert store.cached_activation_dataset is not None  # the cached path, not the model, feeds training
acts, tok = store.get_raw_llm_batch()
x = next(iter(store))
before = runner.sae.W_dec.detach().clone()
sae = runner.run()
mse = float(((sae(x) - x) ** 2).mean())
print(json.dumps({{"acts": list(acts.shape), "tok": list(tok.shape), "batch": list(x.shape), "mse": mse,
                  "var": float(x.var()), "changed": bool((sae.W_dec - before).abs().max() > 0)}}))
"""
    r = subprocess.run(
        [sys.executable, "-c", code],
        env=dict(env, WANDB_MODE="disabled"),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["acts"] == [4 * ctx, d_in] and got["tok"] == [4 * ctx] and got["batch"] == [64, d_in]
    print(got)
    assert got["changed"] and got["mse"] < got["var"]  # it trained: reconstruction beats predicting the mean
    assert (tmp_path / "sae").is_dir() and any((tmp_path / "sae").rglob("*.safetensors"))

    # SAELens's own validation meets our features: a wrong context size is refused by it, not by us.
    bad = code.replace(f"context_size={ctx}", f"context_size={ctx - 1}")
    r = subprocess.run(
        [sys.executable, "-c", bad],
        env=dict(env, WANDB_MODE="disabled"),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert r.returncode != 0 and f"does not match context_size ({ctx - 1})" in r.stderr


@pytest.mark.slow
def test_a_fleet_job_records_its_metadata_and_exports_from_its_root(tmp_path):
    from actfleet.demo.tiny_model import make_tiny_model
    from actfleet.worker.reader import shard_metadata

    model = make_tiny_model(tmp_path / "tiny", max_pos=64)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"doc {i} " + "lorem ipsum " * (1 + i % 3)}) + "\n" for i in range(12)))
    env = dict(os.environ, ACTFLEET_JAX_CACHE=str(tmp_path / "jax"))
    cli = [sys.executable, "-c", "from actfleet.cli import main; main()"]
    store = tmp_path / "store"
    for args in (
        [
            "prepare",
            "--store",
            str(store),
            "--job",
            "j",
            "--model",
            str(model),
            "--input",
            str(data),
            "--layers",
            "0",
            "--positions",
            "all",
            "--compute-dtype",
            "float32",
            "--store-dtype",
            "float32",
            "--max-seq",
            "60",
            "--unit-rows",
            "5",
            "--shard-mb",
            "0.02",
        ],
        ["work", "--store", str(store), "--job", "j", "--worker-id", "w0"],
    ):
        r = subprocess.run([*cli, *args], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
    metas = shard_metadata(str(store / "j"))  # the job's root: its committed shards
    assert {m["path"][:13] for m in metas} == {f"shards/{u:06d}" for u in range(3)}  # its three units
    for meta in metas:
        check_metadata(
            meta,
            model,
            positions="all",
            context_size="0",
            max_seq="60",
            compute_dtype="float32",
            store_dtype="float32",
            model=str(model.resolve()),
            revision="main",
            resolved_revision="",
        )
    s = export_saelens(str(store / "j"), tmp_path / "out", site="blocks.0.hook_resid_post", context_size=4)
    assert (s.units_done, s.units_total) == (3, 3) and s.tokens == sum(m["tokens"] for m in metas)
    assert s.windows == len(datasets.load_from_disk(str(tmp_path / "out")))
