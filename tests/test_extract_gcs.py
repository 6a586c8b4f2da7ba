"""gs:// everywhere the extractor reads: a model prefix, a dataset object and a prefix of shards, through the real
google-cloud-storage client against the enforcing fake GCS server (tests/fakes/gcs_server.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from actfleet.demo.tiny_model import make_tiny_model
from actfleet.worker.reader import load, shard_metadata
from tests.fakes.gcs_server import fake_gcs  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parent.parent


def actfleet(*args, tmp: Path):
    env = dict(
        os.environ,
        ACTFLEET_JAX_CACHE=str(tmp / "jaxcache"),
        ACTFLEET_MODEL_CACHE=str(tmp / "models"),
        ACTFLEET_DATA_CACHE=str(tmp / "data"),
    )
    return subprocess.run(
        [sys.executable, "-c", "from actfleet.cli import main; main()", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def upload_dir(bucket, src: Path, prefix: str) -> None:
    for f in sorted(src.rglob("*")):
        if f.is_file():
            bucket.blob(f"{prefix}/{f.relative_to(src)}").upload_from_filename(str(f))


@pytest.mark.slow
def test_model_dataset_and_shards_from_gcs_match_local(tmp_path, fake_gcs):  # noqa: F811
    bucket = storage.Client(
        project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": fake_gcs.url}
    ).bucket("acts")
    model = make_tiny_model(tmp_path / "tiny", max_pos=64)
    upload_dir(bucket, model, "models/tiny")
    data = tmp_path / "rows.jsonl"
    data.write_text(
        "".join(json.dumps({"text": f"row {i}: " + "ipsum " * (1 + i % 4)}) + "\n" for i in range(9)) + "not json\n"
    )
    bucket.blob("datasets/rows.jsonl").upload_from_filename(str(data))

    common = ["--layers", "1", "--store-dtype", "float32", "--json"]
    remote = actfleet(
        "extract",
        "--model",
        "gs://acts/models/tiny",
        "--input",
        "gs://acts/datasets/rows.jsonl",
        "--out",
        str(tmp_path / "from-gcs"),
        *common,
        tmp=tmp_path,
    )
    assert remote.returncode == 0, remote.stderr
    local = actfleet(
        "extract",
        "--model",
        str(model),
        "--input",
        str(data),
        "--out",
        str(tmp_path / "from-disk"),
        *common,
        tmp=tmp_path,
    )
    assert local.returncode == 0, local.stderr
    summary = json.loads(remote.stdout)
    assert summary["rows"] == 10 and summary["skipped"] == {"bad JSON": 1}
    # cached once, per set of object generations
    assert len(list((tmp_path / "models" / "gcs" / "acts" / "models" / "tiny").glob("@*/.complete"))) == 1

    a, b = load(str(tmp_path / "from-gcs")), load(str(tmp_path / "from-disk"))
    assert a.keys() == b.keys() and len(a["sample_ids"]) == summary["stored_tokens"] > 0
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])

    # The shards read back from a bucket prefix are the same rows, and carry their metadata.
    upload_dir(bucket, tmp_path / "from-gcs", "job/shards")
    c = load("gs://acts/job/shards", samples=[0, 2])
    keep = np.isin(a["sample_ids"], [0, 2])
    for k in a:
        np.testing.assert_array_equal(c[k], a[k][keep])
    meta = shard_metadata("gs://acts/job/shards")
    assert sum(m["tokens"] for m in meta) == summary["stored_tokens"]


def test_missing_model_prefix_is_one_line(tmp_path, fake_gcs):  # noqa: F811
    storage.Client(
        project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": fake_gcs.url}
    ).bucket("acts").blob("x").upload_from_string(b"")
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n')
    r = actfleet(
        "extract",
        "--model",
        "gs://acts/models/none",
        "--input",
        str(tmp_path / "d.jsonl"),
        "--out",
        str(tmp_path / "out"),
        tmp=tmp_path,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].endswith("model gs://acts/models/none: no objects under that prefix")
    assert len(r.stderr.strip().splitlines()) == 1


def test_a_model_object_named_with_dotdot_is_refused_and_nothing_lands_outside(tmp_path, fake_gcs, monkeypatch):  # noqa: F811
    from actfleet.errors import InputError
    from actfleet.worker import model_files

    bucket = storage.Client(
        project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": fake_gcs.url}
    ).bucket("acts")
    bucket.blob("models/m/config.json").upload_from_string(b"{}")
    bucket.blob("models/m/../../escaped.txt").upload_from_string(b"planted")
    monkeypatch.setenv("ACTFLEET_MODEL_CACHE", str(tmp_path / "cache" / "models"))
    with pytest.raises(InputError, match=r"escaped\.txt.*outside the model cache"):
        model_files.resolve("gs://acts/models/m")
    assert sorted(p.name for p in tmp_path.rglob("escaped.txt")) == []


def test_a_model_prefix_with_dotdot_is_refused_before_anything_is_written(tmp_path, fake_gcs, monkeypatch):  # noqa: F811
    """The prefix itself climbing out (issue 27 item 12): the cache directory is built from it, so a ".." in
    it would put the download outside the model cache; refused by the one gs:// parser before any I/O."""
    from actfleet.errors import InputError
    from actfleet.worker import model_files

    bucket = storage.Client(
        project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": fake_gcs.url}
    ).bucket("acts")
    bucket.blob("../../../../escape/config.json").upload_from_string(b"{}")
    bucket.blob("../../../../escape/model.safetensors").upload_from_string(b"planted")
    monkeypatch.setenv("ACTFLEET_MODEL_CACHE", str(tmp_path / "a" / "b" / "cache" / "models"))
    with pytest.raises(InputError, match=r'model "gs://acts/\.\./\.\./\.\./\.\./escape": "\.\." is not allowed'):
        model_files.resolve("gs://acts/../../../../escape")
    assert [p for p in tmp_path.rglob("*") if "escape" in p.name] == []
