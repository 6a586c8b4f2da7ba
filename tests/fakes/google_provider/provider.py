"""A STAND-IN for Terraform's hashicorp/google provider, for tests only: `google_compute_instance` and nothing else.

The real provider cannot be downloaded here (no registry access), so the gce-mode tests run the real
`terraform` binary against this tfplugin6 provider (written with the `tf` framework, PyPI `tf` 1.2.0). It
declares the subset of the real google 6.50.0 schema that actfleet synthesizes, with the real names, types,
block nesting (lists of at most one item) and ForceNew flags, plus the computed attributes reconcile and the
tests read (id, self_link, instance_id, current_status). Every operation goes through google-cloud-compute
against the fake Compute Engine API (tests/fakes/compute_server.py) at the provider's `compute_custom_endpoint`,
waiting for the long-running operations like the real provider does; Read answers "gone" on a 404, so an
instance deleted behind Terraform's back leaves the state on refresh. It refuses to run without a custom
endpoint: it never talks to Google. What it does not model: every other attribute and resource, the real
provider's diff suppression and defaults, in-place updates other than metadata, labels and machine type.

Run by terraform through tests/fakes/google_provider/install.py's filesystem mirror.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

from tf import provider as tf_provider
from tf import runner
from tf.gen import tfplugin_pb2 as pb
from tf.iface import CreateContext, DeleteContext, Provider, ReadContext, Resource, UpdateContext
from tf.schema import Attribute, Block, NestedBlock, NestMode, Schema
from tf.types import Bool, Map, Number, Set, String, Unknown
from tf.utils import Diagnostics, _to_attribute_path

VERSION = "6.50.0"
OPERATION_TIMEOUT_S = 600


class ListBlock(NestedBlock):
    """A block nested as a list (the SDKv2 providers' TypeList of a Resource): the `tf` framework ships only
    set and single nesting."""

    def __init__(self, type_name: str, block: Block, *, min_items: int = 0, max_items: int = 0, force_new=False):
        super().__init__(type_name, NestMode.Set, block, min_items=min_items or None, max_items=max_items or None)
        self.force_new = force_new

    def to_pb(self) -> pb.Schema.NestedBlock:
        out = super().to_pb()
        out.nesting = pb.Schema.NestedBlock.NestingMode.LIST
        return out

    def encode(self, value: Any) -> Any:
        if value in (None, Unknown):
            return value
        return [tf_provider._encode_state_d(self._amap(), self._bmap(), v, None) for v in value]

    def decode(self, value: Any) -> Any:
        if value in (None, Unknown):
            return value
        return [tf_provider._decode_state(Diagnostics(), self._amap(), self._bmap(), v)[1] for v in value]

    def semantically_equal(self, a_decoded, b_decoded) -> bool:
        return a_decoded == b_decoded


def _s(name, **kw):
    return Attribute(name, String(), **kw)


INSTANCE_SCHEMA = Schema(
    version=6,  # the real resource's SchemaVersion
    attributes=[
        _s("name", required=True, requires_replace=True),
        _s("machine_type", required=True),
        _s("zone", optional=True, computed=True, requires_replace=True),
        _s("project", optional=True, computed=True, requires_replace=True),
        _s("description", optional=True, requires_replace=True),
        Attribute("metadata", Map(String()), optional=True),
        Attribute("labels", Map(String()), optional=True),
        Attribute("allow_stopping_for_update", Bool(), optional=True),
        Attribute("deletion_protection", Bool(), optional=True),
        _s("id", computed=True),
        _s("self_link", computed=True),
        _s("instance_id", computed=True),
        _s("current_status", computed=True),
    ],
    block_types=[
        ListBlock(
            "boot_disk",
            Block(
                attributes=[Attribute("auto_delete", Bool(), optional=True)],
                block_types=[
                    ListBlock(
                        "initialize_params",
                        Block(
                            attributes=[
                                _s("image", optional=True),
                                Attribute("size", Number(), optional=True),
                                Attribute("labels", Map(String()), optional=True),
                            ]
                        ),
                        max_items=1,
                    )
                ],
            ),
            min_items=1,
            max_items=1,
            force_new=True,
        ),
        ListBlock(
            "network_interface",
            Block(
                attributes=[_s("network", optional=True), _s("subnetwork", optional=True)],
                block_types=[
                    ListBlock(
                        "access_config",
                        Block(attributes=[_s("nat_ip", optional=True), _s("network_tier", optional=True)]),
                    )
                ],
            ),
            min_items=1,
            force_new=True,
        ),
        ListBlock(
            "scheduling",
            Block(
                attributes=[
                    _s("provisioning_model", optional=True),
                    Attribute("preemptible", Bool(), optional=True),
                    Attribute("automatic_restart", Bool(), optional=True),
                    _s("on_host_maintenance", optional=True),
                    _s("instance_termination_action", optional=True),
                ]
            ),
            max_items=1,
        ),
        ListBlock(
            "service_account",
            Block(attributes=[_s("email", optional=True), Attribute("scopes", Set(String()), required=True)]),
            max_items=1,
        ),
    ],
)

PROVIDER_SCHEMA = Schema(
    attributes=[
        _s("project", optional=True),
        _s("region", optional=True),
        _s("zone", optional=True),
        _s("compute_custom_endpoint", optional=True),
    ]
)

# Blocks whose change the real provider cannot apply in place (ForceNew): reported as requires_replace.
FORCE_NEW_BLOCKS = [b.type_name for b in INSTANCE_SCHEMA.block_types if getattr(b, "force_new", False)]
FORCE_NEW_SCHEDULING = ("provisioning_model", "preemptible")


class Servicer(tf_provider.ProviderServicer):
    """The framework's servicer, plus requires_replace for ForceNew blocks (it checks top-level attributes)."""

    def PlanResourceChange(self, request, context):
        response = super().PlanResourceChange(request, context)
        prior = tf_provider.read_dynamic_value(request.prior_state)
        proposed = tf_provider.read_dynamic_value(request.proposed_new_state)
        if prior and proposed:
            for name in FORCE_NEW_BLOCKS:
                if prior.get(name) != proposed.get(name):
                    response.requires_replace.append(_to_attribute_path([name]))
            # In `scheduling` only these two are ForceNew (the others update in place, stopping the VM).
            before, after = (_first(x.get("scheduling")) for x in (prior, proposed))
            if any(before.get(k) != after.get(k) for k in FORCE_NEW_SCHEDULING):
                response.requires_replace.append(_to_attribute_path(["scheduling"]))
        return response


def _first(blocks) -> dict:
    return blocks[0] if blocks else {}


class GoogleStandIn(Provider):
    def __init__(self):
        self.config: dict = {}
        self._clients = None

    def get_model_prefix(self) -> str:
        return "google_"

    def full_name(self) -> str:
        return "registry.terraform.io/hashicorp/google"

    def get_provider_schema(self, diags: Diagnostics) -> Schema:
        return PROVIDER_SCHEMA

    def validate_config(self, diags: Diagnostics, config: dict):
        pass

    def configure_provider(self, diags: Diagnostics, config: dict):
        self.config = config
        if not config.get("compute_custom_endpoint"):
            diags.add_error(
                "the google provider stand-in needs compute_custom_endpoint",
                "it is a test double that only talks to a loopback fake Compute Engine API",
            )

    def get_data_sources(self):
        return []

    def get_resources(self):
        return [ComputeInstance]

    def clients(self):
        """(instances, zone operations) clients of google-cloud-compute at the configured endpoint."""
        if self._clients is None:
            from google.api_core.client_options import ClientOptions
            from google.auth.credentials import AnonymousCredentials
            from google.cloud import compute_v1

            base = self.config["compute_custom_endpoint"].rstrip("/")
            host = base.removesuffix("/compute/v1")
            kw = {"transport": "rest", "client_options": ClientOptions(api_endpoint=host)}
            kw["credentials"] = AnonymousCredentials()
            self._clients = (compute_v1.InstancesClient(**kw), compute_v1.ZoneOperationsClient(**kw))
        return self._clients


class ComputeInstance(Resource):
    def __init__(self, provider: GoogleStandIn):
        self.provider = provider

    @classmethod
    def get_name(cls) -> str:
        return "compute_instance"

    @classmethod
    def get_schema(cls) -> Schema:
        return INSTANCE_SCHEMA

    # -- where ------------------------------------------------------------------------------------------

    def _where(self, state: dict) -> tuple[str, str]:
        project = state.get("project")
        project = project if isinstance(project, str) else self.provider.config.get("project")
        zone = state.get("zone")
        zone = zone if isinstance(zone, str) else self.provider.config.get("zone")
        return project, zone

    def _wait(self, ctx, what: str, op, project: str, zone: str) -> bool:
        """Wait for a zone operation with zoneOperations.wait at the configured endpoint, as the real provider
        waits on its operations (compute_v1's own futures would poll the default endpoint), and turn an
        error it ends in (ZONE_RESOURCE_POOL_EXHAUSTED, ...) into the diagnostic Terraform shows."""
        ops = self.provider.clients()[1]
        try:
            while op.status != op.Status.DONE:
                op = ops.wait(project=project, zone=zone, operation=op.name, timeout=OPERATION_TIMEOUT_S)
        except Exception as e:
            ctx.diagnostics.add_error(f"Error {what}: {e}")
            return False
        if op.error and op.error.errors:
            detail = "; ".join(f"{e.code}: {e.message}" for e in op.error.errors)
            ctx.diagnostics.add_error(f"Error {what}: {detail}")
            return False
        return True

    # -- lifecycle --------------------------------------------------------------------------------------

    def create(self, ctx: CreateContext, planned: dict) -> Optional[dict]:
        from google.cloud import compute_v1

        project, zone = self._where(planned)
        try:
            op = self.provider.clients()[0].insert_unary(
                project=project, zone=zone, instance_resource=_instance(compute_v1, planned, project, zone)
            )
        except Exception as e:
            ctx.diagnostics.add_error(f"Error creating instance: {e}")
            return None
        if not self._wait(ctx, "waiting for instance to create", op, project, zone):
            return None
        return self._refresh(ctx, planned | {"project": project, "zone": zone}, keep_config=True)

    def read(self, ctx: ReadContext, current: dict) -> Optional[dict]:
        return self._refresh(ctx, current, keep_config=False)

    def update(self, ctx: UpdateContext, current: dict, planned: dict) -> Optional[dict]:
        from google.cloud import compute_v1

        client = self.provider.clients()[0]
        project, zone = self._where(current)
        name = current["name"]
        for field in ("scheduling", "service_account", "deletion_protection"):
            if current.get(field) != planned.get(field):
                ctx.diagnostics.add_error(f"the google provider stand-in does not update {field} in place")
                return current
        if current.get("machine_type") != planned.get("machine_type"):
            if not planned.get("allow_stopping_for_update"):
                ctx.diagnostics.add_error(
                    "Changing the machine_type, min_cpu_platform, service_account, enable_display, "
                    "shielded_instance_config, scheduling.node_affinities or network_interface.[#d].(network/"
                    "subnetwork/subnetwork_project) or advanced_machine_features on a started instance "
                    "requires stopping it. To acknowledge this, please set allow_stopping_for_update = true "
                    "in your config."
                )
                return current
            request = compute_v1.InstancesSetMachineTypeRequest(
                machine_type=f"zones/{zone}/machineTypes/{planned['machine_type']}"
            )
            steps = [
                ("stopping instance", lambda: client.stop_unary(project=project, zone=zone, instance=name)),
                (
                    "setting machine type",
                    lambda: client.set_machine_type_unary(
                        project=project, zone=zone, instance=name, instances_set_machine_type_request_resource=request
                    ),
                ),
                ("starting instance", lambda: client.start_unary(project=project, zone=zone, instance=name)),
            ]
            for what, call in steps:
                if not self._wait(ctx, what, call(), project, zone):
                    return current
        if current.get("metadata") != planned.get("metadata"):
            live = client.get(project=project, zone=zone, instance=name)
            items = [compute_v1.Items(key=k, value=v) for k, v in sorted((planned.get("metadata") or {}).items())]
            body = compute_v1.Metadata(fingerprint=live.metadata.fingerprint, items=items)
            op = client.set_metadata_unary(project=project, zone=zone, instance=name, metadata_resource=body)
            if not self._wait(ctx, "updating metadata", op, project, zone):
                return current
        if current.get("labels") != planned.get("labels"):
            live = client.get(project=project, zone=zone, instance=name)
            body = compute_v1.InstancesSetLabelsRequest(
                label_fingerprint=live.label_fingerprint, labels=planned.get("labels") or {}
            )
            op = client.set_labels_unary(
                project=project, zone=zone, instance=name, instances_set_labels_request_resource=body
            )
            if not self._wait(ctx, "updating labels", op, project, zone):
                return current
        return self._refresh(ctx, planned, keep_config=True)

    def delete(self, ctx: DeleteContext, current: dict):
        from google.api_core.exceptions import NotFound

        project, zone = self._where(current)
        try:
            op = self.provider.clients()[0].delete_unary(project=project, zone=zone, instance=current["name"])
        except NotFound:
            return None
        except Exception as e:
            ctx.diagnostics.add_error(f"Error deleting instance: {e}")
            return None
        self._wait(ctx, "waiting for instance to delete", op, project, zone)
        return None

    def _refresh(self, ctx, state: dict, *, keep_config: bool) -> Optional[dict]:
        """The state from a GET. After a create or update the configured values stay as planned (Terraform
        checks that they do); a refresh takes metadata, labels, machine type and status from the API."""
        from google.api_core.exceptions import NotFound

        project, zone = self._where(state)
        try:
            live = self.provider.clients()[0].get(project=project, zone=zone, instance=state["name"])
        except NotFound:
            return None  # gone: Terraform drops it from state (the real provider's HandleNotFoundError)
        except Exception as e:
            ctx.diagnostics.add_error(f"Error reading instance {state['name']}: {e}")
            return state
        out = dict(state)
        out.update(
            project=project,
            zone=zone,
            id=f"projects/{project}/zones/{zone}/instances/{live.name}",
            self_link=live.self_link,
            instance_id=str(live.id),
            current_status=live.status,
        )
        if not keep_config:
            out["machine_type"] = live.machine_type.rsplit("/", 1)[-1]
            out["metadata"] = {i.key: i.value for i in live.metadata.items} or None
            out["labels"] = dict(live.labels) or None
        return out


def _instance(compute_v1, s: dict, project: str, zone: str):
    """The Instance body, as the real provider's expandComputeInstance builds it for these attributes."""
    boot = s["boot_disk"][0]
    params = (boot.get("initialize_params") or [{}])[0]
    init = compute_v1.AttachedDiskInitializeParams(
        source_image=params.get("image") or None,
        disk_size_gb=int(params["size"]) if params.get("size") is not None else None,
        labels=params.get("labels") or {},
    )
    disk = compute_v1.AttachedDisk(boot=True, auto_delete=boot.get("auto_delete") is not False, initialize_params=init)
    nics = []
    for n in s["network_interface"]:
        access = [
            compute_v1.AccessConfig(name="external-nat", type_="ONE_TO_ONE_NAT", nat_i_p=a.get("nat_ip") or None)
            for a in n.get("access_config") or []
        ]
        network = n.get("network") or "default"
        nics.append(
            compute_v1.NetworkInterface(
                network=network if "/" in network else f"projects/{project}/global/networks/{network}",
                subnetwork=n.get("subnetwork") or None,
                access_configs=access,
            )
        )
    sched = (s.get("scheduling") or [{}])[0]
    scheduling = compute_v1.Scheduling(
        provisioning_model=sched.get("provisioning_model") or None,
        preemptible=sched.get("preemptible") or False,
        automatic_restart=sched.get("automatic_restart") if sched.get("automatic_restart") is not None else True,
        on_host_maintenance=sched.get("on_host_maintenance") or None,
        instance_termination_action=sched.get("instance_termination_action") or None,
    )
    accounts = [
        compute_v1.ServiceAccount(email=a.get("email") or "default", scopes=sorted(a.get("scopes") or []))
        for a in s.get("service_account") or []
    ]
    metadata = compute_v1.Metadata(
        items=[compute_v1.Items(key=k, value=v) for k, v in sorted((s.get("metadata") or {}).items())]
    )
    return compute_v1.Instance(
        name=s["name"],
        machine_type=f"projects/{project}/zones/{zone}/machineTypes/{s['machine_type']}",
        description=s.get("description") or None,
        disks=[disk],
        network_interfaces=nics,
        scheduling=scheduling,
        service_accounts=accounts,
        metadata=metadata,
        labels=s.get("labels") or {},
        deletion_protection=bool(s.get("deletion_protection")),
    )


def main() -> None:
    tf_provider.ProviderServicer = Servicer  # run_provider looks the servicer up here
    runner.run_provider(GoogleStandIn(), sys.argv)


if __name__ == "__main__":
    main()
