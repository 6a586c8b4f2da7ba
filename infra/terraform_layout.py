"""Where Terraform keeps a fleet's things: the stack names, the worker resource addresses, the state locations.

The one definition of each, for the code that builds the stacks (infra/stacks.py), runs terraform on them
(infra/terraform.py), reads their state without terraform (infra/reconcile.py) and the commands:

    STACK_NAMES                                   ("base", "fleet")
    worker_address("tpu-us-central1-a-3")         'terraform_data.workers["tpu-us-central1-a-3"]'
    worker_address(name, "vm")                    'google_tpu_v2_vm.workers["..."]'
    worker_address(name, "gce")                   'google_compute_instance.workers["..."]'
    state_location(cfg, FLEET)                    '/abs/.actfleet/state/fleet.tfstate'
                                                  or 'gs://<state.bucket>/<state.prefix>/fleet/default.tfstate'

Stdlib only: reconcile and `actfleet status` import it without paying for cdktf or terraform.
"""

from __future__ import annotations

from pathlib import Path

from actfleet.config import Config

BASE, FLEET = "base", "fleet"
STACK_NAMES = (BASE, FLEET)

# The worker resource block of the fleet stack: one for_each over {worker name: spec}, its logical id
# WORKERS, its type by fleet mode (docs/infrastructure.md "Fleet modes").
WORKERS = "workers"
WORKER_RESOURCE_TYPES = {"queued": "terraform_data", "vm": "google_tpu_v2_vm", "gce": "google_compute_instance"}


def workers_resource(mode: str = "queued") -> str:
    """The worker resource block: terraform_data.workers (queued), google_tpu_v2_vm.workers (vm) or
    google_compute_instance.workers (gce)."""
    return f"{WORKER_RESOURCE_TYPES[mode]}.{WORKERS}"


def worker_address(name: str, mode: str = "queued") -> str:
    """One worker's address, for -replace/-target: terraform_data.workers["tpu-us-central1-a-3"]."""
    return f'{workers_resource(mode)}["{name}"]'


def held_gce_spec(attributes: dict) -> dict | None:
    """A gce worker's spec as its state holds it (the stack's `worker_specs` shape, infra/gce_instance.py), the
    value a rollout holds it at; None when the state lacks a part (then nothing is held: it gets the new spec)."""
    try:
        disk = attributes["boot_disk"][0]["initialize_params"][0]
        spec = {k: attributes[k] for k in ("zone", "machine_type", "metadata", "labels")}
        spec["disk_labels"] = disk["labels"]
    except (KeyError, IndexError, TypeError):
        return None
    return spec if all(v is not None for v in spec.values()) else None


# -- state ---------------------------------------------------------------------------------------------


def state_dir(config: Config) -> Path:
    """Where local state lives (state.path, resolved): outside the synth cache, whose entries come and go."""
    return Path(config.state.path).resolve()


def local_state_file(state_dir: Path, stack: str) -> Path:
    """The local backend's state file of `stack`: <state dir>/fleet.tfstate."""
    return Path(state_dir) / f"{stack}.tfstate"


def gcs_backend_prefix(config: Config, stack: str) -> str:
    """The GCS backend's prefix of `stack`, as the stack is synthesized: <state.prefix>/fleet."""
    return f"{config.state.prefix}/{stack}"


def gcs_state_root(config: Config) -> str:
    """gs://<state.bucket>/<state.prefix>: the stacks' states live below it (and, by default, the reconcile lock)."""
    return f"gs://{config.state.bucket}/{config.state.prefix.strip('/')}"


def state_location(config: Config, stack: str) -> str:
    """The state document of `stack` (default workspace): a local path, or the gs:// URL of its object."""
    if config.state.backend == "gcs":
        return f"{gcs_state_root(config)}/{stack}/default.tfstate"
    return str(local_state_file(state_dir(config), stack))
