"""The cdktf app: two stacks, `base` (data: bucket, service account, IAM) and `fleet` (the TPU workers).

They are separate so that reconcile, which applies only `fleet`, can never touch the data (docs/infrastructure.md).

    app = build_app(config, outdir)   # both stacks under outdir/stacks/{base,fleet}/cdk.tf.json
    app.synth()

Importing this module loads the jsii runtime and the provider bindings (15-25 s): everything that can
avoid it goes through infra/synth_cache.py instead, which only imports this on a cache miss.

Fleet modes (docs/infrastructure.md):
- "queued": `terraform_data.workers` with for_each over {worker name: TPU API request}; create- and
  destroy-time local-exec provisioners run `actfleet tpu create-qr / delete-qr`. No provider needed.
- "vm": `google_tpu_v2_vm.workers` (google-beta) with for_each over the same names.
- "gce": `google_compute_instance.workers` (plain google provider) with for_each over the same names: TPU VMs
  as Compute Engine instances (the TPU machine type of actfleet/accelerators.py), spot with STOP on preemption.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

from actfleet.quiet import quiet_cdktf_bindings

# jsii prints a banner about the Node.js version on every start; the pinned toolchain is deliberate.
os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "18,20")
os.environ.setdefault("JSII_SILENCE_WARNING_DEPRECATED_NODE_VERSION", "1")
os.environ.setdefault("JSII_SILENCE_WARNING_UNTESTED_NODE_VERSION", "1")

from cdktf import (  # noqa: E402
    App,
    DataResource,
    GcsBackend,
    LocalBackend,
    LocalExecProvisioner,
    TerraformIterator,
    TerraformLocal,
    TerraformOutput,
    TerraformStack,
    TerraformVariable,
    Token,
)
from constructs import Construct  # noqa: E402

from actfleet.config import Config, Worker
from actfleet.infra import gce_instance
from actfleet.infra.bucket_access import worker_grants
from actfleet.infra.qr_request import SCOPES, queued_resource_request, worker_labels
from actfleet.infra.release_id import release_id
from actfleet.infra.startup_script import config_object_name, startup_script, worker_metadata, worker_unit
from actfleet.infra.synth_inputs import actfleet_command
from actfleet.infra.terraform_layout import BASE, FLEET, WORKERS, gcs_backend_prefix, local_state_file
from actfleet.infra.terraform_layout import state_dir as default_state_dir

# typeguard 4 (the saelens extra's) warns ~20 times a synth that it cannot check jsii's protocols: dropped
# before any binding is called (their argument checks are what warns).
quiet_cdktf_bindings()

# The worker's service account: conditional grants on the bucket only (infra/bucket_access.py), and these two,
# the only project-level grants (a VM cannot write its own logs and metrics otherwise).
PROJECT_ROLES = ("roles/logging.logWriter", "roles/monitoring.metricWriter")


def tf_literal(text: str) -> str:
    """Escape Terraform template syntax so `text` reaches the resource verbatim (bash uses ${...} too)."""
    return text.replace("${", "$${").replace("%{", "%%{")


def tf_text(text: str) -> str:
    """A multi-line text (script, unit, config file) as a Terraform expression that yields it verbatim.

    base64 keeps the synthesized JSON free of template syntax and of raw newlines, which the cdktf HCL
    export (`cdktf synth --hcl`, the exit path off cdktf) cannot quote; plan still shows the decoded text."""
    return '${base64decode("' + base64.b64encode(text.encode()).decode() + '")}'


def tf_literal_tree(value):
    if isinstance(value, str):
        return tf_literal(value)
    if isinstance(value, dict):
        return {k: tf_literal_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [tf_literal_tree(v) for v in value]
    return value


def configure_backend(stack: TerraformStack, config: Config, name: str, state_dir: Path) -> None:
    """Local state under `state.path` by default (tests run offline); GCS with its object lock when asked."""
    if config.state.backend == "gcs":
        GcsBackend(stack, bucket=config.state.bucket, prefix=gcs_backend_prefix(config, name))
    else:
        LocalBackend(stack, path=str(local_state_file(state_dir, name)))


class BaseStack(TerraformStack):
    """The activations bucket, the worker service account and its narrowly scoped IAM. No keys."""

    def __init__(self, scope: Construct, config: Config, state_dir: Path, config_text: str | None):
        super().__init__(scope, BASE)
        from cdktf_cdktf_provider_google.project_iam_member import ProjectIamMember
        from cdktf_cdktf_provider_google.provider import GoogleProvider
        from cdktf_cdktf_provider_google.service_account import ServiceAccount
        from cdktf_cdktf_provider_google.storage_bucket import (
            StorageBucket,
            StorageBucketSoftDeletePolicy,
            StorageBucketVersioning,
        )
        from cdktf_cdktf_provider_google.storage_bucket_iam_member import (
            StorageBucketIamMember,
            StorageBucketIamMemberCondition,
        )
        from cdktf_cdktf_provider_google.storage_bucket_object import StorageBucketObject

        fleet, storage = config.fleet, config.storage
        grants = worker_grants(config)  # first: a config whose job prefix would hold fleet.toml fails before synth
        configure_backend(self, config, BASE, state_dir)
        # Operators authenticate with application default credentials; no credentials in the stack.
        GoogleProvider(self, "google", project=fleet.project, region=fleet.region)

        bucket = StorageBucket(
            self,
            "activations",
            name=storage.bucket,
            location=storage.location,
            uniform_bucket_level_access=True,
            public_access_prevention="enforced",
            # Activations are reproducible and large: no versions, and soft delete only as configured.
            versioning=StorageBucketVersioning(enabled=False),
            soft_delete_policy=StorageBucketSoftDeletePolicy(
                retention_duration_seconds=storage.soft_delete_days * 86400
            ),
            force_destroy=storage.force_destroy,
            labels=fleet.labels,
        )
        account = ServiceAccount(
            self,
            "worker",
            account_id=fleet.service_account,
            display_name=f"actfleet workers of fleet {fleet.id}",
            description="Attached to actfleet TPU VMs; no keys are ever created for it.",
        )
        member = f"serviceAccount:{account.email}"
        for grant in grants:
            StorageBucketIamMember(
                self,
                f"worker-{grant.name}",
                bucket=bucket.name,
                role=grant.role,
                member=member,
                condition=StorageBucketIamMemberCondition(
                    title=grant.title, description=grant.description, expression=tf_literal(grant.expression)
                ),
            )
        for role in PROJECT_ROLES:
            ProjectIamMember(
                self,
                f"worker-{role.split('/')[1].replace('.', '-').lower()}",
                project=fleet.project,
                role=role,
                member=member,
            )
        if config_text is not None:
            # Workers read the fleet config from here at boot (metadata `actfleet-config` points at it).
            StorageBucketObject(
                self,
                "fleet-config",
                bucket=bucket.name,
                name=config_object_name(config),
                content=tf_text(config_text),
                content_type="application/toml",
            )
        TerraformOutput(self, "bucket", value=bucket.name)
        TerraformOutput(self, "service_account_email", value=account.email)


class FleetStack(TerraformStack):
    """One TPU worker per desired name, one resource block with for_each over a map (docs/infrastructure.md)."""

    def __init__(self, scope: Construct, config: Config, state_dir: Path, actfleet_command: str):
        super().__init__(scope, FLEET)
        configure_backend(self, config, FLEET, state_dir)
        # One copy of the bootstrap files for the whole fleet; each worker's metadata refers to it, so the
        # synthesized JSON grows by a few hundred bytes per worker, not by the script's size.
        TerraformLocal(self, "startup_script", tf_text(startup_script()))
        TerraformLocal(self, "worker_unit", tf_text(worker_unit()))
        refs = {"script": "${local.startup_script}", "unit": "${local.worker_unit}"}
        if config.fleet.mode == "queued":
            self._queued(config, refs, actfleet_command)
        elif config.fleet.mode == "gce":
            self._gce(config, refs)
        else:
            self._vm(config, refs)

    def _queued(self, config: Config, refs: dict[str, str], actfleet: str) -> None:
        fleet = config.fleet
        release = release_id(config)
        workers = {
            w.name: {
                # project/zone/id/endpoint live in `input` because destroy provisioners may only use self.
                "project": fleet.project,
                "zone": w.zone,
                "id": w.name,
                "endpoint": fleet.endpoint(),
                "request": _escaped_request(config, w, refs, release),
            }
            for w in fleet.workers
        }
        workers_map = TerraformLocal(self, "worker_requests", workers)
        each = TerraformIterator.from_map(workers_map.as_any_map)
        # The request travels as JSON in an environment variable that `create-qr` reads (ACTFLEET_TPU_REQUEST
        # is its --request-json): no shell quoting of user values, and no quotes for the HCL export to mangle.
        endpoint = {"ACTFLEET_TPU_ENDPOINT": "${self.input.endpoint}"}
        request = {**endpoint, "ACTFLEET_TPU_REQUEST": "${jsonencode(self.input.request)}"}
        where = "--project ${self.input.project} --zone ${self.input.zone} --id ${self.input.id}"
        # Rolling replacement (infra/rollout.py): a worker is replaced when its trigger changes, and its
        # trigger is the release it runs. reconcile passes `holds` (worker -> the trigger Terraform's state
        # holds) for every worker it does not move this pass, so an apply after a config change replaces
        # only the current wave; a worker not held (new, moved, or any apply without holds) gets this release.
        TerraformVariable(
            self,
            "holds",
            type="any",
            default={},
            description="worker name -> the triggers_replace value to keep (reconcile's rollout)",
        )
        resource = DataResource(
            self,
            WORKERS,
            for_each=each,
            input=Token.as_any_map(each.value),
            # A changed request cannot be applied to a live queued resource: replace the worker, wave by wave.
            # (A held worker's `input` is updated in place: no provisioner runs, the cloud keeps what it has.)
            triggers_replace=Token.as_any_map('${try(var.holds[each.key], {release = "' + release + '"})}'),
            provisioners=[
                LocalExecProvisioner(
                    type="local-exec", environment=request, command=f"{actfleet} tpu create-qr {where}"
                ),
                # --no-wait: the delete is asked for and the apply goes on; the next pass's observation
                # confirms it is gone (a 1,000-worker roll must not wait ~1,000 deletes out in the apply).
                LocalExecProvisioner(
                    type="local-exec",
                    when="destroy",
                    environment=endpoint,
                    command=f"{actfleet} tpu delete-qr {where} --no-wait",
                ),
            ],
        )
        resource.override_logical_id(WORKERS)

    def _vm(self, config: Config, refs: dict[str, str]) -> None:
        from cdktf_cdktf_provider_google_beta.google_tpu_v2_vm import (
            GoogleTpuV2Vm,
            GoogleTpuV2VmNetworkConfig,
            GoogleTpuV2VmSchedulingConfig,
            GoogleTpuV2VmServiceAccount,
        )
        from cdktf_cdktf_provider_google_beta.provider import GoogleBetaProvider

        fleet = config.fleet
        GoogleBetaProvider(self, "google-beta", project=fleet.project, region=fleet.region)
        workers = {
            w.name: {
                "zone": w.zone,
                "metadata": tf_literal_tree(worker_metadata(config, w, script="", unit=""))
                | {"startup-script": refs["script"], "actfleet-unit": refs["unit"]},
                "labels": worker_labels(config, w),
            }
            for w in fleet.workers
        }
        workers_map = TerraformLocal(self, "worker_specs", workers)
        each = TerraformIterator.from_map(workers_map.as_any_map)
        vm = GoogleTpuV2Vm(
            self,
            WORKERS,
            for_each=each,
            name=each.key,
            zone=each.get_string("zone"),
            accelerator_type=fleet.accelerator_type,
            runtime_version=fleet.runtime_version,
            scheduling_config=GoogleTpuV2VmSchedulingConfig(spot=fleet.spot),
            service_account=GoogleTpuV2VmServiceAccount(email=fleet.service_account_email, scope=list(SCOPES)),
            network_config=GoogleTpuV2VmNetworkConfig(
                network=fleet.network, subnetwork=fleet.subnetwork or None, enable_external_ips=fleet.external_ips
            ),
            metadata=each.get_map("metadata"),
            labels=each.get_map("labels"),
            description=f"actfleet worker of fleet {fleet.id}",
        )
        vm.override_logical_id(WORKERS)

    def _gce(self, config: Config, refs: dict[str, str]) -> None:
        from cdktf_cdktf_provider_google.compute_instance import (
            ComputeInstance,
            ComputeInstanceBootDisk,
            ComputeInstanceBootDiskInitializeParams,
            ComputeInstanceNetworkInterface,
            ComputeInstanceScheduling,
            ComputeInstanceServiceAccount,
        )
        from cdktf_cdktf_provider_google.provider import GoogleProvider

        gce_instance.check(config)
        fleet = config.fleet
        endpoint = gce_instance.compute_custom_endpoint(config)
        # The provider's own endpoint override (tests point it at a loopback fake); empty means Google's.
        GoogleProvider(
            self, "google", project=fleet.project, region=fleet.region, compute_custom_endpoint=endpoint or None
        )
        workers = {}
        for w in fleet.workers:
            spec = tf_literal_tree(gce_instance.worker_spec(config, w))
            spec["metadata"] |= {"startup-script": refs["script"], "actfleet-unit": refs["unit"]}
            workers[w.name] = spec
        TerraformLocal(self, "worker_specs", workers)
        # Rolling replacement (infra/rollout.py), as in queued mode: reconcile passes `holds` (worker -> the spec
        # Terraform's state holds) for every worker it does not move this pass, so those keep what they run
        # and only the current wave (its workers -replace'd) gets the new spec. Without holds: every worker.
        holds_doc = "worker name -> the spec (zone, machine_type, metadata, labels, disk_labels) to keep"
        TerraformVariable(self, "holds", type="any", default={}, description=holds_doc)
        held = TerraformLocal(
            self, "worker_specs_held", "${{ for k, v in local.worker_specs : k => try(var.holds[k], v) }}"
        )
        each = TerraformIterator.from_map(held.as_any_map)
        spot = gce_instance.scheduling(config)
        instance = ComputeInstance(
            self,
            WORKERS,
            for_each=each,
            name=each.key,
            zone=each.get_string("zone"),
            machine_type=each.get_string("machine_type"),
            description=f"actfleet worker of fleet {fleet.id}",
            boot_disk=ComputeInstanceBootDisk(
                auto_delete=True,
                initialize_params=ComputeInstanceBootDiskInitializeParams(
                    image=fleet.boot_image,
                    # The release rides on the boot disk's labels as well, which the provider cannot change in
                    # place (ForceNew): a new release replaces a worker, never edits a running one's metadata.
                    labels=each.get_map("disk_labels"),
                ),
            ),
            # No access_config block: no external IP (issue "1,000-worker fleet"); Private Google Access reaches
            # the bucket. external_ips = true adds one ephemeral access config.
            network_interface=[
                ComputeInstanceNetworkInterface(
                    network=fleet.network,
                    subnetwork=fleet.subnetwork or None,
                    access_config=[{}] if fleet.external_ips else None,
                )
            ],
            scheduling=ComputeInstanceScheduling(**spot),
            service_account=ComputeInstanceServiceAccount(
                email=fleet.service_account_email, scopes=list(gce_instance.SCOPES)
            ),
            metadata=each.get_map("metadata"),
            labels=each.get_map("labels"),
        )
        instance.override_logical_id(WORKERS)


def _escaped_request(config: Config, worker: Worker, refs: dict[str, str], release: str) -> dict:
    request = tf_literal_tree(queued_resource_request(config, worker, script="", unit="", release=release))
    metadata = request["tpu"]["nodeSpec"][0]["node"]["metadata"]
    metadata["startup-script"], metadata["actfleet-unit"] = refs["script"], refs["unit"]
    return request


def build_app(
    config: Config,
    outdir: str | Path | None = None,
    *,
    state_dir: Path | None = None,
    config_text: str | None = None,
    actfleet: str | None = None,
) -> App:
    """Both stacks in one app. `outdir=None` lets the cdktf CLI choose (cdktf.json / main.py)."""
    state_dir = Path(state_dir) if state_dir is not None else default_state_dir(config)
    app = App(outdir=str(outdir)) if outdir is not None else App()
    BaseStack(app, config, state_dir, config_text)
    FleetStack(app, config, state_dir, actfleet or actfleet_command())
    return app
