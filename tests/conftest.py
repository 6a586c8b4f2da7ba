"""Shared pytest set-up. Fixtures that belong to one part live next to it (tests/fakes/*, the test modules)."""

import os

# Terraform must never read a user's CLI config or phone home from tests.
os.environ["CHECKPOINT_DISABLE"] = "1"
# JAX: CPU only, quiet.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Nothing in the tests may reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

# The dataset and model caches of this run (workers read pinned copies from them): never the user's home,
# and fresh for every run, so no test passes on a copy a previous run left behind.
_caches = __import__("tempfile").mkdtemp(prefix="actfleet-test-caches-")
os.environ.setdefault("ACTFLEET_DATA_CACHE", os.path.join(_caches, "data"))
os.environ.setdefault("ACTFLEET_MODEL_CACHE", os.path.join(_caches, "models"))


# ---------------------------------------------------------------------------------------------------
# fleet.toml for tests: one writer (every test that needs a config file on disk uses it)
# ---------------------------------------------------------------------------------------------------

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (str, Path)):
        return json.dumps(str(v))  # a TOML basic string is a JSON string for what tests write
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"no TOML for {v!r}")


def write_fleet_toml(
    path: Path,
    *,
    id: str = "acts",
    zones: dict | None = None,
    state: Path | str | None = None,
    commit: str = "0123456789abcdef" * 2 + "01234567",
    bucket: str | None = None,
    fleet: dict | None = None,
    job: dict | None = None,
    reconcile: dict | None = None,
) -> Path:
    """A complete, valid fleet.toml: project "fake-project" in us-central1, the given zones, a pinned commit,
    local state under `state`, and a [job]; `fleet`, `job` and `reconcile` add or override keys."""
    tables = {
        "fleet": {
            "id": id,
            "project": "fake-project",
            "region": "us-central1",
            "zones": zones or {"us-central1-a": 1},
            **(fleet or {}),
        },
        "repo": {"url": "https://github.com/example/actfleet.git", "commit": commit},
        "storage": {"bucket": bucket or f"fake-project-{id}"},
        "state": {"path": str(state)} if state is not None else {},
        "job": {
            "model": "Qwen/Qwen2.5-0.5B",
            "input": f"gs://fake-project-{id}/data.jsonl",
            "layers": [6],
            **(job or {}),
        },
        "reconcile": reconcile or {},
    }
    path.write_text(
        "".join(
            f"[{name}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in keys.items())
            for name, keys in tables.items()
            if keys
        )
    )
    return path


@pytest.fixture
def fleet_toml(tmp_path):
    """write_fleet_toml into this test's directory: `fleet_toml(zones=..., job=...)` -> the file's path."""
    return lambda name="fleet.toml", **kw: write_fleet_toml(tmp_path / name, **{"state": tmp_path / "state", **kw})
