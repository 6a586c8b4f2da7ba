"""decide() as a table of cases, plus properties over generated fleets (hypothesis)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actfleet.config import Worker
from actfleet.infra.decide import (ACTING_KINDS, APPLY_KINDS, CREATE, DELETE_ORPHAN, HEALTHY, KINDS, PENDING, REMOVE,
                          REPLACE, REPORT, WAIT, Action, Observed, Policy, decide, needs_apply)

NOW = 1_000_000.0
POLICY = Policy(fleet_id="acts", provision_timeout_s=600, on_provision_timeout="report")
OURS = {"actfleet-fleet": "acts", "managed-by": "actfleet"}
A0 = Worker.make("us-central1", "us-central1-a", 0)
B1 = Worker.make("us-central1", "us-central1-b", 1)


def converged(actions) -> bool:
    """True when nothing needs doing (every action is healthy, pending, wait or report)."""
    return not any(a.acts for a in actions)


def obs(qr, node, *, name=A0.name, zone=A0.zone, labels=OURS, age=5.0):
    return Observed(name=name, zone=zone, qr_state=qr, node_state=node, labels=dict(labels), since=NOW - age)


# One row per rule: (id, observation of A0 or None, policy changes, expected kind, words in the reason)
TABLE = [
    ("absent -> create", None, {}, CREATE, "absent"),
    ("active+ready -> healthy", obs("ACTIVE", "READY"), {}, HEALTHY, "READY"),
    ("vm mode: node only, ready -> healthy", obs(None, "READY"), {}, HEALTHY, "READY"),
    ("qr suspending -> replace", obs("SUSPENDING", "PREEMPTED"), {}, REPLACE, "SUSPENDING"),
    ("qr suspended -> replace", obs("SUSPENDED", None), {}, REPLACE, "SUSPENDED"),
    ("qr failed -> replace", obs("FAILED", None), {}, REPLACE, "FAILED"),
    ("node preempted -> replace", obs("ACTIVE", "PREEMPTED"), {}, REPLACE, "PREEMPTED"),
    ("node terminated -> replace", obs("ACTIVE", "TERMINATED"), {}, REPLACE, "TERMINATED"),
    ("vm mode: node preempted -> replace", obs(None, "PREEMPTED"), {}, REPLACE, "PREEMPTED"),
    ("accepted, young -> pending", obs("ACCEPTED", None), {}, PENDING, "ACCEPTED"),
    ("provisioning, young -> pending", obs("PROVISIONING", None), {}, PENDING, "PROVISIONING"),
    ("waiting for resources, young -> pending", obs("WAITING_FOR_RESOURCES", None), {}, PENDING, "WAITING"),
    ("waiting, unknown age -> pending", dataclasses.replace(obs("WAITING_FOR_RESOURCES", None), since=None), {},
     PENDING, "WAITING"),
    ("waiting past limit, policy report -> report", obs("WAITING_FOR_RESOURCES", None, age=601), {}, REPORT,
     "over the 10 min limit"),
    ("waiting past limit, policy replace -> replace", obs("WAITING_FOR_RESOURCES", None, age=601),
     {"on_provision_timeout": "replace"}, REPLACE, "over the 10 min limit"),
    ("node creating past limit, policy replace -> replace", obs("ACTIVE", "CREATING", age=601),
     {"on_provision_timeout": "replace"}, REPLACE, "node CREATING"),
    ("active, node not listed yet -> pending", obs("ACTIVE", None, age=5), {}, PENDING, "not listed yet"),
    ("active, node gone for long -> replace", obs("ACTIVE", None, age=500), {}, REPLACE, "node is gone"),
    ("qr deleting -> wait", obs("DELETING", "READY"), {}, WAIT, "DELETING"),
    ("node stopping -> wait", obs("ACTIVE", "STOPPING"), {}, WAIT, "STOPPING"),
    ("unknown state -> report", obs("STATE_UNSPECIFIED", None), {}, REPORT, "unexpected"),
    ("same name without our label -> report", obs("ACTIVE", "READY", labels={"actfleet-fleet": "other"}), {},
     REPORT, "not ours"),
]


@pytest.mark.parametrize("case", TABLE, ids=[row[0] for row in TABLE])
def test_decide_table(case):
    _, observed, changes, kind, words = case
    actions = decide([A0], {A0.name: observed} if observed else {}, NOW, dataclasses.replace(POLICY, **changes))
    assert actions == [Action(A0.name, A0.zone, kind, actions[0].reason)]
    assert words in actions[0].reason


def test_unreachable_zone_is_left_alone_while_other_zones_are_judged():
    observed = {B1.name: obs("ACTIVE", "PREEMPTED", name=B1.name, zone=B1.zone)}
    actions = decide([A0, B1], observed, NOW, POLICY, unreachable_zones=frozenset({A0.zone}))
    assert [(a.worker, a.kind) for a in actions] == [(A0.name, WAIT), (B1.name, REPLACE)]
    assert "could not be observed" in actions[0].reason


def test_orphan_with_our_label_is_deleted_and_foreign_resources_are_ignored():
    orphan = obs("ACTIVE", "READY", name="tpu-us-central1-a-9")
    foreign = obs("ACTIVE", "READY", name="tpu-us-central1-a-8", labels={"team": "x"})
    unlabelled_other_fleet = obs("ACTIVE", "READY", name="tpu-us-central1-a-7", labels={"actfleet-fleet": "b"})
    observed = {A0.name: obs("ACTIVE", "READY"), orphan.name: orphan, foreign.name: foreign,
                unlabelled_other_fleet.name: unlabelled_other_fleet}
    actions = decide([A0], observed, NOW, POLICY)
    assert [(a.worker, a.kind) for a in actions] == [(A0.name, HEALTHY), (orphan.name, DELETE_ORPHAN)]


def test_worker_removed_from_config_is_removed_by_terraform_not_deleted_as_orphan():
    gone = obs("ACTIVE", "READY", name="tpu-us-central1-a-5")
    actions = decide([A0], {A0.name: obs("ACTIVE", "READY"), gone.name: gone}, NOW, POLICY,
                     managed={A0.name, gone.name, "tpu-us-central1-b-4"})
    assert [(a.worker, a.zone, a.kind) for a in actions] == [
        (A0.name, A0.zone, HEALTHY),
        (gone.name, "us-central1-a", REMOVE),
        ("tpu-us-central1-b-4", "us-central1-b", REMOVE),  # in state only: the apply drops it
    ]
    assert needs_apply(actions)


def test_job_complete_scales_to_zero_only_when_configured():
    observed = {A0.name: obs("ACTIVE", "READY"), B1.name: obs("ACTIVE", "READY", name=B1.name, zone=B1.zone)}
    keep = decide([A0, B1], observed, NOW, POLICY, job_complete=True, managed={A0.name, B1.name})
    assert {a.kind for a in keep} == {HEALTHY}
    zero = decide([A0, B1], observed, NOW, dataclasses.replace(POLICY, scale_to_zero=True), job_complete=True,
                  managed={A0.name})
    assert [(a.worker, a.kind) for a in zero] == [(A0.name, REMOVE), (B1.name, DELETE_ORPHAN)]
    assert all("scaling to zero" in a.reason or "holds quota" in a.reason for a in zero)


def test_undesired_resource_already_deleting_is_waited_for():
    going = obs("DELETING", None, name="tpu-us-central1-a-3")
    assert decide([], {going.name: going}, NOW, POLICY)[0].kind == WAIT


def test_policy_from_config_reads_reconcile_section():
    from actfleet.config import parse
    cfg = parse({"fleet": {"id": "acts", "project": "my-project", "region": "us-central1",
                           "zones": {"us-central1-a": 1}},
                 "repo": {"url": "https://example.com/r.git", "commit": "0" * 40},
                 "storage": {"bucket": "bkt-acts"}, "job": {"model": "m", "input": "i", "layers": [1]},
                 "reconcile": {"provision_timeout_minutes": 7, "on_provision_timeout": "replace",
                               "scale_to_zero_when_done": True}})
    assert Policy.from_config(cfg) == Policy(fleet_id="acts", provision_timeout_s=420.0,
                                              on_provision_timeout="replace", scale_to_zero=True)


# ----------------------------------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------------------------------

QR_STATES = [None, "CREATING", "ACCEPTED", "PROVISIONING", "FAILED", "DELETING", "ACTIVE", "SUSPENDING",
             "SUSPENDED", "WAITING_FOR_RESOURCES", "STATE_UNSPECIFIED"]
NODE_STATES = [None, "CREATING", "READY", "RESTARTING", "REIMAGING", "DELETING", "REPAIRING", "STOPPED",
               "STOPPING", "STARTING", "PREEMPTED", "TERMINATED", "HIDING", "HIDDEN", "UNHIDING", "UNKNOWN"]
ZONES = ["us-central1-a", "us-central1-b", "us-central1-c"]


@st.composite
def worlds(draw):
    """(desired, observed, managed, unreachable, policy, job_complete) over a small name space."""
    names = [Worker.make("us-central1", z, i) for z in ZONES for i in range(4)]
    desired = sorted(draw(st.sets(st.sampled_from(names), max_size=12)))
    observed = {}
    for w in draw(st.sets(st.sampled_from(names), max_size=12)):
        labels = draw(st.sampled_from([OURS, OURS, OURS, {"actfleet-fleet": "other"}, {}]))
        qr, node = draw(st.sampled_from(QR_STATES)), draw(st.sampled_from(NODE_STATES))
        if qr is None and node is None:
            continue
        since = draw(st.one_of(st.none(), st.floats(NOW - 100_000, NOW)))
        observed[w.name] = Observed(w.name, w.zone, qr, node, labels, since)
    managed = frozenset(w.name for w in draw(st.sets(st.sampled_from(names), max_size=12)))
    unreachable = frozenset(draw(st.sets(st.sampled_from(ZONES), max_size=1)))
    policy = Policy(fleet_id="acts", provision_timeout_s=draw(st.sampled_from([60.0, 3600.0])),
                    on_provision_timeout=draw(st.sampled_from(["report", "replace"])),
                    scale_to_zero=draw(st.booleans()))
    return desired, observed, managed, unreachable, policy, draw(st.booleans())


def carry_out(actions, observed, managed, now):
    """A model of the actor: what the world looks like after a pass carried out `actions`."""
    observed, managed = dict(observed), set(managed)
    for a in actions:
        if a.kind in (CREATE, REPLACE):
            observed[a.worker] = Observed(a.worker, a.zone, "ACCEPTED", None, OURS, now)
            managed.add(a.worker)
        elif a.kind == REMOVE:
            observed.pop(a.worker, None)
            managed.discard(a.worker)
        elif a.kind == DELETE_ORPHAN:
            observed.pop(a.worker, None)
    return observed, frozenset(managed)


@settings(max_examples=200, deadline=None)
@given(worlds())
def test_every_desired_worker_gets_exactly_one_action(world):
    desired, observed, managed, unreachable, policy, done = world
    actions = decide(desired, observed, NOW, policy, unreachable, done, managed)
    names = [a.worker for a in actions]
    assert len(names) == len(set(names)), "one action per name"
    assert all(a.kind in KINDS and a.reason for a in actions)
    if not (done and policy.scale_to_zero):
        assert names[:len(desired)] == [w.name for w in desired]
    # Anything acted upon is either desired, managed by Terraform or labelled ours.
    for a in actions:
        if a.acts and a.kind not in (CREATE, REPLACE):
            assert a.worker in managed or observed[a.worker].labels.get("actfleet-fleet") == "acts"


@settings(max_examples=200, deadline=None)
@given(worlds())
def test_a_healthy_worker_is_never_replaced_or_removed(world):
    desired, observed, managed, unreachable, policy, done = world
    actions = decide(desired, observed, NOW, policy, unreachable, done, managed)
    by_name = {a.worker: a for a in actions}
    for w in desired:
        o = observed.get(w.name)
        healthy = (o is not None and o.labels.get("actfleet-fleet") == "acts"
                   and o.qr_state in (None, "ACTIVE") and o.node_state == "READY")
        if healthy and not (done and policy.scale_to_zero):
            assert by_name[w.name].kind == (WAIT if w.zone in unreachable else HEALTHY)


@settings(max_examples=200, deadline=None)
@given(worlds())
def test_nothing_in_an_unreachable_zone_is_touched(world):
    desired, observed, managed, unreachable, policy, done = world
    for a in decide(desired, observed, NOW, policy, unreachable, done, managed):
        if a.zone in unreachable:
            assert a.kind == WAIT


@settings(max_examples=200, deadline=None)
@given(worlds())
def test_carrying_out_the_actions_then_deciding_again_asks_for_nothing_more(world):
    desired, observed, managed, unreachable, policy, done = world
    first = decide(desired, observed, NOW, policy, unreachable, done, managed)
    after, managed_after = carry_out(first, observed, managed, NOW)
    second = decide(desired, after, NOW + 1, policy, unreachable, done, managed_after)
    assert converged(second), [a for a in second if a.kind in ACTING_KINDS]
    assert not needs_apply(second)
    # and deciding is deterministic
    assert first == decide(desired, observed, NOW, policy, unreachable, done, managed)


def test_kind_sets_are_consistent():
    assert APPLY_KINDS | {DELETE_ORPHAN} == ACTING_KINDS
    assert set(ACTING_KINDS) < set(KINDS)
