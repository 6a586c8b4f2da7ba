"""`actfleet prepare / work / verify` end to end on a tiny random Qwen2 model (the real engine), a local
filesystem store, and real subprocesses for `work`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load as load_safetensors

from actfleet import work_queue as q
from actfleet.store import open_store

REPO = Path(__file__).resolve().parents[1]
TEXTS = [
    "Hello there, general.",
    "The quick brown fox jumps over the lazy dog.",
    "",
    "a",
    "Grids: 0 1 2 / 3 4 5",
    "Activations are stored in shards.",
    "user assistant system",
    "What is the answer? 42.",
] * 3


def actfleet(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from actfleet.cli import main; main()", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from actfleet.demo.tiny_model import make_tiny_model

    root = tmp_path_factory.mktemp("cmd")
    model = make_tiny_model(root / "model", seed=1)
    data = root / "data.jsonl"
    lines = [json.dumps({"text": t}) for t in TEXTS]
    lines[5] = '{"text": broken'  # a malformed row: counted as skipped, never crashes
    data.write_text("\n".join(lines) + "\n")
    return root, model, data


def prepare_args(store, model, data, *extra):
    return (
        "prepare",
        "--store",
        str(store),
        "--job",
        "cmd",
        "--model",
        str(model),
        "--input",
        str(data),
        "--layers",
        "0,1",
        "--sites",
        "resid_post,embed",
        "--positions",
        "all",
        "--store-dtype",
        "float32",
        "--compute-dtype",
        "float32",
        "--unit-rows",
        "5",
        *extra,
    )


@pytest.mark.slow
def test_prepare_work_verify_and_the_rows_equal_extract(tiny, tmp_path):
    root, model, data = tiny
    store_dir = tmp_path / "bucket"
    r = actfleet(*prepare_args(store_dir, model, data, "--json"))
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["created"] and info["units"] == 5 and info["rows"] == len(TEXTS)
    again = actfleet(*prepare_args(store_dir, model, data, "--json"))
    assert again.returncode == 0 and not json.loads(again.stdout)["created"]

    w = actfleet("work", "--store", str(store_dir), "--job", "cmd", "--worker-id", "w0", "--json")
    assert w.returncode == 0, w.stderr
    res = json.loads(w.stdout)
    assert res["job_complete"] and res["units_committed"] == 5
    v = actfleet("verify", "--store", str(store_dir), "--job", "cmd")
    assert v.returncode == 0 and "verified: OK" in v.stdout, v.stdout + v.stderr

    store = open_store(str(store_dir))
    rep = json.loads(actfleet("verify", "--store", str(store_dir), "--job", "cmd", "--json").stdout)
    # every row accounted for: the malformed line and the three empty texts are skipped with their reasons
    assert rep["ok"] and rep["rows_stored"] == len(TEXTS) - 4
    assert sum(rep["rows_skipped"].values()) == 4 and len(rep["rows_skipped"]) == 2

    # The same rows, bit for bit, as `actfleet extract` with the same unit size.
    out = tmp_path / "extract"
    e = actfleet(
        "extract",
        "--model",
        str(model),
        "--input",
        str(data),
        "--out",
        str(out),
        "--layers",
        "0,1",
        "--sites",
        "resid_post,embed",
        "--positions",
        "all",
        "--store-dtype",
        "float32",
        "--compute-dtype",
        "float32",
        "--unit-rows",
        "5",
    )
    assert e.returncode == 0, e.stderr
    ext = [load_safetensors(p.read_bytes()) for p in sorted(out.glob("*.safetensors"))]
    job = [
        load_safetensors(store.read(f"cmd/{s.name}")[0]) for u in range(5) for s in q.read_done(store, "cmd", u).shards
    ]
    names = sorted(ext[0])
    assert names == sorted(job[0])
    for name in names:
        a = np.concatenate([t[name] for t in ext])
        b = np.concatenate([t[name] for t in job])
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), name


@pytest.mark.slow
def test_a_changed_dataset_is_refused_by_prepare_and_work(tiny, tmp_path):
    root, model, data = tiny
    store_dir = tmp_path / "bucket"
    assert actfleet(*prepare_args(store_dir, model, data)).returncode == 0
    changed = tmp_path / "data.jsonl"
    changed.write_text(data.read_text().replace("lazy dog", "lazy cat"))
    r = actfleet(*prepare_args(store_dir, model, changed))
    assert r.returncode == 2 and "different dataset" in r.stderr and "\n" not in r.stderr.strip()
    # work reads the job's own input path: change that file in place
    moved = tmp_path / "in-place"
    moved.mkdir()
    inplace = moved / "data.jsonl"
    inplace.write_text(data.read_text())
    assert actfleet(*prepare_args(tmp_path / "b2", model, inplace)).returncode == 0
    inplace.write_text(data.read_text().replace("fox", "cat"))
    fresh = {"ACTFLEET_DATA_CACHE": str(tmp_path / "a-new-machine")}  # holds no copy of the pinned bytes
    w = actfleet("work", "--store", str(tmp_path / "b2"), "--job", "cmd", env=fresh)
    assert w.returncode == 2 and "changed since prepare" in w.stderr
    assert list(open_store(str(tmp_path / "b2")).list("cmd/done/")) == []


def test_verify_exit_codes_and_one_line_errors(tmp_path):
    from actfleet.worker.work_loop import Worker
    from tests.fakes import standin_extractor as sx

    data = sx.write_dataset(tmp_path / "d.jsonl", 12)
    store = open_store(str(tmp_path / "bucket"))
    spec, _ = q.prepare(
        store, "job", input=str(data), fingerprint=sx.fingerprint(data), rows=12, unit_rows=4, options={}
    )
    assert actfleet("verify", "--store", str(tmp_path / "bucket"), "--job", "job").returncode == 1  # not done
    Worker(store, spec, sx.StandinExtractor(data), "w").run()
    ok = actfleet("verify", "--store", str(tmp_path / "bucket"), "--job", "job")
    assert ok.returncode == 0 and "verified: OK" in ok.stdout
    late = actfleet("work", "--store", str(tmp_path / "bucket"), "--job", "job")  # a worker started after the end
    assert late.returncode == 0 and "already complete" in late.stdout
    store.delete("job/" + q.read_done(store, "job", 1).shards[0].name)
    bad = actfleet("verify", "--store", str(tmp_path / "bucket"), "--job", "job")
    assert bad.returncode == 1 and "missing-shard" in bad.stderr
    missing = actfleet("verify", "--store", str(tmp_path / "bucket"), "--job", "nope")
    assert missing.returncode == 2 and "not prepared" in missing.stderr
    no_store = actfleet("verify", "--job", "x", env={"ACTFLEET_CONFIG": str(tmp_path / "absent.toml")})
    assert no_store.returncode == 2 and "--store" in no_store.stderr
