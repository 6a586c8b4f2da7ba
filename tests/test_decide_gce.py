"""gce mode's instance statuses in decide(), as a table (infra/gce_states.py maps each into the node-state
names decide reads), and end to end through the fake Compute Engine API: a spot instance preempted with
action STOP stays TERMINATED and is replaced; one preempted with action DELETE is gone and is created."""

from __future__ import annotations

import time

import pytest
from google.cloud import compute_v1

from actfleet.config import Worker, parse
from actfleet.errors import ActfleetError
from actfleet.infra import gce_states, tpu_states
from actfleet.infra.compute_api import ComputeApi
from actfleet.infra.decide import (
    CREATE,
    DELETE_ORPHAN,
    ERROR,
    HEALTHY,
    HOLD,
    PENDING,
    PREEMPTION,
    REPLACE,
    REPORT,
    ROLLOUT,
    WAIT,
    Liveness,
    Observed,
    Policy,
    WorkRecord,
    decide,
)
from actfleet.infra.observe import fleet_api, observe_fleet
from actfleet.infra.reconcile import reconcile_pass
from actfleet.infra.release_id import RELEASE_LABEL
from actfleet.infra.rollout import roll
from tests.fakes.compute_server import FakeComputeServer
from tests.test_reconcile import Recorder, write_state

NOW = 1_000_000.0
POLICY = Policy(fleet_id="acts", provision_timeout_s=600, on_provision_timeout="report")
OURS = {"actfleet-fleet": "acts", "managed-by": "actfleet"}
A0 = Worker.make("us-central1", "us-central1-a", 0)


def gce(status: str, age: float = 5.0, **kw) -> Observed:
    """A0 as the Compute client observes it: no queued resource, the status mapped to a node state."""
    return Observed(
        A0.name, A0.zone, None, gce_states.node_state(status), dict(OURS), since=NOW - age, created=NOW - age, **kw
    )


# (status, age in it, expected kind, words in the reason, the replace's cause)
TABLE = [
    ("RUNNING", 5, HEALTHY, "node READY", None),
    ("PROVISIONING", 5, PENDING, "node CREATING", None),
    ("STAGING", 5, PENDING, "node CREATING", None),
    ("PENDING", 5, PENDING, "node CREATING", None),  # flex-start waiting for capacity
    ("PROVISIONING", 601, REPORT, "over the 10 min limit", None),  # the provisioning limit applies
    ("REPAIRING", 5, PENDING, "node REPAIRING", None),
    ("STOPPING", 5, WAIT, "recreated once it is gone", None),
    ("SUSPENDING", 5, WAIT, "recreated once it is gone", None),
    ("PENDING_STOP", 5, WAIT, "recreated once it is gone", None),
    ("DEPROVISIONING", 5, WAIT, "recreated once it is gone", None),
    ("TERMINATED", 5, REPLACE, "node TERMINATED", PREEMPTION),  # spot preempted with action STOP
    ("SUSPENDED", 5, REPLACE, "node STOPPED", ERROR),
    ("STOPPED", 5, REPLACE, "node STOPPED", ERROR),
    ("SOMETHING_NEW", 5, REPORT, "unexpected state", None),  # a status newer than the library: reported
]


@pytest.mark.parametrize("status,age,kind,words,cause", TABLE, ids=[f"{r[0]}-{r[1]}s" for r in TABLE])
def test_every_instance_status_has_its_action(status, age, kind, words, cause):
    (a,) = decide([A0], {A0.name: gce(status, age)}, NOW, POLICY)
    assert (a.kind, a.cause) == (kind, cause), a.reason
    assert words in a.reason


def test_the_table_covers_every_status_compute_v1_knows():
    library = {s.name for s in compute_v1.Instance.Status if s.name != "UNDEFINED_STATUS"}
    assert gce_states.STATUSES == library
    assert {row[0] for row in TABLE} >= library


def test_the_mapping_lands_in_the_groups_decide_reads():
    assert gce_states.node_state("RUNNING") == tpu_states.NODE_READY
    assert {gce_states.node_state(s) for s in gce_states.STARTING} == {tpu_states.NODE_CREATING}
    assert gce_states.node_state("REPAIRING") in tpu_states.NODE_STARTING
    assert {gce_states.node_state(s) for s in gce_states.GOING} <= tpu_states.NODE_GOING
    assert {gce_states.node_state(s) for s in gce_states.BROKEN} <= tpu_states.NODE_BROKEN


def test_missing_is_created_and_labelled_but_undesired_is_an_orphan():
    other = Observed("tpu-us-central1-a-7", A0.zone, None, "READY", dict(OURS), since=NOW)
    actions = decide([A0], {other.name: other}, NOW, POLICY)
    assert [(a.worker, a.kind) for a in actions] == [(A0.name, CREATE), (other.name, DELETE_ORPHAN)]


def test_running_is_judged_by_the_worker_records_as_in_the_other_modes():
    boot = Policy(fleet_id="acts", boot_timeout_s=1800, heartbeat_timeout_s=900)
    never = decide([A0], {A0.name: gce("RUNNING", age=1801)}, NOW, boot, liveness=Liveness({}))
    assert never[0].kind == REPLACE and never[0].reason.startswith("never started work")
    stalled = Liveness({A0.name: WorkRecord(NOW - 901, "working")})
    assert decide([A0], {A0.name: gce("RUNNING", age=4000)}, NOW, boot, liveness=stalled)[0].reason.startswith(
        "stalled"
    )
    fresh = Liveness({A0.name: WorkRecord(NOW - 10, "working")})
    assert decide([A0], {A0.name: gce("RUNNING", age=4000)}, NOW, boot, liveness=fresh)[0].kind == HEALTHY


# ---------------------------------------------------------------------------------------------- end to end

A = "us-central1-a"
RC = {"actfleet-fleet": "rc", "managed-by": "actfleet"}


def gce_cfg(tmp_path, count: int):
    return parse(
        {
            "fleet": {
                "id": "rc",
                "project": "fake-project",
                "region": "us-central1",
                "zones": {A: count},
                "mode": "gce",
                "accelerator_type": "v6e-4",
            },
            "repo": {"url": "https://example.com/r.git", "commit": "d" * 40},
            "storage": {"bucket": "rc-activations"},
            "state": {"path": str(tmp_path / "state")},
            "job": {"model": "m", "input": "i", "layers": [1], "store": str(tmp_path / "store")},
        }
    )


def w(i: int) -> str:
    return f"tpu-us-central1-a-{i}"


@pytest.fixture
def fake():
    with FakeComputeServer.start(port=0, zones=(A,)) as f:
        yield f


def test_preempted_stop_is_replaced_and_preempted_delete_is_created(tmp_path, fake, monkeypatch):
    cfg = gce_cfg(tmp_path, 3)
    monkeypatch.setenv("ACTFLEET_COMPUTE_ENDPOINT", fake.url)
    api = fleet_api(cfg.fleet)
    assert isinstance(api, ComputeApi) and api.fleet_id == "rc"
    for i, action in enumerate(("STOP", "DELETE", "STOP")):
        fake.insert_direct(
            A,
            w(i),
            project="fake-project",
            labels=RC,
            scheduling={"provisioningModel": "SPOT", "instanceTerminationAction": action},
        )
    fake.preempt(A, w(0))  # STOP: stays, TERMINATED
    fake.preempt(A, w(1))  # DELETE: gone
    view = observe_fleet(api, [A])
    assert view.nodes[w(0)].status == "TERMINATED" and w(1) not in view.observed
    assert view.api_calls == 1  # one zone, one page
    write_state(cfg, [w(0), w(1), w(2)])
    apply = Recorder()
    report = reconcile_pass(cfg, api=api, apply=apply)
    assert [(a.worker, a.kind, a.cause) for a in report.actions] == [
        (w(0), REPLACE, PREEMPTION),
        (w(1), CREATE, None),
        (w(2), HEALTHY, None),
    ]
    # One apply: the TERMINATED one through -replace of its google_compute_instance, the gone one recreated.
    assert apply.calls == [
        {
            "replace": [f'google_compute_instance.workers["{w(0)}"]', f'google_compute_instance.workers["{w(1)}"]'],
            "targets": [],
            "destroy": False,
        }
    ]


def test_an_orphan_instance_is_deleted_through_the_compute_api(tmp_path, fake):
    cfg = gce_cfg(tmp_path, 1)
    api = ComputeApi("fake-project", fake.url, fleet_id="rc", retries=1, initial_backoff=0.01)
    fake.insert_direct(A, w(0), project="fake-project", labels=RC)
    fake.insert_direct(A, w(5), project="fake-project", labels=RC)  # labelled, not desired, not in the state
    report = reconcile_pass(cfg, api=api, apply=Recorder())
    assert [(a.worker, a.kind) for a in report.actions][-1] == (w(5), DELETE_ORPHAN)
    assert report.api_deletes["deleted"] == [w(5)] and fake.status_of(A, w(5)) is None
    assert fake.status_of(A, w(0)) == "RUNNING"


# ------------------------------------------------------------------- rollout, halt and backoff in gce mode


def fleet_of(n: int):
    return [Worker.make("us-central1", "us-central1-a", i) for i in range(n)]


def gce_named(w: Worker, status: str, release: str, age: float) -> Observed:
    labels = {**OURS, RELEASE_LABEL: release}
    return Observed(w.name, w.zone, None, gce_states.node_state(status), labels, since=NOW - age, created=NOW - age)


def test_a_rollout_moves_running_instances_of_the_old_release_in_waves():
    desired = fleet_of(4)
    observed = {w.name: gce_named(w, "RUNNING", "rold", 3600) for w in desired}
    actions = decide(desired, observed, NOW, POLICY)
    rolled = roll(actions, desired, observed, NOW, POLICY, "rnew")
    moved = [a for a in rolled.actions if a.kind == REPLACE]
    assert len(moved) == 1 and moved[0].cause == ROLLOUT  # max_unavailable 10% of 4: at least one at a time


def test_the_breaker_halts_a_release_whose_instances_never_start_work():
    desired = fleet_of(3)
    policy = Policy(fleet_id="acts", boot_timeout_s=1800, halt_after_failed_boots=3)
    observed = {w.name: gce_named(w, "RUNNING", "rnew", 1801) for w in desired}
    actions = decide(desired, observed, NOW, policy, liveness=Liveness({}))
    assert {a.kind for a in actions} == {REPLACE}
    rolled = roll(actions, desired, observed, NOW, policy, "rnew", liveness=Liveness({}))
    assert rolled.releases["rnew"].halted_at == NOW
    assert {a.kind for a in rolled.actions} == {HOLD}  # deleted through the Compute API, not recreated


def test_a_create_that_met_a_stockout_backs_off(tmp_path, fake):
    """The apply's insert ends in ZONE_RESOURCE_POOL_EXHAUSTED (the instance never appears): the next pass
    waits out the backoff instead of creating again."""
    cfg = gce_cfg(tmp_path, 1)
    api = ComputeApi("fake-project", fake.url, fleet_id="rc", retries=0)
    fake.set_stockout(A)
    errors = []

    def apply(cfg, *, replace, targets, destroy, holds=None):  # what the google provider would do
        try:
            api.insert_instance(A, {"name": w(0), "machineType": "ct6e-standard-4t", "labels": RC})
        except ActfleetError as e:
            errors.append(str(e))
            raise

    clock = [time.time()]
    first = reconcile_pass(cfg, api=api, apply=apply, clock=lambda: clock[0])
    assert [a.kind for a in first.actions] == [CREATE] and "ZONE_RESOURCE_POOL_EXHAUSTED" in errors[0]
    clock[0] += 60
    second = reconcile_pass(cfg, api=api, apply=apply, clock=lambda: clock[0])
    assert [a.kind for a in second.actions] == [WAIT] and second.actions[0].next_attempt is not None
    assert len(errors) == 1  # no second insert while backing off


def test_status_shows_compute_engines_own_status_beside_the_plan(tmp_path, fake):
    from actfleet.infra.commands.status import take_snapshot

    cfg = gce_cfg(tmp_path, 2)
    api = ComputeApi("fake-project", fake.url, fleet_id="rc", retries=0)
    fake.insert_direct(A, w(0), project="fake-project", labels=RC)
    fake.insert_direct(A, w(1), project="fake-project", labels=RC)
    fake.set_status(A, w(1), "SUSPENDED")
    snap = take_snapshot(cfg, api=api, with_job=False)
    rows = {r["worker"]: (r["node_state"], r["health"]) for r in snap.rows}
    assert rows == {w(0): ("RUNNING", HEALTHY), w(1): ("SUSPENDED", REPLACE)}
