"""What one gce-mode worker is: the Compute Engine instance a `google_compute_instance` creates (mode "gce").

    worker_spec(config, worker)      {"zone", "machine_type", "metadata", "labels", "disk_labels"}: per worker,
                                     what the fleet stack's for_each map holds (and a rollout can hold)
    scheduling(config)               the `scheduling` block: spot (SPOT, STOP on preemption) or standard
    release_request(config, worker)  everything a worker is created with, for infra/release_id.py's hash
    compute_custom_endpoint(config)  the provider's `compute_custom_endpoint` ("" = Google's)

Stdlib only (the stack, release_id and tests import it without cdktf). docs/infrastructure.md "Fleet modes".

Preemption: STOP, not DELETE. A preempted spot instance then stays, TERMINATED, until reconcile replaces it:
reconcile sees a preemption (not a worker gone missing) and counts it for backoff and the circuit breaker,
the boot disk stays for a post-mortem, and Terraform's state keeps naming a real instance, so the repair is
one `-replace` (1 delete + 1 insert). DELETE would make the instance vanish: the next pass could not tell
a preemption from a deletion, and Terraform's refresh would drop it from state (the repair is then 1 insert,
with the cause lost). STOP's cost: a stopped instance's boot disk is billed until that pass replaces it.
"""

from __future__ import annotations

from actfleet import accelerators
from actfleet.config import Config, Worker
from actfleet.errors import ConfigError
from actfleet.infra.qr_request import worker_labels
from actfleet.infra.release_id import RELEASE_LABEL
from actfleet.infra.startup_script import worker_metadata

# Least privilege on the VM's token: the worker reads and writes the bucket, and the guest agent writes logs
# and metrics; IAM (infra/bucket_access.py) narrows storage further to the job's prefixes.
SCOPES = (
    "https://www.googleapis.com/auth/devstorage.read_write",
    "https://www.googleapis.com/auth/logging.write",
    "https://www.googleapis.com/auth/monitoring.write",
)

PREEMPTION_ACTION = "STOP"


def check(config: Config) -> None:
    """What a gce fleet needs beyond what loading the config checks (exit 2, naming the key)."""
    if not config.fleet.boot_image:
        raise ConfigError(
            f'{config.source}: fleet.boot_image = "": required when fleet.mode = "gce" (the TPU VM image the '
            f"instances boot: Compute Engine's create-tpu-vm-instance page names it; actfleet does not guess one)"
        )


def machine_type(config: Config) -> str:
    """The Compute Engine machine type of the fleet's accelerator type (actfleet/accelerators.py)."""
    return accelerators.machine_type(config.fleet.accelerator_type)


def scheduling(config: Config) -> dict:
    """The `scheduling` block. A spot VM is not live-migrated nor restarted by Compute Engine (and a TPU spot VM
    "must be recreated after preemption", tpu/docs/spot): on_host_maintenance TERMINATE, automatic_restart
    false. Whether Compute Engine takes STOP as the termination action of a TPU machine type is for a real
    project to confirm (docs/infrastructure.md)."""
    if config.fleet.spot:
        return {
            "provisioning_model": "SPOT",
            "preemptible": True,
            "automatic_restart": False,
            "on_host_maintenance": "TERMINATE",
            "instance_termination_action": PREEMPTION_ACTION,
        }
    return {"provisioning_model": "STANDARD", "on_host_maintenance": "TERMINATE"}


def worker_spec(config: Config, worker: Worker, release: str | None = None) -> dict:
    """Per worker, what may differ between releases (the rest is fleet-wide). The startup script and unit are
    left empty: the stack refers to one shared copy of each (infra/stacks.py)."""
    from actfleet.infra.release_id import release_id

    release = release_id(config) if release is None else release
    tag = {RELEASE_LABEL: release} if release else {}
    return {
        "zone": worker.zone,
        "machine_type": machine_type(config),
        "metadata": worker_metadata(config, worker, script="", unit=""),
        "labels": worker_labels(config, worker) | tag,
        "disk_labels": dict(config.fleet.labels) | tag,
    }


def release_request(config: Config, worker: Worker) -> dict:
    """Everything a worker is created with, the startup script and unit included, without its release."""
    fleet = config.fleet
    spec = worker_spec(config, worker, release="")
    spec["metadata"] = worker_metadata(config, worker)
    return {
        **spec,
        "image": fleet.boot_image,
        "scheduling": scheduling(config),
        "service_account": {"email": fleet.service_account_email, "scopes": list(SCOPES)},
        "network": {"network": fleet.network, "subnetwork": fleet.subnetwork, "external_ips": fleet.external_ips},
    }


def compute_custom_endpoint(config: Config) -> str:
    """The Compute API base the provider calls: Terraform's google provider takes the full base path
    (default https://compute.googleapis.com/compute/v1/); actfleet's compute endpoint is the host part."""
    endpoint = config.fleet.compute_endpoint_url()
    return f"{endpoint.rstrip('/')}/compute/v1/" if endpoint else ""
