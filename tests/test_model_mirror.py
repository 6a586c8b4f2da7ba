"""A hub model mirrored into the job's store at prepare (worker/model_mirror.py) and loaded by workers from
there, by resolved commit and checked file by file (issue 24.1). The hub is a local cache laid out as
huggingface_hub writes it, read offline by the real client; the store is the GCS fake."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from actfleet.errors import InputError
from actfleet.store import open_store
from actfleet.worker import model_mirror, pinning
from tests.fakes.gcs_server import fake_gcs  # noqa: F401
from tests.hub_layout import offline

COMMIT = "c0ffee" + "0" * 34
FILES = {
    "config.json": json.dumps({"model_type": "qwen2"}).encode(),
    "tokenizer.json": b"{}",
    "model.safetensors": b"weights",
}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    root = cache / "models--org--tiny"
    snap = root / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    for name, data in FILES.items():
        (snap / name).write_bytes(data)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)
    offline(monkeypatch, cache)
    monkeypatch.setenv("ACTFLEET_MODEL_CACHE", str(tmp_path / "model-cache"))
    return cache


@dataclasses.dataclass(frozen=True)
class Pinned:  # the two fields of worker/job_setup.py JobInputs that mirroring reads and replaces
    model_dir: object
    model_pin: dict


def test_a_hub_model_is_mirrored_once_by_commit_and_workers_load_it_without_the_hub(fake_gcs, hub):  # noqa: F811
    model_dir, pin = pinning.pin_model("org/tiny", "main")
    assert pin.revision == COMMIT
    store = open_store("gs://acts-bucket/jobs")
    pinned = model_mirror.mirrored(Pinned(model_dir, pin.to_json()), "org/tiny", store)
    mirror = f"gs://acts-bucket/jobs/models/org--tiny/{COMMIT}"
    assert pinned.model_pin["mirror"] == mirror and pinned.model_pin["files"] == pin.files
    names = {n for (_, n) in fake_gcs.objects}
    assert names == {f"jobs/models/org--tiny/{COMMIT}/{f}" for f in FILES}
    generations = {k: o.generation for k, o in fake_gcs.objects.items()}
    model_mirror.mirrored(Pinned(model_dir, pin.to_json()), "org/tiny", store)
    assert {k: o.generation for k, o in fake_gcs.objects.items()} == generations  # uploaded once

    shutil.rmtree(hub)  # a worker without the hub
    loaded = pinning.pinned_model("org/tiny", "main", pinning.ModelPin.from_json(pinned.model_pin))
    assert {p.name: p.read_bytes() for p in loaded.iterdir() if p.is_file() and not p.name.startswith(".")} == FILES

    # A mirrored file that no longer matches its pinned sha256 is refused by name.
    key = ("acts-bucket", f"jobs/models/org--tiny/{COMMIT}/model.safetensors")
    fake_gcs.objects[key].data = b"other weights"
    fake_gcs.objects[key].generation += 1
    with pytest.raises(InputError, match="changed since prepare.*model.safetensors"):
        pinning.pinned_model("org/tiny", "main", pinning.ModelPin.from_json(pinned.model_pin))


def test_a_model_given_as_a_path_is_not_mirrored(fake_gcs, hub, tmp_path):  # noqa: F811
    local = tmp_path / "local-model"
    shutil.copytree(hub / "models--org--tiny" / "snapshots" / COMMIT, local)
    model_dir, pin = pinning.pin_model(str(local), "main")
    pinned = Pinned(model_dir, pin.to_json())
    assert model_mirror.mirrored(pinned, str(local), open_store("gs://acts-bucket/jobs")) is pinned
    assert not fake_gcs.objects and "mirror" not in pin.to_json()  # job.json of such a job is unchanged


def test_workers_may_read_the_mirror_of_their_hub_model_and_no_job_may_write_it():
    from actfleet.config import parse
    from actfleet.errors import ConfigError
    from actfleet.infra.bucket_access import read_objects, worker_grants

    def config(**job):
        return parse(
            {
                "fleet": {
                    "id": "acts",
                    "project": "my-project",
                    "region": "us-central1",
                    "zones": {"us-central1-a": 1},
                },
                "repo": {"url": "https://example.com/r.git", "commit": "a" * 40},
                "storage": {"bucket": "b-acts"},
                "job": {"model": "org/tiny", "input": "i", "layers": [1], "store": "gs://b-acts/jobs"} | job,
            }
        )

    assert "jobs/models/org--tiny/" in read_objects(config())[1]
    assert not [p for p in read_objects(config(model="/models/tiny"))[1] if "models/" in p and "org" in p]
    with pytest.raises(ConfigError, match="where prepare mirrors hub models"):
        worker_grants(config(name="models"))
