"""infra/rollout.py: rolling waves and the circuit breaker, as a table over plan() (decide, then roll), plus a
multi-pass walk of a whole rollout that checks the wave bound at every pass."""

from __future__ import annotations

import dataclasses

import pytest

from actfleet.config import Worker
from actfleet.infra.decide import (
    CREATE,
    DRAIN,
    HEALTHY,
    HOLD,
    REPLACE,
    WAIT,
    Liveness,
    Observed,
    Policy,
    Remembered,
    WorkRecord,
    phase,
)
from actfleet.infra.plan import plan
from actfleet.infra.rollout import RELEASE_LABEL, ReleaseMemory, max_unavailable, roll

NOW = 1_000_000.0
DAY = 86400.0
OLD, NEW = "rold", "rnew"
FLEET = [Worker.make("us-central1", "us-central1-a", i) for i in range(10)]
POLICY = Policy(fleet_id="acts", boot_timeout_s=1800, heartbeat_timeout_s=900, max_unavailable="10%")


def labels(release):
    return {"actfleet-fleet": "acts", "managed-by": "actfleet", **({RELEASE_LABEL: release} if release else {})}


def ready(w, release=OLD, created_ago=DAY, health=""):
    return Observed(
        w.name, w.zone, "ACTIVE", "READY", labels(release), NOW - created_ago, NOW - created_ago, health=health
    )


def booting(w, release=NEW, age=60):
    return Observed(w.name, w.zone, "PROVISIONING", None, labels(release), NOW - age)


def working(*ws, ago=30, state="working"):
    return {w.name: WorkRecord(NOW - ago, state) for w in ws}


def run(observed, *, records=None, history=None, releases=None, policy=POLICY, judged=True, now=NOW):
    liveness = Liveness(records or {}, judged=judged)
    # Each worker has been in its state since its `since` (as if earlier passes had seen it).
    seen = {o.name: Remembered(phase=phase(o), since=o.since) for o in observed}
    history = {
        **seen,
        **{
            n: dataclasses.replace(h, phase=seen[n].phase, since=seen[n].since) if n in seen else h
            for n, h in (history or {}).items()
        },
    }
    p = plan(
        FLEET,
        {o.name: o for o in observed},
        now,
        policy,
        history=history,
        managed={w.name for w in FLEET},
        liveness=liveness,
        release=NEW,
        releases=releases,
    )
    return p


def kinds(p):
    return {a.worker: a.kind for a in p.actions}


ALL_OLD = [ready(w) for w in FLEET]
ALL_WORKING = working(*FLEET)


def test_max_unavailable_counts_and_percentages():
    assert max_unavailable("10%", 1000) == 100
    assert max_unavailable("10%", 5) == 1  # at least one: a rollout always moves
    assert max_unavailable(3, 1000) == 3
    assert max_unavailable("100%", 7) == 7


def test_off_without_a_release():
    actions = run(ALL_OLD, records=ALL_WORKING).actions
    r = roll(actions, FLEET, {o.name: o for o in ALL_OLD}, NOW, POLICY, "")
    assert r.actions == actions and r.view == {"release": None}


def test_a_changed_release_drains_one_wave_and_leaves_the_rest_working():
    p = run(ALL_OLD, records=ALL_WORKING)
    k = kinds(p)
    assert k[FLEET[0].name] == DRAIN  # 10% of 10
    assert all(k[w.name] == HEALTHY for w in FLEET[1:])
    assert p.history[FLEET[0].name].drain_requested == NOW
    assert p.rollout["wave"] == 1 and p.rollout["waiting_for"] == [FLEET[0].name]
    assert p.rollout["workers"][FLEET[3].name] == {"release": OLD, "target": NEW}
    assert "told to drain" in p.actions[0].reason


def test_a_wave_is_max_unavailable_workers():
    p = run(ALL_OLD, records=ALL_WORKING, policy=dataclasses.replace(POLICY, max_unavailable=3))
    assert [w for w, k in kinds(p).items() if k == DRAIN] == [w.name for w in FLEET[:3]]


def test_a_worker_that_drained_is_replaced_on_the_new_release():
    history = {FLEET[0].name: Remembered(drain_requested=NOW - 120)}
    records = {**ALL_WORKING, FLEET[0].name: WorkRecord(NOW - 60, "drained")}
    p = run(ALL_OLD, records=records, history=history)
    a = p.actions[0]
    assert (a.kind, a.cause) == (REPLACE, "rollout") and "drained" in a.reason
    assert p.history[FLEET[0].name].rolled == NEW and p.history[FLEET[0].name].drain_requested is None
    assert sum(k == DRAIN for k in kinds(p).values()) == 0  # the next wave waits for this one to start


def test_a_worker_still_draining_is_waited_for_then_replaced_at_the_drain_timeout():
    history = {FLEET[0].name: Remembered(drain_requested=NOW - 60)}
    p = run(ALL_OLD, records=ALL_WORKING, history=history)
    assert kinds(p)[FLEET[0].name] == HEALTHY and p.rollout["waiting_for"] == [FLEET[0].name]
    history = {FLEET[0].name: Remembered(drain_requested=NOW - POLICY.drain_timeout_s - 1)}
    p = run(ALL_OLD, records=ALL_WORKING, history=history)
    assert kinds(p)[FLEET[0].name] == REPLACE


def test_the_next_wave_waits_until_the_last_one_started_work():
    observed = [booting(FLEET[0]), *ALL_OLD[1:]]
    history = {FLEET[0].name: Remembered(rolled=NEW)}
    p = run(observed, records=ALL_WORKING, history=history)
    assert DRAIN not in kinds(p).values() and p.rollout["waiting_for"] == [FLEET[0].name]
    # READY on the new release with a record since its node was made: started; the next wave goes.
    observed = [ready(FLEET[0], NEW, created_ago=600), *ALL_OLD[1:]]
    p = run(observed, records=ALL_WORKING, history=history)
    assert p.history[FLEET[0].name].rolled == ""
    assert kinds(p)[FLEET[1].name] == DRAIN and p.rollout["wave"] == 1


def test_ready_without_a_record_since_its_node_was_made_has_not_started():
    observed = [ready(FLEET[0], NEW, created_ago=600), *ALL_OLD[1:]]
    records = {**ALL_WORKING, FLEET[0].name: WorkRecord(NOW - 3600, "working")}  # a past life's record
    p = run(observed, records=records, history={FLEET[0].name: Remembered(rolled=NEW)})
    assert DRAIN not in kinds(p).values()


def test_still_booting_old_workers_move_first_and_without_a_drain():
    observed = [*ALL_OLD[:9], booting(FLEET[9], release=OLD)]
    p = run(observed, records=ALL_WORKING)
    a = {x.worker: x for x in p.actions}[FLEET[9].name]
    assert (a.kind, a.cause) == (REPLACE, "rollout")
    assert DRAIN not in kinds(p).values()


def test_records_not_judged_means_no_drain_the_wave_is_replaced():
    p = run(ALL_OLD, judged=False)
    assert kinds(p)[FLEET[0].name] == REPLACE and p.history[FLEET[0].name].rolled == NEW


def test_a_preemption_repair_is_never_held_back_by_a_rollout():
    preempted = Observed(FLEET[5].name, FLEET[5].zone, "SUSPENDED", None, labels(OLD), NOW - 10, initiator="SERVICE")
    observed = [booting(FLEET[0]), *ALL_OLD[1:5], preempted, *ALL_OLD[6:]]
    p = run(observed, records=ALL_WORKING, history={FLEET[0].name: Remembered(rolled=NEW)})
    a = {x.worker: x for x in p.actions}[FLEET[5].name]
    assert (a.kind, a.cause) == (REPLACE, "preemption")  # while the wave is still in flight


def test_workers_made_before_releases_existed_are_left_alone():
    p = run([ready(w, release="") for w in FLEET], records=ALL_WORKING)
    assert set(kinds(p).values()) == {HEALTHY}


def never_booted(w):
    return ready(w, NEW, created_ago=2 * 3600)  # READY two hours, no worker record


def test_three_failed_boots_in_a_row_halt_the_release():
    observed = [never_booted(w) for w in FLEET[:3]] + ALL_OLD[3:]
    records = working(*FLEET[3:])
    p = run(observed, records=records)
    k = kinds(p)
    assert [k[w.name] for w in FLEET[:3]] == [HOLD] * 3  # deleted, not recreated
    assert all(k[w.name] == HEALTHY for w in FLEET[3:])  # the old release keeps running, no new wave
    assert p.rollout["halted"] and "release rnew halted: 3 workers in a row never started work" in p.rollout["halt"]
    assert "--retry-now" in p.rollout["halt"]
    assert p.releases[NEW].halted_at == NOW


def test_a_halted_release_creates_nothing_and_repairs_wait():
    releases = {NEW: ReleaseMemory(failed_in_row=3, failed=("a", "b", "c"), halted_at=NOW - 600)}
    preempted = Observed(FLEET[5].name, FLEET[5].zone, "SUSPENDED", None, labels(OLD), NOW - 10, initiator="SERVICE")
    observed = [o for o in ALL_OLD if o.name not in (FLEET[0].name, FLEET[5].name)] + [preempted]
    p = run(observed, records=ALL_WORKING, releases=releases)
    k = kinds(p)
    assert k[FLEET[0].name] == WAIT and "not created: release rnew halted" in p.actions[0].reason
    assert k[FLEET[5].name] == HOLD  # its replacement would be of the halted release
    assert CREATE not in k.values() and REPLACE not in k.values() and DRAIN not in k.values()


def test_retry_now_lifts_the_halt():
    releases = {NEW: ReleaseMemory(failed_in_row=3, halted_at=NOW - 600)}
    absent = [o for o in ALL_OLD if o.name != FLEET[0].name]
    p = run(absent, records=ALL_WORKING, releases=releases, policy=dataclasses.replace(POLICY, retry_now=True))
    assert kinds(p)[FLEET[0].name] == CREATE and not p.rollout["halted"]
    assert p.releases[NEW].failed_in_row == 0


def test_a_worker_of_the_release_seen_working_resets_the_count_and_a_mixed_pass_does_not_halt():
    observed = [never_booted(w) for w in FLEET[:3]] + [ready(FLEET[3], NEW, created_ago=600)] + ALL_OLD[4:]
    p = run(observed, records=working(*FLEET[3:]))
    assert not p.rollout["halted"] and p.releases[NEW].failed_in_row == 0
    assert [kinds(p)[w.name] for w in FLEET[:3]] == [REPLACE] * 3  # plain boot-timeout replaces


def test_failed_boots_add_up_across_passes():
    releases = {NEW: ReleaseMemory(failed_in_row=2, failed=("x", "y"))}
    observed = [never_booted(FLEET[0])] + ALL_OLD[1:]
    p = run(observed, records=working(*FLEET[1:]), releases=releases)
    assert p.rollout["halted"] and kinds(p)[FLEET[0].name] == HOLD


def test_halt_after_failed_boots_zero_is_off():
    observed = [never_booted(w) for w in FLEET[:5]] + ALL_OLD[5:]
    p = run(observed, records=working(*FLEET[5:]), policy=dataclasses.replace(POLICY, halt_after_failed_boots=0))
    assert not p.rollout["halted"] and [kinds(p)[w.name] for w in FLEET[:5]] == [REPLACE] * 5


def test_an_old_workers_stall_is_no_failed_boot_of_the_new_release():
    observed = [ready(w) for w in FLEET]
    records = {w.name: WorkRecord(NOW - 3600, "working") for w in FLEET[:3]} | working(*FLEET[3:])
    p = run(observed, records=records)
    assert not p.rollout["halted"] and p.releases[NEW].failed_in_row == 0


@pytest.mark.parametrize("spec, wave", [(1, 1), (3, 3), ("50%", 5)])
def test_a_whole_rollout_walked_pass_by_pass_never_exceeds_the_wave(spec, wave):
    """Carry out each pass's actions (drained workers report "drained", replaced ones boot and start on the
    new release by the next pass) until every worker runs the new release."""
    policy = dataclasses.replace(POLICY, max_unavailable=spec)
    observed = {o.name: o for o in ALL_OLD}
    records = dict(ALL_WORKING)
    history: dict = {}
    releases: dict = {}
    for n in range(100):
        now = NOW + n * 60
        records = {k: r if r.state == "drained" else WorkRecord(now - 5, r.state) for k, r in records.items()}
        liveness = Liveness(records)
        p = plan(FLEET, observed, now, policy, history=history, liveness=liveness, release=NEW, releases=releases)
        history, releases = p.history, p.releases
        unavailable = [
            w.name
            for w in FLEET
            if history.get(w.name, Remembered()).drain_requested or history.get(w.name, Remembered()).rolled
        ]
        assert len(unavailable) <= wave, (n, unavailable)
        for a in p.actions:
            w = next(x for x in FLEET if x.name == a.worker)
            if a.kind == DRAIN:
                records[a.worker] = WorkRecord(now + 1, "drained")
            elif a.kind == REPLACE:
                observed[a.worker] = ready(w, NEW, created_ago=-1)  # made just after this pass
                observed[a.worker] = dataclasses.replace(observed[a.worker], since=now + 1, created=now + 1)
                records[a.worker] = WorkRecord(now + 30, "working")
        history = {k: dataclasses.replace(v, phase="", since=None) for k, v in history.items()}
        if all(o.labels[RELEASE_LABEL] == NEW for o in observed.values()) and not any(
            h.rolled or h.drain_requested for h in history.values()
        ):
            break
    else:
        pytest.fail("the rollout never finished")
    assert all(kinds(p)[w.name] == HEALTHY for w in FLEET)
    assert releases[NEW].waves == -(-len(FLEET) // wave)
