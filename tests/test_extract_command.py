"""`actfleet extract` as a subprocess: shards + summary.json, row accounting, same bits as the engine per unit,
policies for long inputs and positions, one-line errors with exit code 2."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from actfleet.demo.tiny_model import make_tiny_model
from actfleet.worker.reader import load

ROOT = Path(__file__).resolve().parent.parent


def actfleet(*args, cwd=None):
    env = dict(os.environ, ACTFLEET_JAX_CACHE=str(Path(cwd or ".").resolve() / "jaxcache"))
    return subprocess.run(
        [sys.executable, "-c", "from actfleet.cli import main; main()", *args],
        cwd=cwd or ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny", max_pos=64)


@pytest.fixture()
def dataset(tmp_path):
    lines = [json.dumps({"text": f"row {i}: " + "lorem " * (1 + i % 3)}) for i in range(14)]
    lines[3] = '{"text": "broken'
    lines[8] = json.dumps({"text": ""})
    lines[11] = json.dumps({"text": "long " * 80})  # over --max-seq 40
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
def test_extract_writes_shards_summary_and_engine_bits(tmp_path, model, dataset):
    out = tmp_path / "out"
    args = [
        "extract",
        "--model",
        str(model),
        "--input",
        str(dataset),
        "--out",
        str(out),
        "--layers",
        "0,1",
        "--sites",
        "resid_post,mlp_out",
        "--max-seq",
        "40",
        "--unit-rows",
        "5",
        "--shard-mb",
        "0.01",
        "--store-dtype",
        "float32",
        "--json",
    ]
    r = actfleet(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert json.loads(r.stdout) == summary
    assert any((tmp_path / "jaxcache").iterdir())  # compiled programs persisted for the next process
    assert summary["rows"] == 14 and summary["rows_stored"] == 11
    assert summary["skipped"] == {"bad JSON": 1, "empty text": 1, "longer than max_seq (40 tokens)": 1}
    assert summary["skipped_samples"]["bad JSON"] == [3]
    for shard in summary["shards"]:
        blob = (out / shard["name"]).read_bytes()
        assert hashlib.sha256(blob).hexdigest() == shard["sha256"] and len(blob) == shard["bytes"]
    assert {s["name"][:6] for s in summary["shards"]} == {"000000", "000001", "000002"}  # one shard run per unit
    got = load(str(out))
    assert len(got["sample_ids"]) == summary["stored_tokens"] == sum(s["tokens"] for s in summary["shards"])
    assert sorted(set(got["sample_ids"].tolist())) == [i for i in range(14) if i not in (3, 8, 11)]

    # The same bits as Engine.run over the same consecutive blocks of 5 rows (what a fleet unit does).
    from actfleet.job_options import JobOptions
    from actfleet.worker.engine import Engine
    from tests.read_input import read_rows

    engine = Engine(JobOptions(model=str(model), sites=tuple(summary["sites"]), max_seq=40, store_dtype="float32"))
    want = []
    for start in range(0, 14, 5):
        want += list(engine.run(read_rows(str(dataset), tokenizer=engine.tokenizer, start=start, stop=start + 5)))
    sids = np.concatenate([b.sample_ids for b in want])
    pos = np.concatenate([b.positions for b in want])
    order = np.lexsort((pos, sids))
    for site in summary["sites"]:
        assert np.concatenate([b.acts[site] for b in want])[order].tobytes() == got[site].tobytes()

    # Re-running with other options refuses to mix with the shards there; the same options resume (nothing
    # left to do: the same summary); --overwrite reproduces them bit for bit.
    again = actfleet(*args, "--positions", "all", cwd=tmp_path)
    assert (
        again.returncode == 2
        and "--positions was non-special, now all" in again.stderr
        and "--overwrite" in again.stderr
    )
    again = actfleet(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert {k: v for k, v in json.loads(again.stdout).items() if k != "seconds"} == {
        k: v for k, v in summary.items() if k != "seconds"
    }
    again = actfleet(*args, "--overwrite", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert [s["sha256"] for s in json.loads(again.stdout)["shards"]] == [s["sha256"] for s in summary["shards"]]


@pytest.mark.slow
def test_truncate_and_last_position(tmp_path, model, dataset):
    out = tmp_path / "out"
    r = actfleet(
        "extract",
        "--model",
        str(model),
        "--input",
        str(dataset),
        "--out",
        str(out),
        "--layers",
        "1",
        "--max-seq",
        "40",
        "--long-inputs",
        "truncate",
        "--positions",
        "last",
        "--json",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["truncated"] == 1 and summary["rows_stored"] == 12
    got = load(str(out))
    assert len(got["sample_ids"]) == 12 and len(set(got["sample_ids"].tolist())) == 12  # one token per row
    assert got["positions"][got["sample_ids"] == 11].tolist() == [39]


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda d: (d / "config.json").unlink(), "config.json is missing"),
        (lambda d: (d / "config.json").write_text("{not json"), "config.json is corrupt"),
        (lambda d: (d / "model.safetensors").unlink(), "model.safetensors is missing"),
        (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json is missing"),
        (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 4), "unreadable"),
    ],
)
def test_broken_model_dir_is_one_line_exit_2(tmp_path, dataset, damage, message):
    model = make_tiny_model(tmp_path / "m")
    damage(model)
    r = actfleet("extract", "--model", str(model), "--input", str(dataset), "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_missing_dataset_is_exit_2(tmp_path, model):
    r = actfleet(
        "extract", "--model", str(model), "--input", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")
    )
    assert r.returncode == 2 and "no such dataset file" in r.stderr


def test_a_text_field_no_row_has_is_exit_2_naming_the_fields(tmp_path, model, dataset):
    r = actfleet(
        "extract",
        "--model",
        str(model),
        "--input",
        str(dataset),
        "--out",
        str(tmp_path / "o"),
        "--text-field",
        "body",
        cwd=tmp_path,
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"actfleet: --text-field body: no row of {dataset} has field 'body'; its rows have 'text'"
    ], r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag", ["--max-seq", "--context-size"])
def test_lengths_above_the_model_context_are_exit_2(tmp_path, model, dataset, flag):
    r = actfleet(
        "extract",
        "--model",
        str(model),
        "--input",
        str(dataset),
        "--out",
        str(tmp_path / "o"),
        flag,
        "65",
        cwd=tmp_path,
    )
    assert r.returncode == 2 and f"{flag} 65: longer than the model's context (64 tokens)" in r.stderr, r.stderr


def test_help_explains_positions_and_shard_size_in_mib():
    for command in ("extract", "prepare"):
        text = " ".join(actfleet(command, "--help").stdout.split())
        assert "non-special (all but BOS/EOS/pad" in text and "last (the final token only)" in text, command
        assert "Approximate shard size in MiB (2**20 bytes)" in text, command


@pytest.mark.slow
def test_ctrl_c_then_rerun_resumes_from_committed_units(tmp_path, model):
    import signal
    import time

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {i} " + "word " * (i % 5)}) + "\n" for i in range(60)))
    args = [
        "extract",
        "--model",
        str(model),
        "--input",
        str(data),
        "--layers",
        "1",
        "--unit-rows",
        "1",
        "--shard-mb",
        "0.001",
        "--store-dtype",
        "float32",
    ]
    whole = actfleet(*args, "--out", str(tmp_path / "whole"), "--json", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "out"
    env = dict(os.environ, ACTFLEET_JAX_CACHE=str(tmp_path / "jaxcache"))
    p = subprocess.Popen(
        [sys.executable, "-c", "from actfleet.cli import main; main()", *args, "--out", str(out)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    done = out / ".extract" / "extract" / "done"  # the local queue's done records (extract.py, "Layout")
    while not (done / "000003").exists():  # a few units in, then Ctrl-C
        assert p.poll() is None, p.communicate()
        if time.monotonic() > deadline:  # a safety net against a hung run, not a timing check
            p.kill()
            pytest.fail(f"no unit committed within 240 s: {p.communicate()}")
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert not (out / "summary.json").exists()
    kept = len(list(done.iterdir()))
    assert 4 <= kept < 60  # cut short, with some units committed
    again = actfleet(*args, "--out", str(out), cwd=tmp_path)  # no --overwrite: it continues
    assert again.returncode == 0, again.stderr
    assert "ETA" in again.stderr and "rows/s" in again.stderr and "tok/s computed" in again.stderr
    summary, want = json.loads((out / "summary.json").read_text()), json.loads(whole.stdout)
    assert summary["rows"] == 60 and summary["shards"] == want["shards"]  # same names, bytes and sha256
    assert sorted(f.name for f in out.glob("*.safetensors")) == [s["name"] for s in want["shards"]]


@pytest.mark.slow
def test_max_rows_and_max_tokens_make_test_size_runs(tmp_path, model, dataset):
    base = [
        "extract",
        "--model",
        str(model),
        "--input",
        str(dataset),
        "--layers",
        "1",
        "--max-seq",
        "40",
        "--unit-rows",
        "2",
        "--json",
    ]
    r = actfleet(*base, "--out", str(tmp_path / "rows"), "--max-rows", "9", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["rows"] == 9 and s["rows_stored"] == 7  # rows 0-8: bad JSON (3) and empty (8) skipped
    assert s["skipped_samples"] == {"bad JSON": [3], "empty text": [8]}
    assert {x["name"][:6] for x in s["shards"]} == {f"{u:06d}" for u in range(4)}  # unit 4 is row 8 alone
    # --max-tokens 1: the first unit stores tokens, so the run stops after it
    r = actfleet(*base, "--out", str(tmp_path / "tokens"), "--max-tokens", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["stopped_at_max_tokens"] and s["rows"] == 2 and s["stored_tokens"] >= 1
    assert {x["name"][:6] for x in s["shards"]} == {"000000"}
