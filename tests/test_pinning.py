"""A job pins its dataset bytes and model files at prepare; workers read exactly those or refuse (issue 14
item 3). The dataset or model changes between prepare and work, and between two workers mid-job; on local
files and on gs:// (the enforcing fake GCS, where a replaced object is a new generation and the old one is
gone, as on a bucket without versioning)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from actfleet import work_queue as q
from actfleet.errors import InputError
from actfleet.store import open_store
from actfleet.worker import pinning
from actfleet.worker.verify import verify
from tests.fakes.gcs_server import fake_gcs  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["the fox", "a grid of numbers", "", "shards and leases", "one more row", "last"]


def actfleet(*args, env=None):
    return subprocess.run(
        [sys.executable, "-c", "from actfleet.cli import main; main()", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from actfleet.demo.tiny_model import make_tiny_model

    root = tmp_path_factory.mktemp("pin-models")
    return make_tiny_model(root / "a", seed=1), make_tiny_model(root / "b", seed=2)


def dataset(path: Path, texts=TEXTS) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def prepare(store, model, data, *extra, env=None):
    r = actfleet(
        "prepare",
        "--store",
        str(store),
        "--job",
        "pin",
        "--model",
        str(model),
        "--input",
        str(data),
        "--layers",
        "0",
        "--unit-rows",
        "3",
        "--json",
        *extra,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_prepare_records_the_dataset_and_model_pins(tmp_path, models):
    data = dataset(tmp_path / "d.jsonl")
    info = prepare(tmp_path / "bucket", models[0], data)
    spec = q.read_job(open_store(str(tmp_path / "bucket")), "pin")
    assert spec.fingerprint == info["fingerprint"] == pinning.pin_input(str(data))[1].sha256
    assert spec.model_pin["sha256"] == info["model_sha256"] == pinning.model_pin(models[0]).sha256
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(spec.model_pin["files"])
    # the same dataset with another model is a different job, refused rather than mixed
    r = actfleet(
        "prepare",
        "--store",
        str(tmp_path / "bucket"),
        "--job",
        "pin",
        "--model",
        str(models[1]),
        "--input",
        str(data),
        "--layers",
        "0",
        "--unit-rows",
        "3",
    )
    assert r.returncode == 2 and "model" in r.stderr and r.stderr.strip().count("\n") == 0


def test_a_model_swapped_between_prepare_and_work_is_refused(tmp_path, models):
    data = dataset(tmp_path / "d.jsonl")
    model = tmp_path / "model"
    shutil.copytree(models[0], model)
    prepare(tmp_path / "bucket", model, data)
    shutil.copy(models[1] / "model.safetensors", model / "model.safetensors")  # same path, other weights
    w = actfleet("work", "--store", str(tmp_path / "bucket"), "--job", "pin", "--worker-id", "w1")
    assert w.returncode == 2, w.stderr
    assert "changed since prepare" in w.stderr and "model.safetensors" in w.stderr
    assert list(open_store(str(tmp_path / "bucket")).list("pin/done/")) == []


def test_a_dataset_edited_mid_job_never_reaches_a_unit(tmp_path, models, monkeypatch):
    """Worker 1 started before the edit and reads its pinned copy; worker 2, on a machine with no copy,
    starts after the edit and refuses. Nothing is mixed: verify passes with worker 1's rows only."""
    from actfleet.worker.engine_extractor import EngineExtractor
    from actfleet.worker.work_loop import Worker

    data = dataset(tmp_path / "d.jsonl")
    store = open_store(str(tmp_path / "bucket"))
    prepare(tmp_path / "bucket", models[0], data)
    spec = q.read_job(store, "pin")
    monkeypatch.setenv("ACTFLEET_DATA_CACHE", str(tmp_path / "machine-1"))
    first = EngineExtractor(spec)
    dataset(data, [t.upper() + " edited" for t in TEXTS])  # the file changes while the job runs
    assert [r[1] for r in first.rows(0, 3)] == [
        "the fox",
        "a grid of numbers",
        None,
    ]  # the pinned bytes (row 2 is empty)
    monkeypatch.setenv("ACTFLEET_DATA_CACHE", str(tmp_path / "machine-2"))
    with pytest.raises(InputError, match="changed since prepare"):
        EngineExtractor(spec)
    result = Worker(store, spec, first, "w1", lease_seconds=60).run()
    assert result.job_complete
    rep = verify(store, "pin")
    assert rep.ok, rep.problems
    assert {q.read_done(store, "pin", u).input_sha256 for u in range(spec.units)} == {spec.fingerprint}


def upload(bucket, src: Path, prefix: str) -> None:
    for f in sorted(src.rglob("*")):
        if f.is_file() and not f.name.startswith("."):
            bucket.blob(f"{prefix}/{f.relative_to(src)}").upload_from_filename(str(f))


def test_a_replaced_gcs_dataset_and_model_are_refused(tmp_path, models, fake_gcs, monkeypatch):  # noqa: F811
    bucket = storage.Client(
        project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": fake_gcs.url}
    ).bucket("acts")
    upload(bucket, models[0], "models/m")
    bucket.blob("data/rows.jsonl").upload_from_filename(str(dataset(tmp_path / "d.jsonl")))
    machine = {
        "ACTFLEET_DATA_CACHE": str(tmp_path / "prep-data"),
        "ACTFLEET_MODEL_CACHE": str(tmp_path / "prep-models"),
    }
    info = prepare("gs://acts/store", "gs://acts/models/m", "gs://acts/data/rows.jsonl", env=machine)
    store = open_store("gs://acts/store")
    spec = q.read_job(store, "pin")
    assert spec.input_generation == bucket.get_blob("data/rows.jsonl").generation
    assert info["model_sha256"] == pinning.model_pin(models[0]).sha256
    # The dataset object is replaced (a new generation; the pinned one is gone, versioning being off).
    bucket.blob("data/rows.jsonl").upload_from_filename(str(dataset(tmp_path / "d2.jsonl", ["other"] * 6)))
    monkeypatch.setenv("ACTFLEET_DATA_CACHE", str(tmp_path / "fresh-data"))
    with pytest.raises(InputError, match="generation .* is gone"):
        pinning.pinned_input(spec.input, pinning.InputPin(spec.fingerprint, spec.input_generation))
    # A machine that fetched the pinned generation before reads exactly that copy.
    monkeypatch.setenv("ACTFLEET_DATA_CACHE", machine["ACTFLEET_DATA_CACHE"])
    local = pinning.pinned_input(spec.input, pinning.InputPin(spec.fingerprint, spec.input_generation))
    assert local.read_text() == (tmp_path / "d.jsonl").read_text()
    # The model's weights are replaced in the bucket: the prepare machine's cache is keyed by generations,
    # so it is not a stale hit; the fresh download differs from the pin and is refused.
    bucket.blob("models/m/model.safetensors").upload_from_filename(str(models[1] / "model.safetensors"))
    for cache in ("prep-models", "fresh-models"):
        monkeypatch.setenv("ACTFLEET_MODEL_CACHE", str(tmp_path / cache))
        with pytest.raises(InputError, match="changed since prepare.*model.safetensors"):
            pinning.pinned_model(spec.options.model, spec.options.revision, pinning.ModelPin.from_json(spec.model_pin))


def test_verify_flags_a_unit_computed_from_other_bytes(tmp_path):

    from tests.test_verify import run_job

    store, spec, _ = run_job(tmp_path, rows=10, unit_rows=5)
    assert verify(store, "job").ok
    data, gen = store.read(q.done_key("job", 1))
    store.replace(q.done_key("job", 1), json.dumps({**json.loads(data), "input_sha256": "cd" * 32}).encode(), gen)
    rep = verify(store, "job")
    assert [(p.kind, p.unit) for p in rep.problems] == [("mixed-input", 1)]


@pytest.mark.parametrize("name", ["d.jsonl", "d.jsonl.zst"])
def test_a_cache_file_edited_in_place_is_never_read(tmp_path, monkeypatch, name):
    """The data cache is content-addressed and checked on use: a cache file whose bytes no longer match the
    sha256 it is named by is made again from the source, or, when the source changed too, refused. For
    compressed JSONL the decompressed copy workers seek in is checked the same way."""
    import zstandard

    from actfleet.worker import inputs, sources

    monkeypatch.setenv("ACTFLEET_DATA_CACHE", str(tmp_path / "cache"))
    plain = "".join(json.dumps({"text": t}) + "\n" for t in TEXTS).encode()
    src = tmp_path / name
    src.write_bytes(zstandard.ZstdCompressor().compress(plain) if name.endswith(".zst") else plain)
    (f,), _ = pinning.pin_files([str(src)])

    def texts():
        return [r[1] for r in inputs.read_source_rows([f], pinning.pinned_file, start=0, stop=len(TEXTS))]

    want = texts()
    assert want == [t or None for t in TEXTS]
    copy = pinning.pinned_file(f)  # what a worker seeks in: the plain JSONL bytes, named by their sha256
    assert copy.read_bytes() == plain and copy.name == f"{f.plain_sha256 or f.sha256}.jsonl"
    # An edit in place, same length: a reader trusting the name would now read "THE fox".
    copy.write_bytes(copy.read_bytes().replace(b"the fox", b"THE fox"))
    assert texts() == want
    assert pinning.pinned_file(f).read_bytes() == plain  # made again from the (unchanged) source
    # The cache file and the source both edited: nothing holds the pinned bytes any more, so it is refused.
    for cached in (tmp_path / "cache" / "sha256").iterdir():
        cached.write_bytes(cached.read_bytes()[:-1] + b"!")
    src.write_bytes(src.read_bytes() + b"\n")
    with pytest.raises(InputError, match="changed since prepare"):
        texts()
    assert sources.fingerprint([f]) == f.sha256  # the pin itself is what job.json says, unchanged
