"""The fake TPU API's cost per call does not grow with the fleet (bench/reconcile.py sets up 10,000 workers).

Counted, not timed: the fake counts the resources each call looks at ("scanned": list pages, lifecycle
steps) and the ones it turns into JSON ("encoded"). Before it indexed them, every call re-scanned and
re-encoded the whole fleet, and setting up 10,000 workers took over 600 s.
"""

from __future__ import annotations

import pytest

from actfleet.infra.tpu_api import TpuApi
from tests.fakes.tpu_server import FakeTpuServer

PROJECT = "test-project"
ZONES = [f"us-central1-{c}" for c in "abcd"]
PER_ZONE = 120


def request(zone: str, node_id: str) -> dict:
    return {
        "tpu": {
            "nodeSpec": [
                {
                    "parent": f"projects/{PROJECT}/locations/{zone}",
                    "nodeId": node_id,
                    "node": {"acceleratorType": "v5litepod-8", "runtimeVersion": "v2-alpha-tpuv5-lite"},
                }
            ]
        },
        "spot": {},
    }


@pytest.fixture
def fake():
    with FakeTpuServer.start(port=0, page_size=50) as fake:
        yield fake


def test_a_zone_listing_looks_at_its_own_resources_once_and_encodes_them_once(fake):
    for zone in ZONES:
        for i in range(PER_ZONE):
            fake.create_qr_direct(zone, f"w-{i}", project=PROJECT)
    api = TpuApi(PROJECT, fake.url)
    fake.state.counters.clear()
    assert len(api.list_queued_resources(ZONES[0])) == PER_ZONE  # 3 pages
    assert len(api.list_nodes(ZONES[0])) == PER_ZONE
    first = dict(fake.state.counters)
    assert first == {"scanned": 2 * PER_ZONE, "encoded": 2 * PER_ZONE}, first
    # A converged fleet listed again: nothing changed, nothing is encoded again.
    fake.state.counters.clear()
    view = api.observe(ZONES)
    assert all(len(v.queued_resources) == PER_ZONE for v in view.values())
    assert fake.state.counters["scanned"] == 2 * PER_ZONE * len(ZONES)
    assert fake.state.counters["encoded"] == 2 * PER_ZONE * (len(ZONES) - 1)  # zone a's came from the cache
    # A change is seen (the cache is dropped for what changed, and only that).
    fake.preempt(ZONES[0], "w-7")
    fake.state.counters.clear()
    qrs = {q.name: q for q in api.list_queued_resources(ZONES[0])}
    nodes = {n.name: n for n in api.list_nodes(ZONES[0])}
    assert (qrs["w-7"].state, nodes["w-7"].state) == ("SUSPENDED", "PREEMPTED")
    assert fake.state.counters["encoded"] == 2


def test_creates_and_lifecycle_steps_touch_only_what_is_due(fake):
    # Many queued resources waiting in PROVISIONING at once: a create must not step every one of them.
    fake.configure(provision_delay=3600)
    fake.state.counters.clear()
    with fake.state.lock:
        for i in range(PER_ZONE * 2):
            fake.state.create_qr(PROJECT, ZONES[0], f"w-{i}", request(ZONES[0], f"w-{i}"))
    # Each create steps its own new queued resource (ACCEPTED -> PROVISIONING) and nothing else.
    assert fake.state.counters["scanned"] <= 2 * PER_ZONE * 2, dict(fake.state.counters)
    assert fake.queued_resource_state(ZONES[0], "w-0", PROJECT) == "PROVISIONING"
    fake.configure(provision_delay=0)  # all due now
    assert fake.queued_resource_state(ZONES[0], "w-0", PROJECT) == "ACTIVE"
    assert fake.queued_resource_state(ZONES[0], f"w-{PER_ZONE * 2 - 1}", PROJECT) == "ACTIVE"
