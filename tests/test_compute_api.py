"""infra/compute_api.py against the fake Compute Engine API through the real google-cloud-compute REST
client: paging, the fleet's label filter, retries on 429/503, a zone that fails on its own, long-running
operations (a stockout ends one in ZONE_RESOURCE_POOL_EXHAUSTED), and the aggregated list beside per zone."""

from __future__ import annotations

import pytest

from actfleet.errors import ActfleetError, ConfigError
from actfleet.infra.compute_api import ComputeApi
from actfleet.infra.tpu_api import ZoneError, ZoneView
from tests.fakes.compute_server import FakeComputeServer

P = "fake-project"
A, B = "us-central1-a", "us-central1-b"
OURS = {"actfleet-fleet": "rc", "managed-by": "actfleet"}


@pytest.fixture
def fake():
    with FakeComputeServer.start(port=0, zones=(A, B)) as f:
        yield f


def api_for(fake, **kw) -> ComputeApi:
    kw = {"retries": 2, "initial_backoff": 0.01, "max_backoff": 0.02, "operation_timeout": 20, **kw}
    return ComputeApi(P, fake.url, fleet_id="rc", **kw)


def spot(name: str, zone: str = A, action: str = "STOP", labels=OURS) -> dict:
    return {
        "name": name,
        "machineType": f"zones/{zone}/machineTypes/ct5lp-hightpu-4t",
        "labels": dict(labels),
        "scheduling": {"provisioningModel": "SPOT", "instanceTerminationAction": action},
        "networkInterfaces": [{"network": "default"}],
    }


def test_lists_page_through_the_fleets_instances_only(fake):
    api = api_for(fake, page_size=2)
    for i in range(5):
        assert api.insert_instance(A, spot(f"w-{i}"))
    fake.insert_direct(A, "someone-elses", project=P, labels={"team": "x"})
    before = api.calls
    got = api.list_instances(A)
    assert [i.name for i in got] == [f"w-{i}" for i in range(5)]  # the stranger is filtered out server-side
    assert api.calls - before == 3  # ceil(5 / 2) pages
    assert {i.status for i in got} == {"RUNNING"} and {i.state for i in got} == {"READY"}
    assert got[0].termination_action == "STOP" and got[0].provisioning_model == "SPOT"
    assert got[0].create_time is not None and got[0].path == f"projects/{P}/zones/{A}/instances/w-0"
    assert [c.query for c in fake.calls(method="GET")][0].count("filter=labels.actfleet-fleet") == 1
    everyone = ComputeApi(P, fake.url, fleet_id=None).list_instances(A)
    assert "someone-elses" in {i.name for i in everyone}


def test_429_and_503_are_retried_and_counted(fake):
    api = api_for(fake, retries=3)
    api.insert_instance(A, spot("w-0"))
    fake.fail(zone=A, status=429, count=1, method="GET")
    fake.fail(zone=A, status=503, count=1, method="GET")
    before = api.calls
    assert [i.name for i in api.list_instances(A)] == ["w-0"]
    assert api.calls - before == 3


def test_a_zone_that_keeps_failing_is_unreachable_alone(fake):
    api = api_for(fake, retries=1)
    api.insert_instance(A, spot("w-0"))
    fake.fail(zone=B, status=503, count=None)
    view = api.observe([A, B])
    assert isinstance(view[A], ZoneView) and [n.name for n in view[A].nodes] == ["w-0"]
    assert isinstance(view[B], ZoneError)
    assert "Compute Engine API: list instances in projects/fake-project/zones/us-central1-b: 503" in view[B].message
    assert "gave up after 2 attempts" in view[B].message


def test_403_is_not_retried_and_names_the_resource(fake):
    api = api_for(fake, retries=3)
    fake.fail(zone=A, status=403, count=None, method="GET")
    with pytest.raises(
        ActfleetError,
        match=r"^Compute Engine API: instance projects/fake-project/zones/us-central1-a/instances/w-0: 403 ",
    ):
        api.get_instance(A, "w-0")
    assert api.calls == 1


@pytest.mark.parametrize("code", ["ZONE_RESOURCE_POOL_EXHAUSTED", "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS"])
def test_a_stockout_ends_the_insert_operation_in_its_error(fake, code):
    api = api_for(fake)
    fake.set_stockout(A, code=code)
    with pytest.raises(ActfleetError, match=rf"operation .* failed: {code}: The zone"):
        api.insert_instance(A, spot("w-0"))
    assert api.get_instance(A, "w-0") is None


def test_delete_waits_for_its_operation_and_a_second_one_is_a_no_op(fake):
    fake.configure(delete_delay=0.3)
    api = api_for(fake)
    api.insert_instance(A, spot("w-0"))
    fake.clear_calls()
    assert api.delete_node(A, "w-0") is True
    assert fake.status_of(A, "w-0") is None  # gone once the operation is DONE
    assert len(fake.calls(path=r"/operations/.*/wait$")) >= 1  # waited with operations.wait, not GET polls
    assert not fake.calls(method="GET", path="/operations/")
    assert api.delete_instance(A, "w-0") is False
    assert api.insert_instance(A, spot("w-1")) and not api.insert_instance(A, spot("w-1"))  # 409: exists


def test_aggregated_observation_matches_per_zone_in_fewer_calls(fake):
    api = api_for(fake)
    for i in range(3):
        api.insert_instance(A, spot(f"a-{i}"))
        api.insert_instance(B, spot(f"b-{i}", zone=B))
    fake.preempt(B, "b-1")
    per_zone, agg = api_for(fake), api_for(fake, observe_via="aggregated")
    zoned, aggregated = per_zone.observe([A, B]), agg.observe([A, B])
    assert {z: [(n.name, n.status) for n in v.nodes] for z, v in zoned.items()} == {
        z: [(n.name, n.status) for n in v.nodes] for z, v in aggregated.items()
    }
    assert dict((n.name, n.state) for n in aggregated[B].nodes)["b-1"] == "TERMINATED"
    assert (per_zone.calls, agg.calls) == (2, 1)
    fake.set_unreachable(B)
    view = api_for(fake, observe_via="aggregated").observe([A, B])
    assert isinstance(view[A], ZoneView) and isinstance(view[B], ZoneError) and "unreachable" in view[B].message


def test_another_host_is_refused_before_any_client_exists():
    with pytest.raises(ConfigError, match=r'^Compute Engine API endpoint "https://evil.example": '):
        ComputeApi(P, "https://evil.example")
