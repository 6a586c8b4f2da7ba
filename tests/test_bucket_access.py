"""The workers' bucket grants (infra/bucket_access.py), evaluated by a real CEL engine (cel-python) the way
Cloud Storage evaluates IAM conditions: an object permission against the object (`resource.name` =
projects/_/buckets/B/objects/NAME, `resource.type` = storage.googleapis.com/Object), `storage.objects.list`
against the bucket (projects/_/buckets/B, storage.googleapis.com/Bucket). The stacks' JSON is checked in
test_stacks.py; this module needs no synth.
"""

from __future__ import annotations

import celpy
import pytest
from celpy import celtypes

from actfleet.config import parse
from actfleet.errors import ConfigError
from actfleet.infra.bucket_access import worker_grants

BUCKET = "my-project-acts"
# The permissions of the predefined roles that matter here (Cloud Storage IAM roles reference).
ROLE_PERMISSIONS = {
    "roles/storage.objectViewer": {"storage.objects.get", "storage.objects.list"},
    "roles/storage.objectUser": {
        "storage.objects.create",
        "storage.objects.delete",
        "storage.objects.get",
        "storage.objects.list",
        "storage.objects.update",
    },
}
LIST = "storage.objects.list"


def config(**job):
    return parse(
        {
            "fleet": {"id": "acts", "project": "my-project", "region": "us-central1", "zones": {"us-central1-a": 1}},
            "repo": {"url": "https://example.com/r.git", "commit": "a" * 40},
            "storage": {"bucket": BUCKET},
            "job": {
                "name": "resid",
                "model": "Qwen/Qwen2.5-0.5B",
                "input": f"gs://{BUCKET}/data/d.jsonl",
                "layers": [1],
                **job,
            },
        }
    )


def allowed(grants, permission: str, obj: str | None = None) -> bool:
    """Whether some grant gives `permission` on object `obj` (None: the bucket itself, as for a list)."""
    if obj is None:
        resource = {"name": f"projects/_/buckets/{BUCKET}", "type": "storage.googleapis.com/Bucket"}
    else:
        resource = {"name": f"projects/_/buckets/{BUCKET}/objects/{obj}", "type": "storage.googleapis.com/Object"}
    activation = {
        "resource": celtypes.MapType({celtypes.StringType(k): celtypes.StringType(v) for k, v in resource.items()})
    }
    env = celpy.Environment()
    return any(
        permission in ROLE_PERMISSIONS[g.role] and bool(env.program(env.compile(g.expression)).evaluate(activation))
        for g in grants
    )


def test_workers_write_only_their_job_and_read_only_config_and_inputs():
    grants = worker_grants(config())
    for key in (
        "resid/job.json",
        "resid/leases/000001",
        "resid/workers/tpu-us-central1-a-0.json",
        "resid/shards/000001-0.safetensors",
    ):
        assert allowed(grants, "storage.objects.create", key) and allowed(grants, "storage.objects.delete", key)
    # The config every worker fetches at boot, the dataset: readable, never writable.
    for key in ("actfleet/acts/fleet.toml", "data/d.jsonl"):
        assert allowed(grants, "storage.objects.get", key)
        assert not allowed(grants, "storage.objects.create", key) and not allowed(grants, "storage.objects.update", key)
        assert not allowed(grants, "storage.objects.delete", key)
    # Another job's shards, another fleet's config, a sibling that merely starts like the job's name.
    for key in (
        "other/shards/000001-0.safetensors",
        "actfleet/other/fleet.toml",
        "resid-old/job.json",
        "data/other.jsonl",
    ):
        assert not allowed(grants, "storage.objects.get", key)
        assert not allowed(grants, "storage.objects.create", key)


def test_listing_is_granted_on_the_bucket_and_grants_no_reads():
    grants = worker_grants(config())
    assert allowed(grants, LIST)  # the worker lists its leases, done markers and shards
    # The list binding alone: objects are never of the bucket's type, so it reads nothing.
    (list_grant,) = [g for g in grants if g.name == "list"]
    assert not allowed([list_grant], "storage.objects.get", "other/shards/000001-0.safetensors")
    # Conditions on object names never match a list call: without the bucket-typed grant, listing is denied.
    assert not allowed([g for g in grants if g.name != "list"], LIST)


def test_a_store_prefix_and_a_model_in_the_bucket():
    grants = worker_grants(config(store=f"gs://{BUCKET}/runs/", model=f"gs://{BUCKET}/models/qwen"))
    assert allowed(grants, "storage.objects.create", "runs/resid/job.json")
    assert not allowed(grants, "storage.objects.create", "resid/job.json")
    assert allowed(grants, "storage.objects.get", "models/qwen/model.safetensors")
    assert not allowed(grants, "storage.objects.get", "models/qwen-other/model.safetensors")


def test_a_store_in_another_bucket_is_refused_by_name():
    # No grant here would let the workers write there: refuse rather than boot workers that cannot write.
    with pytest.raises(
        ConfigError, match=r'^job.store = "gs://elsewhere/out": not in storage.bucket "my-project-acts"'
    ):
        worker_grants(config(store="gs://elsewhere/out"))


def test_a_local_store_gets_no_write_grant():
    # Not gs:// (the tests' local stores): nothing in the bucket is writable.
    grants = worker_grants(config(store="/tmp/store"))
    assert [g.name for g in grants] == ["list", "read"]
    assert not allowed(grants, "storage.objects.create", "resid/job.json")


@pytest.mark.parametrize(
    "key",
    [
        "data/d.jsonl.private",  # a sibling that merely starts with the dataset's name
        "data/d.jsonl/x",
        "data/d.json",
        "actfleet/acts/fleet.toml.bak",  # likewise for the fleet config
        "actfleet/acts/fleet.toml/x",
        "models/qwen",  # the model is a directory: its objects, not a like-named object
        "models/qwenx/model.safetensors",
    ],
)
def test_read_grants_end_at_a_boundary(key):
    grants = worker_grants(config(model=f"gs://{BUCKET}/models/qwen"))
    assert not allowed(grants, "storage.objects.get", key)
    for exact in ("data/d.jsonl", "actfleet/acts/fleet.toml", "models/qwen/config.json"):
        assert allowed(grants, "storage.objects.get", exact)


@pytest.mark.parametrize("char", ["\U0001f600", "\u00e9", "\u4e2d", "\U00010348"])
def test_non_ascii_names_match_as_code_points(char):
    # A store prefix, a dataset and a model outside ASCII, outside the BMP too (JSON's surrogate pairs never match).
    grants = worker_grants(
        config(
            store=f"gs://{BUCKET}/runs-{char}/",
            input=f"gs://{BUCKET}/data-{char}/d.jsonl",
            model=f"gs://{BUCKET}/m-{char}",
        )
    )
    assert all(g.expression.isascii() for g in grants)
    assert allowed(grants, "storage.objects.create", f"runs-{char}/resid/job.json")
    assert allowed(grants, "storage.objects.get", f"data-{char}/d.jsonl")
    assert allowed(grants, "storage.objects.get", f"m-{char}/config.json")
    assert not allowed(grants, "storage.objects.create", "runs-/resid/job.json")
    assert not allowed(grants, "storage.objects.get", f"data-{char}/d.jsonl.private")


def test_a_job_prefix_that_would_hold_the_fleet_config_is_refused():
    with pytest.raises(
        ConfigError,
        match=r"job.name = 'actfleet' .* would hold the fleet config "
        r"gs://my-project-acts/actfleet/acts/fleet.toml",
    ):
        worker_grants(config(name="actfleet"))


def test_object_names_are_quoted_as_cel_strings():
    grants = worker_grants(config(input=f'gs://{BUCKET}/odd"name"\\x.jsonl'))
    assert allowed(grants, "storage.objects.get", 'odd"name"\\x.jsonl')
    assert not allowed(grants, "storage.objects.get", "odd")
