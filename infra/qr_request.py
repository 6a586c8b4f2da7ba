"""The complete TPU v2 queued-resource request for one worker (the REST JSON body of a QueuedResource).

This is what `actfleet tpu create-qr` sends and what the fleet stack's `terraform_data.workers[...]` carries
as its `input`, so `terraform plan` shows reviewers every field a worker is created with: spot, the node
spec (accelerator type, runtime version, network, service account and scopes, labels) and the metadata
holding the startup script. The provider's own google_tpu_v2_queued_resource cannot express most of these
(docs/infrastructure.md, "The provider gap").
"""

from __future__ import annotations

from actfleet.config import Config, Worker
from actfleet.infra.startup_script import worker_metadata

# The worker needs Cloud Storage and Logging/Monitoring; IAM on the service account narrows what it may do.
SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)


def worker_labels(config: Config, worker: Worker) -> dict[str, str]:
    """The fleet's labels plus the worker's name: reconcile finds its resources (and orphans) by these."""
    return {**config.fleet.labels, "actfleet-worker": worker.name}


def node_spec(config: Config, worker: Worker, metadata: dict[str, str], release: str = "") -> dict:
    fleet = config.fleet
    # No external IP unless asked: the VM boots from the bucket and needs only Google APIs (Private Google
    # Access on the subnet); an org policy forbidding external IPs, or a VPC without a route out, still works.
    network = {"network": fleet.network, "enableExternalIps": fleet.external_ips}
    if fleet.subnetwork:
        network["subnetwork"] = fleet.subnetwork
    return {
        "parent": f"projects/{fleet.project}/locations/{worker.zone}",
        "nodeId": worker.name,
        "node": {
            "acceleratorType": fleet.accelerator_type,
            "runtimeVersion": fleet.runtime_version,
            "networkConfig": network,
            "serviceAccount": {"email": fleet.service_account_email, "scope": list(SCOPES)},
            "metadata": metadata,
            # The release label (infra/release_id.py) says which release the worker runs: reconcile rolls by it.
            "labels": worker_labels(config, worker) | ({"actfleet-release": release} if release else {}),
            "description": f"actfleet worker {worker.name} of fleet {fleet.id}",
        },
    }


def queued_resource_request(
    config: Config,
    worker: Worker,
    *,
    script: str | None = None,
    unit: str | None = None,
    release: str | None = None,
) -> dict:
    """The QueuedResource body for `worker` (its id is the worker name, passed separately to the API).
    `release`: the label value (None: this config's release_id; "": no label, as release_id hashes it)."""
    if release is None:
        from actfleet.infra.release_id import release_id

        release = release_id(config)
    metadata = worker_metadata(config, worker, script=script, unit=unit)
    request: dict = {"tpu": {"nodeSpec": [node_spec(config, worker, metadata, release)]}}
    if config.fleet.spot:
        request["spot"] = {}  # spot capacity: cheap, preemptible, never restarted (reconcile replaces it)
    # spot = false sends no tier at all: on-demand. (`guaranteed` is the reserved tier, which needs a
    # reservation; `guaranteed: {}` is not "on-demand".)
    return request
