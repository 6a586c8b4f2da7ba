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
