"""A hub dataset (offline, from a hub cache layout) through prepare -> work -> verify with SAELens-style context
windows: every input row stored or skipped with a reason, every stored token traced back to its text; and
`extract` on the same files gives the same windows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.hub_layout import make_hub_dataset

REPO = Path(__file__).resolve().parents[1]
COMMIT = "5eed" + "1" * 36
TEXTS = [f"Document {i}: " + "the quick brown fox " * (i % 7) for i in range(23)]
TEXTS[4] = ""  # an empty document: skipped with its reason


def actfleet(*args, env=None, hide_torch=False):
    pre = "import sys; sys.modules['torch'] = None; " if hide_torch else ""  # as on a TPU VM: no PyTorch
    return subprocess.run(
        [sys.executable, "-c", pre + "from actfleet.cli import main; main()", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )


def load(shards_dir):
    """Every tensor of the shards, concatenated in name order (the reader's load() belongs to another part of the
    work and need not carry the window tensors)."""
    from actfleet.worker.shards import open_file

    parts = [open_file(f)[0] for f in sorted(Path(shards_dir).glob("*.safetensors"))]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def parquet(texts):
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"text": texts, "id": list(range(len(texts)))}), sink, row_group_size=4)
    return sink.getvalue().to_pybytes()


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    from actfleet.demo.tiny_model import make_tiny_model

    root = tmp_path_factory.mktemp("research")
    model = make_tiny_model(root / "model", seed=2, max_pos=64)
    cache = root / "hub"
    make_hub_dataset(
        cache,
        "org/docs",
        COMMIT,
        {
            "data/train-00000-of-00002.parquet": parquet(TEXTS[:13]),
            "data/train-00001-of-00002.parquet": parquet(TEXTS[13:]),
            "data/test-00000-of-00001.parquet": parquet(["held out"]),
        },
    )
    env = {
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(cache),
        "ACTFLEET_DATA_CACHE": str(root / "data-cache"),
        "ACTFLEET_JAX_CACHE": str(root / "jax"),
    }
    return root, model, env


@pytest.mark.slow
def test_hub_dataset_windows_through_the_fleet_path(hub, tmp_path):
    from transformers import AutoTokenizer

    root, model, env = hub
    store = tmp_path / "store"
    r = actfleet(
        "prepare",
        "--store",
        str(store),
        "--job",
        "w",
        "--model",
        str(model),
        "--input",
        "org/docs",
        "--split",
        "train",
        "--layers",
        "1",
        "--positions",
        "all",
        "--context-size",
        "16",
        "--unit-rows",
        "10",
        "--json",
        env=env,
    )
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["rows"] == 23 and info["files"] == 2 and info["units"] == 3
    spec = json.loads((store / "w" / "job.json").read_text())
    assert [f["path"] for f in spec["input_files"]] == [
        f"hf://datasets/org/docs@{COMMIT}/data/train-0000{i}-of-00002.parquet" for i in (0, 1)
    ]
    assert [f["index"] for f in spec["input_files"]] == [[4, 4, 4, 1], [4, 4, 2]]  # row groups per file

    w = actfleet("work", "--store", str(store), "--job", "w", "--worker-id", "w0", "--json", env=env, hide_torch=True)
    assert w.returncode == 0, w.stderr
    assert "PyTorch was not found" not in w.stderr and "Token indices" not in w.stderr
    v = actfleet("verify", "--store", str(store), "--job", "w", "--json")
    rep = json.loads(v.stdout)
    assert v.returncode == 0 and rep["ok"], v.stdout
    assert rep["rows"] == 23 == rep["rows_stored"] + sum(rep["rows_skipped"].values())
    assert rep["rows_skipped"]["empty text"] == 1

    acts = load(str(store / "w" / "shards"))
    ids, pos = acts["sample_ids"], acts["positions"]
    windows = np.unique(ids)
    assert len(ids) == 16 * len(windows)  # every window exactly 16 tokens, all stored
    assert set(np.unique(ids >> 20).tolist()) <= {0, 10, 20}  # window ids name their unit's first row
    tok = AutoTokenizer.from_pretrained(model)
    src_rows, src_pos, tokens = acts["source_rows"], acts["source_positions"], acts["token_ids"]
    for i in range(len(ids)):  # each token traces back to its text, or is an inserted BOS / separator
        if src_pos[i] >= 0:
            assert tok(TEXTS[src_rows[i]], add_special_tokens=False)["input_ids"][src_pos[i]] == tokens[i]
        else:
            assert tokens[i] in (tok.bos_token_id, tok.eos_token_id)
    for w_id in windows[:3]:
        assert pos[ids == w_id].tolist() == list(range(16))
        # --prepend-bos (the default); Qwen2's tokenizer has no BOS: EOS stands in, as in TransformerLens
        assert tok.bos_token_id is None and tokens[(ids == w_id) & (pos == 0)][0] == tok.eos_token_id
    # rows 0..9 of unit 0 never share a window with rows of unit 1: windows do not span units
    for w_id in windows:
        units = set((src_rows[ids == w_id] // 10).tolist())
        assert len(units) == 1

    # extract on the same dataset and options: the same windows, the same tokens (same rows, same bits)
    out = tmp_path / "out"
    e = actfleet(
        "extract",
        "--model",
        str(model),
        "--input",
        "org/docs",
        "--out",
        str(out),
        "--layers",
        "1",
        "--positions",
        "all",
        "--context-size",
        "16",
        "--unit-rows",
        "10",
        "--json",
        env=env,
    )
    assert e.returncode == 0, e.stderr
    got = load(str(out))
    for k in ("sample_ids", "positions", "token_ids", "source_rows", "source_positions", "blocks.1.hook_resid_post"):
        assert np.array_equal(got[k], acts[k]), k


@pytest.mark.slow
def test_pretokenized_rows_and_an_id_outside_the_vocabulary(hub, tmp_path):
    """--tokens-field: the ids are stored as given; an id outside the vocabulary stops the worker with one line
    naming the row and field (exit 2), after releasing its lease, instead of retrying the unit forever."""
    root, model, env = hub
    data = tmp_path / "tokens.jsonl"
    rows = [{"input_ids": [5, 6, 7, 8]}, {"input_ids": [9, 10]}, {"other": 1}, {"input_ids": [11, 99999]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = tmp_path / "store"
    r = actfleet(
        "prepare",
        "--store",
        str(store),
        "--job",
        "t",
        "--model",
        str(model),
        "--input",
        str(data),
        "--layers",
        "0",
        "--positions",
        "all",
        "--tokens-field",
        "input_ids",
        "--unit-rows",
        "3",
        env=env,
    )
    assert r.returncode == 0, r.stderr
    w = actfleet("work", "--store", str(store), "--job", "t", "--worker-id", "w0", "--json", env=env)
    assert w.returncode == 2, w.stderr
    assert w.stderr.strip().splitlines()[-1] == (
        "actfleet: row 3: field 'input_ids' holds token id 99999, outside the model's vocabulary (0..319)"
    ), w.stderr[-2000:]
    assert not list((store / "t" / "leases").iterdir())  # released: nothing waits for an expiry
    done = json.loads(next((store / "t" / "done").iterdir()).read_text())
    assert done["unit"] == 0 and done["skipped"] == {"missing field 'input_ids'": [2]}
    acts = load(str(store / "t" / "shards"))
    assert acts["token_ids"].tolist() == [5, 6, 7, 8, 9, 10] and acts["positions"].tolist() == [0, 1, 2, 3, 0, 1]
