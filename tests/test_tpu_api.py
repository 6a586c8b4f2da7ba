"""actfleet.infra.tpu_api: the real google.cloud.tpu_v2 REST client against the fake TPU API on loopback.

Everything here goes over real sockets: the client library builds the requests, the fake answers them in
the v2 REST JSON, and the fake's call log is the evidence of what was sent.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from actfleet import config
from actfleet.errors import ActfleetError, InputError
from actfleet.infra.tpu_api import Node, QueuedResource, TpuApi, ZoneError, ZoneView
from tests.fakes.tpu_server import FakeTpuServer, fake_tpu  # noqa: F401  (fixture)

PROJECT = "test-project"
ZONE_A, ZONE_B, ZONE_C = "us-central1-a", "us-central1-b", "us-central1-c"
REPO = Path(__file__).resolve().parents[1]


def qr_request(zone: str, node_id: str, labels: dict | None = None, metadata: dict | None = None) -> dict:
    return {
        "tpu": {
            "nodeSpec": [
                {
                    "parent": f"projects/{PROJECT}/locations/{zone}",
                    "nodeId": node_id,
                    "node": {
                        "acceleratorType": "v5litepod-8",
                        "runtimeVersion": "v2-alpha-tpuv5-lite",
                        "serviceAccount": {
                            "email": f"actfleet-t@{PROJECT}.iam.gserviceaccount.com",
                            "scope": ["https://www.googleapis.com/auth/cloud-platform"],
                        },
                        "labels": {"actfleet-fleet": "t", "managed-by": "actfleet", **(labels or {})},
                        "metadata": metadata if metadata is not None else {"startup-script": "#!/bin/bash\necho hi\n"},
                    },
                }
            ]
        },
        "spot": {},
    }


@pytest.fixture
def api(fake_tpu) -> TpuApi:  # noqa: F811
    # Tiny backoff: retries are exercised, not waited for.
    return TpuApi(PROJECT, fake_tpu.url, initial_backoff=0.001, max_backoff=0.01, retries=4)


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url) as r:
        return json.loads(r.read())


def post_json(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read())


# -------------------------------------------------------------------------------------------- observe


def test_lists_follow_pagination_across_pages(fake_tpu, api):
    fake_tpu.configure(page_size=3)
    for i in range(8):
        fake_tpu.create_qr_direct(ZONE_A, f"tpu-us-central1-a-{i}", project=PROJECT, labels={"actfleet-fleet": "t"})

    qrs = api.list_queued_resources(ZONE_A)
    nodes = api.list_nodes(ZONE_A)

    assert sorted(q.name for q in qrs) == sorted(f"tpu-us-central1-a-{i}" for i in range(8))
    assert len(nodes) == 8 and all(n.state == "READY" and n.health == "HEALTHY" for n in nodes)
    qr_pages = fake_tpu.calls(method="GET", path=r"/queuedResources$")
    assert len(qr_pages) == 3  # 3 + 3 + 2
    assert [("pageToken=" in c.query) for c in qr_pages] == [False, True, True]
    assert len(fake_tpu.calls(method="GET", path=r"/nodes$")) == 3


def test_client_page_size_is_sent_and_honoured(fake_tpu):
    for i in range(5):
        fake_tpu.create_qr_direct(ZONE_A, f"tpu-us-central1-a-{i}", project=PROJECT)
    api = TpuApi(PROJECT, fake_tpu.url, page_size=2)
    assert len(api.list_queued_resources(ZONE_A)) == 5
    calls = fake_tpu.calls(path=r"/queuedResources$")
    assert len(calls) == 3 and all("pageSize=2" in c.query for c in calls)


def test_observations_are_plain_dataclasses_with_state_names(fake_tpu, api):
    fake_tpu.create_qr_direct(ZONE_A, "tpu-us-central1-a-0", project=PROJECT, labels={"actfleet-fleet": "t"})
    [qr] = api.list_queued_resources(ZONE_A)
    [node] = api.list_nodes(ZONE_A)
    assert isinstance(qr, QueuedResource) and isinstance(node, Node)
    assert (qr.name, qr.zone, qr.state, qr.labels, qr.node_ids) == (
        "tpu-us-central1-a-0",
        ZONE_A,
        "ACTIVE",
        {"actfleet-fleet": "t"},
        ("tpu-us-central1-a-0",),
    )
    assert qr.path == f"projects/{PROJECT}/locations/{ZONE_A}/queuedResources/tpu-us-central1-a-0"
    assert isinstance(qr.create_time, float)
    assert (node.name, node.state, node.queued_resource, node.labels) == (
        "tpu-us-central1-a-0",
        "READY",
        "tpu-us-central1-a-0",
        {"actfleet-fleet": "t"},
    )
    with pytest.raises(AttributeError):
        qr.state = "FAILED"  # frozen


def test_client_asks_for_integer_enums_and_the_fake_answers_them(fake_tpu, api):
    fake_tpu.create_qr_direct(ZONE_A, "tpu-us-central1-a-0", project=PROJECT)
    api.get_queued_resource(ZONE_A, "tpu-us-central1-a-0")  # the generated client: integer enums
    [call] = fake_tpu.calls(path=r"/queuedResources/")
    assert "enum-encoding%3Dint" in call.query
    # Lists are read as JSON by actfleet itself (the hot path): enums by name, the API's default, so a
    # state newer than the installed library still arrives by name.
    [qr] = api.list_queued_resources(ZONE_A)
    [call] = fake_tpu.calls(path=r"/queuedResources$")
    assert "enum-encoding" not in call.query and qr.state == "ACTIVE" and qr.state_initiator == "USER"

    base = f"{fake_tpu.url}/v2/projects/{PROJECT}/locations/{ZONE_A}"
    as_ints = get_json(base + "/queuedResources/tpu-us-central1-a-0?%24alt=json%3Benum-encoding%3Dint")
    as_names = get_json(base + "/queuedResources/tpu-us-central1-a-0")
    assert as_ints["state"] == {"state": 6, "stateInitiator": 1}  # ACTIVE, USER: the proto's numbers
    assert as_names["state"] == {"state": "ACTIVE", "stateInitiator": "USER"}
    node = get_json(base + "/nodes/tpu-us-central1-a-0?%24alt=json%3Benum-encoding%3Dint")
    assert node["state"] == 2 and node["health"] == 1  # READY, HEALTHY


def test_observe_calls_zones_in_parallel_and_isolates_a_failing_zone(fake_tpu, api):
    for zone in (ZONE_A, ZONE_B, ZONE_C):
        fake_tpu.create_qr_direct(zone, f"tpu-{zone}-0", project=PROJECT)
    # Every list call is held a moment, so calls made in parallel overlap inside the fake.
    fake_tpu.fail(status=None, count=None, method="GET", delay=0.2)
    fake_tpu.fail(zone=ZONE_B, status=503, count=None)  # ZONE_B never recovers

    views = api.observe([ZONE_A, ZONE_B, ZONE_C])

    assert set(views) == {ZONE_A, ZONE_B, ZONE_C}
    assert isinstance(views[ZONE_A], ZoneView) and isinstance(views[ZONE_C], ZoneView)
    assert [q.name for q in views[ZONE_C].queued_resources] == ["tpu-us-central1-c-0"]
    assert [n.name for n in views[ZONE_A].nodes] == ["tpu-us-central1-a-0"]
    err = views[ZONE_B]
    assert isinstance(err, ZoneError)
    assert "projects/test-project/locations/us-central1-b" in err.message and "503" in err.message
    assert "\n" not in err.message
    assert fake_tpu.max_in_flight >= 3  # the zones (and each zone's two lists) were called concurrently


def test_a_state_newer_than_the_library_shows_as_its_number(fake_tpu, api):
    from google.cloud.tpu_v2.types import cloud_tpu

    fake_tpu.create_qr_direct(ZONE_A, "tpu-us-central1-a-0", project=PROJECT)
    with fake_tpu.state.lock:
        [qr] = fake_tpu.state.qrs.values()
        cloud_tpu.QueuedResource.pb(qr.message).state.state = 42  # what a future API version might send
    assert api.get_queued_resource(ZONE_A, "tpu-us-central1-a-0").state == "42"


def test_get_returns_none_when_absent(fake_tpu, api):
    assert api.get_queued_resource(ZONE_A, "tpu-us-central1-a-9") is None
    assert api.get_node(ZONE_A, "tpu-us-central1-a-9") is None
    fake_tpu.create_qr_direct(ZONE_A, "tpu-us-central1-a-9", project=PROJECT)
    assert api.get_queued_resource(ZONE_A, "tpu-us-central1-a-9").state == "ACTIVE"
    assert api.get_node(ZONE_A, "tpu-us-central1-a-9").state == "READY"


# -------------------------------------------------------------------------------------------- retries and errors


@pytest.mark.parametrize("statuses", [[429], [503], [429, 503, 500]])
def test_transient_errors_are_retried_until_success(fake_tpu, api, statuses):
    fake_tpu.create_qr_direct(ZONE_A, "tpu-us-central1-a-0", project=PROJECT)
    for status in statuses:
        fake_tpu.fail(zone=ZONE_A, status=status, count=1)

    assert [q.name for q in api.list_queued_resources(ZONE_A)] == ["tpu-us-central1-a-0"]

    log = fake_tpu.calls(zone=ZONE_A)
    assert [c.status for c in log] == statuses + [200]
    assert len({c.path for c in log}) == 1  # the same request, repeated
    assert api.calls == len(statuses) + 1


def test_a_page_failing_midway_is_retried_alone(fake_tpu, api):
    fake_tpu.configure(page_size=2)
    for i in range(5):
        fake_tpu.create_qr_direct(ZONE_A, f"tpu-us-central1-a-{i}", project=PROJECT)
    fake_tpu.fail(zone=ZONE_A, status=503, count=1, path=r"pageToken=2")  # the fake's tokens are offsets

    assert len(api.list_queued_resources(ZONE_A)) == 5

    log = fake_tpu.calls(zone=ZONE_A)
    assert [c.status for c in log] == [200, 503, 200, 200]  # the second page retried; no page fetched twice
    assert "pageToken" not in log[0].query and "pageToken=2" in log[2].query


def test_retries_give_up_with_one_line_naming_the_resource(fake_tpu):
    api = TpuApi(PROJECT, fake_tpu.url, initial_backoff=0.001, max_backoff=0.01, retries=2)
    fake_tpu.fail(zone=ZONE_A, status=503, count=None)
    with pytest.raises(ActfleetError) as e:
        api.list_nodes(ZONE_A)
    msg = str(e.value)
    assert msg == (
        f"TPU API: list nodes in projects/{PROJECT}/locations/{ZONE_A}: 503 unavailable: "
        "The service is currently unavailable (injected by the fake) (gave up after 3 attempts)"
    )
    assert len(fake_tpu.calls(zone=ZONE_A)) == 3


@pytest.mark.parametrize("status, words", [(400, "400 invalid argument"), (403, "403 permission denied")])
def test_client_errors_are_not_retried_and_name_the_resource(fake_tpu, api, status, words):
    fake_tpu.create_qr_direct(ZONE_A, "tpu-us-central1-a-0", project=PROJECT)
    fake_tpu.fail(zone=ZONE_A, status=status, count=None)
    with pytest.raises(ActfleetError) as e:
        api.get_queued_resource(ZONE_A, "tpu-us-central1-a-0")
    msg = str(e.value)
    assert msg.startswith(
        f"TPU API: queued resource projects/{PROJECT}/locations/{ZONE_A}/queuedResources/tpu-us-central1-a-0: {words}: "
    )
    assert "\n" not in msg
    assert len(fake_tpu.calls(zone=ZONE_A)) == 1


def test_not_found_on_a_list_names_the_location():
    with FakeTpuServer.start(zones=[ZONE_A]) as fake:
        api = TpuApi(PROJECT, fake.url, retries=0)
        with pytest.raises(
            ActfleetError,
            match=r"^TPU API: list queued resources in "
            r"projects/test-project/locations/us-east9-z: 404 not found: ",
        ):
            api.list_queued_resources("us-east9-z")


def test_unreachable_endpoint_is_retried_then_one_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    api = TpuApi(PROJECT, f"http://127.0.0.1:{port}", initial_backoff=0.001, max_backoff=0.01, retries=1)
    with pytest.raises(ActfleetError, match=r"cannot reach http://127\.0\.0\.1:\d+: .*gave up after 2 attempts"):
        api.list_nodes(ZONE_A)
    assert api.calls == 2


# -------------------------------------------------------------------------------------------- create and delete


def test_create_is_idempotent_and_carries_the_node_spec(fake_tpu, api):
    req = qr_request(ZONE_A, "tpu-us-central1-a-0", metadata={"startup-script": "echo 1", "actfleet-job": "j"})
    assert api.create_queued_resource(ZONE_A, "tpu-us-central1-a-0", req) is True
    assert api.create_queued_resource(ZONE_A, "tpu-us-central1-a-0", req) is False
    assert len(fake_tpu.calls(method="POST")) == 1
    [post] = fake_tpu.calls(method="POST")
    assert "queuedResourceId=tpu-us-central1-a-0" in post.query

    qr = api.get_queued_resource(ZONE_A, "tpu-us-central1-a-0")
    assert qr.state == "ACTIVE" and qr.labels["actfleet-fleet"] == "t"
    [node] = fake_tpu.snapshot()["nodes"]
    assert node["metadata"] == {"startup-script": "echo 1", "actfleet-job": "j"}
    assert node["serviceAccount"]["email"] == f"actfleet-t@{PROJECT}.iam.gserviceaccount.com"
    assert node["schedulingConfig"] == {"spot": True}
    assert node["labels"] == {"actfleet-fleet": "t", "managed-by": "actfleet"}


@pytest.mark.parametrize(
    "change, where",
    [
        (
            lambda r: r["tpu"]["nodeSpec"][0]["node"].update(runtimeVersion="v2-other"),
            "tpu.nodeSpec[0].node.runtimeVersion",
        ),
        (
            lambda r: r["tpu"]["nodeSpec"][0]["node"]["metadata"].update({"startup-script": "echo 2"}),
            "tpu.nodeSpec[0].node.metadata.startup-script",
        ),
        (
            lambda r: r["tpu"]["nodeSpec"][0]["node"]["labels"].pop("managed-by"),
            "tpu.nodeSpec[0].node.labels.managed-by",
        ),  # a dropped label is a difference too
        (lambda r: (r.pop("spot"), r.update(guaranteed={})), "guaranteed"),
    ],
)
def test_create_refuses_an_existing_resource_with_a_different_request(fake_tpu, api, change, where):
    api.create_queued_resource(ZONE_A, "tpu-us-central1-a-0", qr_request(ZONE_A, "tpu-us-central1-a-0"))
    other = qr_request(ZONE_A, "tpu-us-central1-a-0")
    change(other)
    with pytest.raises(ActfleetError) as e:
        api.create_queued_resource(ZONE_A, "tpu-us-central1-a-0", other)
    assert str(e.value) == (
        f"TPU API: queued resource projects/{PROJECT}/locations/{ZONE_A}/queuedResources/"
        f"tpu-us-central1-a-0 already exists with a different request (differs at {where}): "
        "delete it first, or let reconcile replace it"
    )
    assert len(fake_tpu.calls(method="POST")) == 1


def test_create_losing_a_race_to_the_same_request_is_a_no_op(fake_tpu, api):
    req = qr_request(ZONE_A, "tpu-us-central1-a-0")
    TpuApi(PROJECT, fake_tpu.url).create_queued_resource(ZONE_A, "tpu-us-central1-a-0", req)  # the other actor
    # Our client's first look misses it (as if it landed just after), so it POSTs and meets a 409.
    fake_tpu.fail(status=404, count=1, method="GET", path=r"/queuedResources/tpu-us-central1-a-0\?")
    assert api.create_queued_resource(ZONE_A, "tpu-us-central1-a-0", req) is False
    assert [c.status for c in fake_tpu.calls(method="POST")] == [200, 409]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r.update(bogus=1), 'has no field named "bogus"'),
        (lambda r: r["tpu"].update(nodeSpec=[]), "the request has no tpu.nodeSpec entries"),
        (
            lambda r: r["tpu"]["nodeSpec"][0].update(parent="projects/test-project/locations/us-central1-b"),
            'tpu.nodeSpec[0].parent = "projects/test-project/locations/us-central1-b": must be '
            '"projects/test-project/locations/us-central1-a"',
        ),
        (lambda r: r["tpu"]["nodeSpec"][0]["node"].pop("runtimeVersion"), "needs a runtimeVersion"),
    ],
)
def test_a_malformed_request_is_bad_input_and_sends_nothing(fake_tpu, api, mutate, message):
    req = qr_request(ZONE_A, "tpu-us-central1-a-0")
    mutate(req)
    with pytest.raises(InputError) as e:
        api.create_queued_resource(ZONE_A, "tpu-us-central1-a-0", req)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert e.value.exit_code == 2
    assert fake_tpu.calls() == []


def test_delete_is_idempotent_and_waits_for_the_operation(fake_tpu, api):
    fake_tpu.configure(delete_delay=0.3)
    api.create_queued_resource(ZONE_A, "tpu-us-central1-a-0", qr_request(ZONE_A, "tpu-us-central1-a-0"))
    waits = []
    api.on_wait = lambda what, seconds: waits.append((what, seconds))

    assert api.delete_queued_resource(ZONE_A, "tpu-us-central1-a-0") is True
    assert waits and {w for w, _ in waits} == {
        f"queued resource projects/{PROJECT}/locations/{ZONE_A}/queuedResources/tpu-us-central1-a-0"
    }
    assert [s for _, s in waits] == sorted(s for _, s in waits)
    # Returned only once the operation was done: the resource and its node are gone now.
    assert fake_tpu.queued_resource_state(ZONE_A, "tpu-us-central1-a-0") is None
    assert api.list_nodes(ZONE_A) == ()
    assert len(fake_tpu.calls(method="GET", path=r"/operations/")) >= 1
    [delete] = fake_tpu.calls(method="DELETE")
    assert "force=true" in delete.query

    # Already gone: a GET says so (NOT_FOUND) and no second delete is sent.
    assert api.delete_queued_resource(ZONE_A, "tpu-us-central1-a-0") is False
    assert [c.status for c in fake_tpu.calls(method="DELETE")] == [200]
    assert fake_tpu.calls(method="GET", path=r"/queuedResources/tpu-us-central1-a-0$")[-1].status == 404


def test_delete_without_force_is_refused_while_the_node_exists(fake_tpu, api):
    fake_tpu.create_qr_direct(ZONE_A, "tpu-us-central1-a-0", project=PROJECT)
    with pytest.raises(ActfleetError, match=r"queuedResources/tpu-us-central1-a-0: 400 failed precondition: "):
        api.delete_queued_resource(ZONE_A, "tpu-us-central1-a-0", force=False)
    assert fake_tpu.queued_resource_state(ZONE_A, "tpu-us-central1-a-0") == "ACTIVE"


def test_deleting_a_queued_resources_node_suspends_it(fake_tpu, api):
    fake_tpu.create_qr_direct(ZONE_A, "tpu-us-central1-a-0", project=PROJECT)
    assert api.delete_node(ZONE_A, "tpu-us-central1-a-0") is True
    assert api.delete_node(ZONE_A, "tpu-us-central1-a-0") is False
    assert api.get_queued_resource(ZONE_A, "tpu-us-central1-a-0").state == "SUSPENDED"


# -------------------------------------------------------------------------------------------- lifecycles


def test_provisioning_lifecycle_creates_the_node_when_active(fake_tpu, api):
    fake_tpu.configure(provision_delay=3600)
    api.create_queued_resource(ZONE_A, "tpu-us-central1-a-0", qr_request(ZONE_A, "tpu-us-central1-a-0"))
    assert api.get_queued_resource(ZONE_A, "tpu-us-central1-a-0").state == "PROVISIONING"
    assert [n.state for n in api.list_nodes(ZONE_A)] == ["CREATING"]

    fake_tpu.configure(provision_delay=0)  # "an hour later"
    view = api.observe([ZONE_A])[ZONE_A]
    assert [q.state for q in view.queued_resources] == ["ACTIVE"]
    assert [(n.state, n.health) for n in view.nodes] == [("READY", "HEALTHY")]


def test_accepted_lasts_the_accept_delay(fake_tpu, api):
    fake_tpu.configure(accept_delay=3600)
    api.create_queued_resource(ZONE_A, "tpu-us-central1-a-0", qr_request(ZONE_A, "tpu-us-central1-a-0"))
    assert api.get_queued_resource(ZONE_A, "tpu-us-central1-a-0").state == "ACCEPTED"
    assert api.list_nodes(ZONE_A) == ()


def test_stockout_holds_queued_resources_in_one_zone_only(fake_tpu, api):
    fake_tpu.set_stockout(ZONE_A, True)
    for zone in (ZONE_A, ZONE_B):
        api.create_queued_resource(zone, f"tpu-{zone}-0", qr_request(zone, f"tpu-{zone}-0"))

    views = api.observe([ZONE_A, ZONE_B])
    assert [q.state for q in views[ZONE_A].queued_resources] == ["WAITING_FOR_RESOURCES"]
    assert views[ZONE_A].nodes == ()
    assert [q.state for q in views[ZONE_B].queued_resources] == ["ACTIVE"]

    fake_tpu.set_stockout(ZONE_A, False)
    view = api.observe([ZONE_A])[ZONE_A]
    assert [q.state for q in view.queued_resources] == ["ACTIVE"]
    assert [n.state for n in view.nodes] == ["READY"]


def test_preemption_suspends_the_queued_resource_until_replaced(fake_tpu, api):
    req = qr_request(ZONE_A, "tpu-us-central1-a-0")
    api.create_queued_resource(ZONE_A, "tpu-us-central1-a-0", req)
    fake_tpu.preempt(ZONE_A, "tpu-us-central1-a-0")

    view = api.observe([ZONE_A])[ZONE_A]
    [qr], [node] = view.queued_resources, view.nodes
    assert (qr.state, qr.state_initiator) == ("SUSPENDED", "SERVICE")
    assert node.state == "PREEMPTED"

    # Spot TPUs never come back by themselves: replace = delete + create.
    assert api.delete_queued_resource(ZONE_A, "tpu-us-central1-a-0")
    assert api.create_queued_resource(ZONE_A, "tpu-us-central1-a-0", req)
    assert api.get_queued_resource(ZONE_A, "tpu-us-central1-a-0").state == "ACTIVE"
    assert [n.state for n in api.list_nodes(ZONE_A)] == ["READY"]


# ------------------------------------------------------------------ real states, real failures (issue 15)

QR0 = "tpu-us-central1-a-0"


def test_a_suspending_queued_resource_is_waited_for_never_force_deleted(fake_tpu, api):
    fake_tpu.configure(suspend_delay=0.4)
    api.create_queued_resource(ZONE_A, QR0, qr_request(ZONE_A, QR0))
    fake_tpu.preempt(ZONE_A, QR0)
    assert api.get_queued_resource(ZONE_A, QR0).state == "SUSPENDING"
    waits = []
    api.on_wait = lambda what, seconds: waits.append(what)
    assert api.delete_queued_resource(ZONE_A, QR0) is True
    # The delete went out only once the suspension had finished.
    assert fake_tpu.qr_deletes() == [(QR0, "SUSPENDED")]
    assert waits and fake_tpu.queued_resource_state(ZONE_A, QR0) is None


@pytest.mark.parametrize("state", ["SUSPENDED", "FAILED"])
def test_a_stuck_delete_is_sent_again_until_the_queued_resource_is_gone(fake_tpu, api, state):
    fake_tpu.create_qr_direct(ZONE_A, QR0, project=PROJECT, state=state, labels={"actfleet-fleet": "t"})
    fake_tpu.stick_delete(ZONE_A, QR0, times=2)
    notes = []
    api.on_note = notes.append
    assert api.delete_queued_resource(ZONE_A, QR0) is True
    assert fake_tpu.qr_deletes() == [(QR0, state)] * 3  # two stuck, the third took
    assert fake_tpu.queued_resource_state(ZONE_A, QR0) is None
    assert len(notes) == 2 and all(f"still {state} after a delete" in n for n in notes)
    # Confirmed by a GET answering NOT_FOUND.
    assert fake_tpu.calls(method="GET", path=QR0 + "$")[-1].status == 404


def test_a_delete_stuck_for_good_ends_in_one_line_naming_it(fake_tpu, api):
    fake_tpu.create_qr_direct(ZONE_A, QR0, project=PROJECT, state="SUSPENDED")
    fake_tpu.stick_delete(ZONE_A, QR0, times=99)
    with pytest.raises(ActfleetError, match=r"queuedResources/tpu-us-central1-a-0: still SUSPENDED after 4 deletes"):
        api.delete_queued_resource(ZONE_A, QR0)


def test_a_failed_queued_resource_explains_itself_with_integer_enums(fake_tpu, api):
    fake_tpu.create_qr_direct(
        ZONE_A,
        QR0,
        project=PROJECT,
        state="FAILED",
        error=("PERMISSION_DENIED", "Permission 'tpu.nodes.create' denied on 'projects/p'"),
    )
    # Read both ways: a GET through the generated client (integer enums), a list as JSON (names).
    for qr in (api.get_queued_resource(ZONE_A, QR0), *api.list_queued_resources(ZONE_A)):
        assert (qr.state, qr.error_code, qr.error_message) == (
            "FAILED",
            "PERMISSION_DENIED",
            "Permission 'tpu.nodes.create' denied on 'projects/p'",
        )
    assert "enum-encoding%3Dint" in fake_tpu.calls(method="GET")[0].query
    # On the wire: integers, as the real API sends them to this client.
    raw = get_json(
        f"{fake_tpu.url}/v2/projects/{PROJECT}/locations/{ZONE_A}/queuedResources/{QR0}"
        "?%24alt=json%3Benum-encoding%3Dint"
    )
    assert raw["state"]["state"] == 4 and raw["state"]["failedData"]["error"]["code"] == 7
    assert api.get_queued_resource(ZONE_A, QR0).error_code == "PERMISSION_DENIED"


@pytest.mark.parametrize("state", ["FAILED", "SUSPENDED", "DELETING"])
def test_create_over_a_queued_resource_on_its_way_out_makes_a_new_one(fake_tpu, api, state):
    fake_tpu.configure(delete_delay=0.2)
    req = qr_request(ZONE_A, QR0)
    api.create_queued_resource(ZONE_A, QR0, req)
    if state == "DELETING":
        api.delete_queued_resource(ZONE_A, QR0, wait=False)
    else:
        fake_tpu.delete_direct(ZONE_A, QR0)
        fake_tpu.create_qr_direct(
            ZONE_A, QR0, project=PROJECT, state=state, labels={"actfleet-fleet": "t", "managed-by": "actfleet"}
        )
    assert api.get_queued_resource(ZONE_A, QR0).state == state
    # Not "already exists with the same request": it is replaced by a live one.
    assert api.create_queued_resource(ZONE_A, QR0, req) is True
    assert api.get_queued_resource(ZONE_A, QR0).state == "ACTIVE"
    assert len(fake_tpu.calls(method="POST", status=200)) == 2


@pytest.mark.parametrize(
    "code, status, words",
    [
        ("PERMISSION_DENIED", 403, "permission denied"),
        ("INVALID_ARGUMENT", 400, "invalid argument"),
        ("RESOURCE_EXHAUSTED", 429, "resource exhausted"),
    ],
)
def test_a_zone_whose_creates_are_refused(fake_tpu, api, code, status, words):
    fake_tpu.fail_creates(ZONE_B, code, "Accelerator type v5litepod-8 is not offered in us-central1-b")
    with pytest.raises(ActfleetError) as e:
        api.create_queued_resource(ZONE_B, "tpu-us-central1-b-0", qr_request(ZONE_B, "tpu-us-central1-b-0"))
    assert f": {status} {words}: Accelerator type v5litepod-8 is not offered" in str(e.value)
    assert api.create_queued_resource(ZONE_A, QR0, qr_request(ZONE_A, QR0))  # the other zone is fine
    fake_tpu.fail_creates(ZONE_B, None)
    assert api.create_queued_resource(ZONE_B, "tpu-us-central1-b-0", qr_request(ZONE_B, "tpu-us-central1-b-0"))


def test_a_zone_whose_creates_are_accepted_then_fail(fake_tpu, api):
    fake_tpu.fail_creates(ZONE_B, "RESOURCE_EXHAUSTED", "Quota 'TPUV5sLitepodPerProjectPerZone' exceeded", how="fail")
    assert api.create_queued_resource(ZONE_B, "tpu-us-central1-b-0", qr_request(ZONE_B, "tpu-us-central1-b-0"))
    qr = api.get_queued_resource(ZONE_B, "tpu-us-central1-b-0")
    assert (qr.state, qr.error_code) == ("FAILED", "RESOURCE_EXHAUSTED") and "Quota" in qr.error_message
    assert api.list_nodes(ZONE_B) == ()


def test_node_states_set_by_hand_and_a_node_left_out_of_a_listing(fake_tpu, api):
    api.create_queued_resource(ZONE_A, QR0, qr_request(ZONE_A, QR0))
    fake_tpu.set_node_state(ZONE_A, QR0, "REPAIRING")
    assert [n.state for n in api.list_nodes(ZONE_A)] == ["REPAIRING"]
    fake_tpu.hide_from_lists(ZONE_A, QR0, lists=1)
    assert api.list_nodes(ZONE_A) == ()  # left out of this listing...
    assert api.get_node(ZONE_A, QR0).state == "REPAIRING"  # ...while a GET finds it
    assert [n.name for n in api.list_nodes(ZONE_A)] == [QR0]  # and the next listing has it again


def test_resources_planted_and_removed_behind_the_clients_back(fake_tpu, api):
    fake_tpu.create_qr_direct(ZONE_A, "orphan-1", project=PROJECT, labels={"actfleet-fleet": "t"})
    assert [q.name for q in api.list_queued_resources(ZONE_A)] == ["orphan-1"]
    assert fake_tpu.delete_direct(ZONE_A, "orphan-1") is True
    assert api.observe([ZONE_A])[ZONE_A] == ZoneView((), ())
    assert fake_tpu.calls(method="POST") == [] and fake_tpu.calls(method="DELETE") == []


# -------------------------------------------------------------------------------------------- the fake over HTTP


def test_control_endpoints_drive_the_fake_from_another_process(fake_tpu, api):
    url = fake_tpu.url + "/_fake"
    post_json(
        url + "/create-qr",
        {"zone": ZONE_A, "id": "tpu-us-central1-a-0", "project": PROJECT, "labels": {"actfleet-fleet": "t"}},
    )
    post_json(url + "/preempt", {"zone": ZONE_A, "id": "tpu-us-central1-a-0"})
    assert api.get_queued_resource(ZONE_A, "tpu-us-central1-a-0").state == "SUSPENDED"

    post_json(url + "/stockout", {"zone": ZONE_B, "on": True})
    post_json(url + "/fail", {"zone": ZONE_C, "status": 429, "count": 2})
    api.list_nodes(ZONE_C)
    assert [c["status"] for c in get_json(url + "/calls?zone=us-central1-c")["calls"]] == [429, 429, 200]

    post_json(url + "/config", {"provision_delay": 3600})
    api.create_queued_resource(ZONE_B, "tpu-us-central1-b-0", qr_request(ZONE_B, "tpu-us-central1-b-0"))
    state = get_json(url + "/state")
    assert state["stockout"] == [ZONE_B]
    assert {q["name"].rsplit("/", 1)[1]: q["state"]["state"] for q in state["queuedResources"]} == {
        "tpu-us-central1-a-0": "SUSPENDED",
        "tpu-us-central1-b-0": "WAITING_FOR_RESOURCES",
    }

    post_json(url + "/delete", {"zone": ZONE_A, "id": "tpu-us-central1-a-0"})
    assert api.get_queued_resource(ZONE_A, "tpu-us-central1-a-0") is None
    with pytest.raises(urllib.error.HTTPError) as e:
        post_json(url + "/preempt", {"zone": ZONE_A})  # no id
    assert e.value.code == 400


# -------------------------------------------------------------------------------------------- wiring


def test_from_config_uses_the_endpoint_env_over_the_config(fake_tpu, monkeypatch, tmp_path):
    text = (
        (REPO / "fleet.example.toml")
        .read_text()
        .replace('# tpu_endpoint = "http://127.0.0.1:8470"', 'tpu_endpoint = "http://127.0.0.1:9"')
        .replace('zones = { "us-central1-a" = 8 }', 'zones = { "us-central1-a" = 4, "us-central1-b" = 4 }')
    )
    p = tmp_path / "fleet.toml"
    p.write_text(text)
    cfg = config.load(p)
    api = TpuApi.from_config(cfg.fleet)  # the fake_tpu fixture set ACTFLEET_TPU_ENDPOINT
    assert api.endpoint == fake_tpu.url and api.project == "my-gcp-project"
    assert set(api.observe(cfg.fleet.zones)) == {"us-central1-a", "us-central1-b"}
    monkeypatch.delenv("ACTFLEET_TPU_ENDPOINT")
    assert TpuApi.from_config(cfg.fleet).endpoint == "http://127.0.0.1:9"


def test_importing_the_client_does_not_import_the_tpu_library():
    code = (
        "import sys, actfleet.infra.tpu_api, actfleet.infra.commands.tpu; print('google.cloud.tpu_v2' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
