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
