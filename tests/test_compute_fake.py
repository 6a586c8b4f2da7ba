"""The fake Compute Engine API (tests/fakes/compute_server.py) through the real google-cloud-compute REST
client: the shapes it answers are what compute_v1 parses, and it holds the unpleasant states gce mode meets
(long-running operations, stockout in operation.error, spot preemption by termination action)."""

from __future__ import annotations

import json
import urllib.request

import pytest
from google.api_core import exceptions as gexc
from google.auth.credentials import AnonymousCredentials
from google.cloud import compute_v1

from tests.fakes.compute_server import FakeComputeServer

ZONE = "us-central1-a"


@pytest.fixture
def fake():
    with FakeComputeServer.start(port=0) as f:
        yield f


def clients(url: str):
    opts = {"api_endpoint": url}
    cred = AnonymousCredentials()
    return (
        compute_v1.InstancesClient(transport="rest", client_options=opts, credentials=cred),
        compute_v1.ZoneOperationsClient(transport="rest", client_options=opts, credentials=cred),
    )


def body(name: str, action: str = "STOP", **labels: str) -> compute_v1.Instance:
    return compute_v1.Instance(
        name=name,
        machine_type=f"zones/{ZONE}/machineTypes/ct5lp-hightpu-4t",
        labels={"actfleet-fleet": "acts", **labels},
        scheduling=compute_v1.Scheduling(provisioning_model="SPOT", instance_termination_action=action),
        disks=[
            compute_v1.AttachedDisk(
                boot=True,
                auto_delete=True,
                initialize_params=compute_v1.AttachedDiskInitializeParams(
                    source_image="projects/ubuntu-os-cloud/global/images/family/ubuntu-2204-lts", disk_size_gb=100
                ),
            )
        ],
        network_interfaces=[compute_v1.NetworkInterface(network="default", subnetwork="workers")],
        metadata=compute_v1.Metadata(items=[compute_v1.Items(key="startup-script", value="#!/bin/sh\n")]),
        service_accounts=[
            compute_v1.ServiceAccount(
                email="w@p.iam.gserviceaccount.com", scopes=["https://www.googleapis.com/auth/cloud-platform"]
            )
        ],
    )


def insert(instances, ops, name, **kw):
    op = instances.insert_unary(project="p", zone=ZONE, instance_resource=body(name, **kw))
    return ops.wait(project="p", zone=ZONE, operation=op.name)


def test_insert_is_an_operation_and_the_instance_comes_back_whole(fake):
    fake.configure(provision_delay=0.3)
    instances, ops = clients(fake.url)
    op = instances.insert_unary(project="p", zone=ZONE, instance_resource=body("w-0"))
    assert op.status != compute_v1.Operation.Status.DONE and op.operation_type == "insert"
    assert instances.get(project="p", zone=ZONE, instance="w-0").status == "PROVISIONING"
    done = ops.wait(project="p", zone=ZONE, operation=op.name)
    assert done.status == compute_v1.Operation.Status.DONE and not done.error.errors
    got = instances.get(project="p", zone=ZONE, instance="w-0")
    assert got.status == "RUNNING" and got.last_start_timestamp
    assert got.machine_type.endswith(f"/projects/p/zones/{ZONE}/machineTypes/ct5lp-hightpu-4t")
    assert got.network_interfaces[0].network.endswith("/projects/p/global/networks/default")
    assert not got.network_interfaces[0].access_configs  # no external IP unless asked
    assert got.network_interfaces[0].subnetwork.endswith("/projects/p/regions/us-central1/subnetworks/workers")
    assert got.disks[0].initialize_params.disk_size_gb == 100
    assert got.metadata.items[0].key == "startup-script" and got.metadata.fingerprint
    assert got.scheduling.provisioning_model == "SPOT" and got.scheduling.instance_termination_action == "STOP"
    assert got.service_accounts[0].email == "w@p.iam.gserviceaccount.com"
    with pytest.raises(gexc.Conflict, match="already exists"):
        instances.insert_unary(project="p", zone=ZONE, instance_resource=body("w-0"))


def test_an_unknown_field_is_refused_like_the_real_api(fake):
    req = urllib.request.Request(
        f"{fake.url}/compute/v1/projects/p/zones/{ZONE}/instances",
        data=json.dumps({"name": "w-0", "machineType": "x", "acceleratorType": "v5litepod-8"}).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code == 400 and b"acceleratorType" in e.value.read()


def test_stockout_ends_the_insert_operation_in_zone_resource_pool_exhausted(fake):
    instances, ops = clients(fake.url)
    fake.set_stockout(ZONE)
    done = insert(instances, ops, "w-0")
    assert done.status == compute_v1.Operation.Status.DONE
    assert done.error.errors[0].code == "ZONE_RESOURCE_POOL_EXHAUSTED"
    assert done.http_error_status_code == 503
    with pytest.raises(gexc.NotFound):
        instances.get(project="p", zone=ZONE, instance="w-0")


def test_preemption_honours_the_termination_action(fake):
    instances, ops = clients(fake.url)
    insert(instances, ops, "stop-me", action="STOP")
    insert(instances, ops, "delete-me", action="DELETE")
    fake.configure(stop_delay=0.2)
    fake.preempt(ZONE, "stop-me")
    fake.preempt(ZONE, "delete-me")
    assert fake.status_of(ZONE, "stop-me") == "STOPPING"
    fake.configure(stop_delay=0)
    import time

    time.sleep(0.25)
    got = instances.get(project="p", zone=ZONE, instance="stop-me")
    assert got.status == "TERMINATED" and got.last_stop_timestamp
    with pytest.raises(gexc.NotFound):
        instances.get(project="p", zone=ZONE, instance="delete-me")


def test_lists_page_filter_and_aggregate(fake):
    fake.configure(page_size=2, zones=(ZONE, "us-central1-b"))
    instances, ops = clients(fake.url)
    for i in range(5):
        insert(instances, ops, f"w-{i}", role="odd" if i % 2 else "even")
    fake.insert_direct(ZONE, "stranger", project="p", labels={"team": "other"})
    pager = instances.list(request={"project": "p", "zone": ZONE, "filter": 'labels.role = "odd"'})
    assert [i.name for i in pager] == ["w-1", "w-3"]
    everything = instances.list(request={"project": "p", "zone": ZONE, "max_results": 2})
    assert len([i.name for i in everything]) == 6
    assert (
        len(fake.calls(method="GET", path=r"/zones/us-central1-a/instances$")) == 1 + 3
    )  # one filtered page, three pages
    agg = dict(
        (scope, [i.name for i in sl.instances])
        for scope, sl in instances.aggregated_list(request={"project": "p", "filter": "labels.actfleet-fleet:*"})
    )
    assert agg["zones/us-central1-b"] == [] and "stranger" not in agg.get("zones/us-central1-a", [])
    with pytest.raises(gexc.BadRequest, match="OR"):
        list(instances.list(request={"project": "p", "zone": ZONE, "filter": "name = a OR name = b"}))


def test_unreachable_zone_and_partial_success(fake):
    fake.configure(zones=(ZONE, "us-central1-b"))
    instances, ops = clients(fake.url)
    insert(instances, ops, "w-0")
    fake.set_unreachable("us-central1-b")
    with pytest.raises(gexc.ServiceUnavailable):
        list(instances.list(project="p", zone="us-central1-b", retry=None))
    first = next(iter(instances.aggregated_list(project="p", retry=None).pages))
    assert list(first.unreachables) == ["zones/us-central1-b"]
    assert first.items["zones/us-central1-b"].warning.code == "UNREACHABLE"
    assert [i.name for i in first.items[f"zones/{ZONE}"].instances] == ["w-0"]


def test_label_and_metadata_updates_need_the_current_fingerprint(fake):
    instances, ops = clients(fake.url)
    insert(instances, ops, "w-0")
    got = instances.get(project="p", zone=ZONE, instance="w-0")
    with pytest.raises(gexc.PreconditionFailed):
        instances.set_labels_unary(
            project="p",
            zone=ZONE,
            instance="w-0",
            instances_set_labels_request_resource=compute_v1.InstancesSetLabelsRequest(labels={"a": "b"}),
        )
    op = instances.set_metadata_unary(
        project="p",
        zone=ZONE,
        instance="w-0",
        metadata_resource=compute_v1.Metadata(
            fingerprint=got.metadata.fingerprint, items=[compute_v1.Items(key="k", value="v")]
        ),
    )
    ops.wait(project="p", zone=ZONE, operation=op.name)
    after = instances.get(project="p", zone=ZONE, instance="w-0")
    assert [(i.key, i.value) for i in after.metadata.items] == [("k", "v")]
    assert after.metadata.fingerprint != got.metadata.fingerprint


def test_control_endpoints_over_http(fake):
    def post(endpoint, **args):
        req = urllib.request.Request(f"{fake.url}/_fake/{endpoint}", data=json.dumps(args).encode(), method="POST")
        return json.load(urllib.request.urlopen(req))

    post("insert", zone=ZONE, name="w-0", project="p", scheduling={"provisioningModel": "SPOT"})
    post("status", zone=ZONE, name="w-0", status="REPAIRING")
    assert fake.status_of(ZONE, "w-0") == "REPAIRING"
    post("preempt", zone=ZONE, name="w-0")
    assert fake.status_of(ZONE, "w-0") == "TERMINATED"  # STOP: the API's default action for spot


def test_machine_type_changes_only_on_a_stopped_instance(fake):
    instances, ops = clients(fake.url)
    insert(instances, ops, "w-0")
    req = compute_v1.InstancesSetMachineTypeRequest(machine_type=f"zones/{ZONE}/machineTypes/ct6e-standard-8t")
    with pytest.raises(gexc.BadRequest, match="must be stopped"):
        instances.set_machine_type_unary(
            project="p", zone=ZONE, instance="w-0", instances_set_machine_type_request_resource=req
        )
    ops.wait(project="p", zone=ZONE, operation=instances.stop_unary(project="p", zone=ZONE, instance="w-0").name)
    assert fake.status_of(ZONE, "w-0") == "TERMINATED"
    op = instances.set_machine_type_unary(
        project="p", zone=ZONE, instance="w-0", instances_set_machine_type_request_resource=req
    )
    ops.wait(project="p", zone=ZONE, operation=op.name)
    ops.wait(project="p", zone=ZONE, operation=instances.start_unary(project="p", zone=ZONE, instance="w-0").name)
    got = instances.get(project="p", zone=ZONE, instance="w-0")
    assert got.status == "RUNNING" and got.machine_type.endswith("/machineTypes/ct6e-standard-8t")
