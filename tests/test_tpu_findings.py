"""What the real TPU API was found to do differently from the first fake (issue 24 item 6), against the fake
that learnt it: the project-number `parent`, no capacity tier for on-demand, node states UNKNOWN/HIDDEN."""

from __future__ import annotations

import pytest

from actfleet.errors import ActfleetError
from actfleet.infra.tpu_api import TpuApi
from tests.fakes.tpu_server import fake_tpu  # noqa: F401  (fixture)
from tests.test_tpu_api import PROJECT, ZONE_A, qr_request

QR = "tpu-us-central1-a-0"


@pytest.fixture
def api(fake_tpu) -> TpuApi:  # noqa: F811
    return TpuApi(PROJECT, fake_tpu.url, initial_backoff=0.001, max_backoff=0.01, retries=2)


def test_create_again_is_a_no_op_when_the_api_answers_the_project_number_as_parent(fake_tpu, api):
    fake_tpu.configure(project_number="123456789012")
    assert api.create_queued_resource(ZONE_A, QR, qr_request(ZONE_A, QR)) is True
    stored = api._get_raw_queued_resource(ZONE_A, QR)
    assert stored.tpu.node_spec[0].parent == f"projects/123456789012/locations/{ZONE_A}"  # as the real API
    # The provisioner reruns (a retried apply): the same request must be recognised, not refused.
    assert api.create_queued_resource(ZONE_A, QR, qr_request(ZONE_A, QR)) is False
    assert len(fake_tpu.calls(method="POST")) == 1


def test_a_parent_in_another_zone_is_still_a_difference(fake_tpu, api):
    fake_tpu.configure(project_number="123456789012")
    api.create_queued_resource(ZONE_A, QR, qr_request(ZONE_A, QR))
    stored = api._get_raw_queued_resource(ZONE_A, QR)
    from actfleet.infra.tpu_api import _same_parent

    assert _same_parent(f"projects/{PROJECT}/locations/{ZONE_A}", stored.tpu.node_spec[0].parent)
    assert not _same_parent(f"projects/{PROJECT}/locations/us-central1-b", stored.tpu.node_spec[0].parent)


def test_an_on_demand_request_meets_an_existing_spot_resource_as_a_difference(fake_tpu, api):
    api.create_queued_resource(ZONE_A, QR, qr_request(ZONE_A, QR))  # spot
    on_demand = qr_request(ZONE_A, QR)
    on_demand.pop("spot")  # no tier at all: what spot = false sends
    with pytest.raises(ActfleetError, match=r"differs at spot"):
        api.create_queued_resource(ZONE_A, QR, on_demand)


def test_a_spot_request_meets_an_existing_on_demand_resource_as_a_difference(fake_tpu, api):
    on_demand = qr_request(ZONE_A, QR)
    on_demand.pop("spot")
    api.create_queued_resource(ZONE_A, QR, on_demand)
    with pytest.raises(ActfleetError, match=r"differs at spot"):
        api.create_queued_resource(ZONE_A, QR, qr_request(ZONE_A, QR))


def test_node_unknown_and_its_health_reach_decide_through_observe(fake_tpu, api):
    from actfleet.config import Worker
    from actfleet.infra.decide import REPLACE, Policy, decide
    from actfleet.infra.observe import observe_fleet

    request = qr_request(ZONE_A, QR, labels={"actfleet-fleet": "t"})
    api.create_queued_resource(ZONE_A, QR, request)
    fake_tpu.set_node_state(ZONE_A, QR, "UNKNOWN", health="TIMEOUT")
    o = observe_fleet(api, [ZONE_A]).observed[QR]
    assert (o.qr_state, o.node_state, o.health) == ("ACTIVE", "UNKNOWN", "TIMEOUT")
    later = o.since + 3600  # an hour after it was made, still UNKNOWN
    [a] = decide([Worker.make("us-central1", ZONE_A, 0)], {QR: o}, later, Policy(fleet_id="t"))
    assert a.kind == REPLACE and "UNKNOWN" in a.reason


def test_lists_read_as_json_say_what_the_generated_client_says(fake_tpu, api):
    """The lists' own JSON reading (the hot path) against the generated client's GETs, field by field."""
    fake_tpu.create_qr_direct(ZONE_A, "tpu-us-central1-a-0", project=PROJECT, labels={"actfleet-fleet": "t"})
    fake_tpu.create_qr_direct(
        ZONE_A, "tpu-us-central1-a-1", project=PROJECT, state="FAILED", error=("RESOURCE_EXHAUSTED", "no capacity")
    )
    api.create_queued_resource(ZONE_A, "tpu-us-central1-a-2", qr_request(ZONE_A, "tpu-us-central1-a-2"))
    fake_tpu.preempt(ZONE_A, "tpu-us-central1-a-2")
    fake_tpu.set_node_state(ZONE_A, "tpu-us-central1-a-0", "READY", health="TIMEOUT")
    listed = {q.name: q for q in api.list_queued_resources(ZONE_A)}
    assert len(listed) == 3
    for name, q in listed.items():
        assert q == api.get_queued_resource(ZONE_A, name), name
    nodes = {n.name: n for n in api.list_nodes(ZONE_A)}
    assert nodes and all(n == api.get_node(ZONE_A, name) for name, n in nodes.items())
    assert nodes["tpu-us-central1-a-0"].health == "TIMEOUT"
