"""decide() as a table of cases, plus properties over generated fleets (hypothesis)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from actfleet.config import Worker
from actfleet.infra.decide import (
    ACTING_KINDS,
    APPLY_KINDS,
    CREATE,
    DELETE_ORPHAN,
    ERROR_CLASSES,
    HEALTHY,
    KINDS,
    PENDING,
    REMOVE,
    REPLACE,
    REPORT,
    WAIT,
    Action,
    Liveness,
    Observed,
    Policy,
    Remembered,
    WorkRecord,
    classify,
    decide,
    failure,
    needs_apply,
    phase,
    remember,
    settle,
    with_history,
)

NOW = 1_000_000.0
POLICY = Policy(fleet_id="acts", provision_timeout_s=600, on_provision_timeout="report")
OURS = {"actfleet-fleet": "acts", "managed-by": "actfleet"}
A0 = Worker.make("us-central1", "us-central1-a", 0)
B1 = Worker.make("us-central1", "us-central1-b", 1)
DAY = 86400.0


def converged(actions) -> bool:
    """True when nothing needs doing (every action is healthy, pending, wait or report)."""
    return not any(a.acts for a in actions)


def obs(qr, node, *, name=A0.name, zone=A0.zone, labels=OURS, age=5.0, **kw):
    kw.setdefault("since", NOW - age)
    return Observed(name=name, zone=zone, qr_state=qr, node_state=node, labels=dict(labels), **kw)


def ready(age=5.0, created_ago=DAY):
    """A READY node, in that state for `age` seconds, created `created_ago` seconds ago."""
    return obs("ACTIVE", "READY", age=age, created=NOW - created_ago)


def records(heartbeat_ago=None, state="working"):
    return Liveness({A0.name: WorkRecord(NOW - heartbeat_ago, state)} if heartbeat_ago is not None else {})


def backing_off(attempts=2, due_in=300.0):
    return {
        A0.name: Remembered(
            attempts=attempts,
            next_attempt=NOW + due_in,
            error={"code": "PERMISSION_DENIED", "message": "no", "class": "permission"},
        )
    }


# One row per rule: (id, observation of A0 or None, policy changes, expected kind, words in the reason,
# and optionally decide()'s liveness/history arguments and fields the Action must carry)
TABLE = [
    ("absent -> create", None, {}, CREATE, "absent"),
    ("active+ready -> healthy", obs("ACTIVE", "READY"), {}, HEALTHY, "READY"),
    ("vm mode: node only, ready -> healthy", obs(None, "READY"), {}, HEALTHY, "READY"),
    ("qr suspending -> wait, never force-deleted", obs("SUSPENDING", "PREEMPTED"), {}, WAIT, "never force-deleted"),
    ("qr suspended -> replace", obs("SUSPENDED", None), {}, REPLACE, "SUSPENDED"),
    (
        "qr suspended by the service -> replace, a preemption",
        obs("SUSPENDED", None, initiator="SERVICE"),
        {},
        REPLACE,
        "preempted",
        {},
        {"cause": "preemption"},
    ),
    (
        "qr failed -> replace, its reason told",
        obs("FAILED", None, error_code="PERMISSION_DENIED", error_message="tpu.nodes.create denied"),
        {},
        REPLACE,
        "PERMISSION_DENIED: tpu.nodes.create denied",
        {},
        {
            "cause": "error",
            "error": {"code": "PERMISSION_DENIED", "message": "tpu.nodes.create denied", "class": "permission"},
        },
    ),
    ("qr failed without a reason -> replace", obs("FAILED", None), {}, REPLACE, "FAILED"),
    (
        "node preempted -> replace, a preemption",
        obs("ACTIVE", "PREEMPTED"),
        {},
        REPLACE,
        "PREEMPTED",
        {},
        {"cause": "preemption"},
    ),
    ("node terminated -> replace", obs("ACTIVE", "TERMINATED"), {}, REPLACE, "TERMINATED"),
    ("vm mode: node preempted -> replace", obs(None, "PREEMPTED"), {}, REPLACE, "PREEMPTED"),
    ("accepted, young -> pending", obs("ACCEPTED", None), {}, PENDING, "ACCEPTED"),
    ("provisioning, young -> pending", obs("PROVISIONING", None), {}, PENDING, "PROVISIONING"),
    ("waiting for resources, young -> pending", obs("WAITING_FOR_RESOURCES", None), {}, PENDING, "WAITING"),
    (
        "waiting, unknown age -> pending",
        dataclasses.replace(obs("WAITING_FOR_RESOURCES", None), since=None),
        {},
        PENDING,
        "WAITING",
    ),
    (
        "waiting past limit, policy report -> report",
        obs("WAITING_FOR_RESOURCES", None, age=601),
        {},
        REPORT,
        "over the 10 min limit",
    ),
    (
        "waiting past limit, policy replace -> replace",
        obs("WAITING_FOR_RESOURCES", None, age=601),
        {"on_provision_timeout": "replace"},
        REPLACE,
        "over the 10 min limit",
    ),
    (
        "node creating past limit, policy replace -> replace",
        obs("ACTIVE", "CREATING", age=601),
        {"on_provision_timeout": "replace"},
        REPLACE,
        "node CREATING",
    ),
    (
        "long-lived node just entered REPAIRING -> pending, not over the limit",
        obs("ACTIVE", "REPAIRING", age=30, created=NOW - 10 * DAY),
        {"on_provision_timeout": "replace"},
        PENDING,
        "REPAIRING",
    ),
    (
        "REPAIRING for longer than the limit -> report",
        obs("ACTIVE", "REPAIRING", age=601),
        {},
        REPORT,
        "node REPAIRING for 10 min",
    ),
    ("active, node not listed yet -> pending", obs("ACTIVE", None, age=5), {}, PENDING, "not listed yet"),
    ("active, node gone for long -> replace", obs("ACTIVE", None, age=500), {}, REPLACE, "node is gone"),
    ("qr deleting -> wait", obs("DELETING", "READY"), {}, WAIT, "DELETING"),
    ("node stopping -> wait", obs("ACTIVE", "STOPPING"), {}, WAIT, "STOPPING"),
    ("unknown state -> report", obs("STATE_UNSPECIFIED", None), {}, REPORT, "unexpected"),
    # Found on the real API (issue 24 item 6): states and health that must not be reported forever.
    ("node UNKNOWN, just now -> pending", obs("ACTIVE", "UNKNOWN", age=30), {}, PENDING, "node UNKNOWN"),
    (
        "node UNKNOWN (failed repair) past the grace -> replace",
        obs("ACTIVE", "UNKNOWN", age=121),
        {},
        REPLACE,
        "node UNKNOWN for 2 min",
        {},
        {"cause": "error"},
    ),
    ("node HIDDEN past the grace -> replace", obs("ACTIVE", "HIDDEN", age=600), {}, REPLACE, "node HIDDEN"),
    ("vm mode: node UNKNOWN past the grace -> replace", obs(None, "UNKNOWN", age=600), {}, REPLACE, "UNKNOWN"),
    (
        "ready, health TIMEOUT, young -> pending",
        obs("ACTIVE", "READY", age=60, health="TIMEOUT"),
        {"heartbeat_timeout_s": 900.0},
        PENDING,
        "health TIMEOUT",
    ),
    (
        "ready, health TIMEOUT past the heartbeat timeout, no records -> replace",
        obs("ACTIVE", "READY", age=901, health="TIMEOUT"),
        {"heartbeat_timeout_s": 900.0},
        REPLACE,
        "health TIMEOUT for 15 min",
        {},
        {"cause": "error"},
    ),
    (
        "ready, health TIMEOUT for long but its worker heartbeats -> healthy",
        obs("ACTIVE", "READY", age=5000, health="TIMEOUT", created=NOW - DAY),
        {"heartbeat_timeout_s": 900.0},
        HEALTHY,
        "READY",
        {"liveness": Liveness({A0.name: WorkRecord(NOW - 30, "working")})},
    ),
    (
        "ready, under maintenance for long -> pending, waited for",
        obs("ACTIVE", "READY", age=5000, health="UNHEALTHY_MAINTENANCE"),
        {},
        PENDING,
        "maintenance",
    ),
    (
        "same name without our label -> report",
        obs("ACTIVE", "READY", labels={"actfleet-fleet": "other"}),
        {},
        REPORT,
        "not ours",
    ),
    # The boot and heartbeat rules (the job's worker records)
    (
        "ready, records not judged (job not prepared/complete) -> healthy",
        ready(age=2 * DAY),
        {},
        HEALTHY,
        "READY",
        {"liveness": Liveness(judged=False)},
    ),
    (
        "ready, no record yet, within the boot timeout -> pending",
        ready(age=29 * 60),
        {},
        PENDING,
        "worker not started yet",
        {"liveness": records()},
    ),
    (
        "ready, no record past the boot timeout -> replace: never started work",
        ready(age=31 * 60),
        {},
        REPLACE,
        "never started work",
        {"liveness": records()},
        {"cause": "error"},
    ),
    (
        "ready, only a past life's record past the boot timeout -> replace",
        ready(age=31 * 60, created_ago=40 * 60),
        {},
        REPLACE,
        "never started work",
        {"liveness": records(heartbeat_ago=50 * 60)},
    ),
    (
        "ready, fractional boot timeout -> replace",
        ready(age=45),
        {"boot_timeout_s": 0.5 * 60},
        REPLACE,
        "never started work",
        {"liveness": records()},
    ),
    (
        "ready, boot timeout 0 = off -> pending",
        ready(age=DAY),
        {"boot_timeout_s": 0},
        PENDING,
        "not started",
        {"liveness": records()},
    ),
    (
        "ready, fresh heartbeat -> healthy",
        ready(age=DAY),
        {},
        HEALTHY,
        "READY",
        {"liveness": records(heartbeat_ago=60)},
    ),
    (
        "ready, heartbeat older than the timeout -> replace: stalled",
        ready(age=DAY),
        {},
        REPLACE,
        "stalled",
        {"liveness": records(heartbeat_ago=16 * 60)},
        {"error": {"code": "STALLED", "message": "last heartbeat 16 min ago", "class": "stalled"}},
    ),
    (
        "ready, heartbeat timeout 0 = off -> healthy",
        ready(age=DAY),
        {"heartbeat_timeout_s": 0},
        HEALTHY,
        "READY",
        {"liveness": records(heartbeat_ago=DAY)},
    ),
    (
        "ready, worker finished long ago -> healthy",
        ready(age=DAY),
        {},
        HEALTHY,
        "finished",
        {"liveness": records(heartbeat_ago=DAY, state="finished")},
    ),
    (
        "ready, store unreadable -> healthy, never replaced on that ground",
        ready(age=DAY),
        {},
        HEALTHY,
        "unreadable",
        {"liveness": Liveness(judged=False, error="boom")},
    ),
    # Backoff of failing creates
    (
        "absent, its creates failing, not due -> wait with the next attempt",
        None,
        {},
        WAIT,
        "next attempt at",
        {"history": backing_off()},
        {"next_attempt": NOW + 300},
    ),
    (
        "absent, backoff over -> create",
        None,
        {},
        CREATE,
        "retrying a create that failed 2 times",
        {"history": backing_off(due_in=-1)},
    ),
    (
        "absent, not due, --retry-now -> create",
        None,
        {"retry_now": True},
        CREATE,
        "retrying",
        {"history": backing_off()},
    ),
    (
        "qr failed again, not due -> wait",
        obs("FAILED", None, error_code="RESOURCE_EXHAUSTED", error_message="quota"),
        {},
        WAIT,
        "FAILED: RESOURCE_EXHAUSTED: quota",
        {"history": backing_off()},
    ),
]


@pytest.mark.parametrize("case", TABLE, ids=[row[0] for row in TABLE])
def test_decide_table(case):
    _, observed, changes, kind, words, *more = case
    kwargs, fields = (more + [{}, {}])[:2]
    actions = decide(
        [A0], {A0.name: observed} if observed else {}, NOW, dataclasses.replace(POLICY, **changes), **kwargs
    )
    assert [(a.worker, a.zone, a.kind) for a in actions] == [(A0.name, A0.zone, kind)], actions[0].reason
    assert words in actions[0].reason
    for k, v in fields.items():
        assert getattr(actions[0], k) == v, k


# ----------------------------------------------------------------------------------------------------
# Memory between passes: time in state, and the backoff of failing creates
# ----------------------------------------------------------------------------------------------------


def test_bad_health_starts_its_own_clock():
    """A long-READY node turning unresponsive is judged from when its health turned, not from READY."""
    seen_ready = {A0.name: Remembered(phase="ACTIVE/READY", since=NOW - 9 * DAY)}
    turned = with_history({A0.name: obs("ACTIVE", "READY", health="TIMEOUT")}, seen_ready, NOW)
    assert turned[A0.name].since == NOW
    policy = dataclasses.replace(POLICY, heartbeat_timeout_s=900.0)
    assert decide([A0], turned, NOW + 60, policy)[0].kind == PENDING
    assert decide([A0], turned, NOW + 901, policy)[0].kind == REPLACE


def test_time_in_state_counts_from_entering_the_state_not_from_creation():
    created = NOW - 10 * DAY  # a long-lived node
    seen_ready = {A0.name: Remembered(phase="ACTIVE/READY", since=NOW - 9 * DAY)}
    repairing = {A0.name: obs("ACTIVE", "REPAIRING", created=created, since=created)}
    # First pass in REPAIRING: the clock starts now, not at creation.
    first = with_history(repairing, seen_ready, NOW)
    assert first[A0.name].since == NOW
    remembered = remember(seen_ready, first, [], NOW, acted=False)
    # An hour later, still repairing: an hour in the state, and the memory says so.
    later = with_history(repairing, remembered, NOW + 3600)
    assert later[A0.name].since == NOW
    policy = dataclasses.replace(POLICY, provision_timeout_s=7200, on_provision_timeout="replace")
    assert decide([A0], later, NOW + 3600, policy)[0].kind == PENDING
    # A first sighting while provisioning counts from creation (a resource starts in that phase).
    waiting = {A0.name: obs("WAITING_FOR_RESOURCES", None, since=NOW - 500)}
    assert with_history(waiting, {}, NOW)[A0.name].since == NOW - 500
    assert with_history({A0.name: obs("ACTIVE", "READY", since=NOW - DAY)}, {}, NOW)[A0.name].since == NOW


def test_provisioning_steps_are_one_phase():
    assert phase(obs("ACCEPTED", None)) == phase(obs("WAITING_FOR_RESOURCES", None)) == "provisioning"
    assert phase(obs("ACTIVE", "CREATING")) == "provisioning"
    assert phase(obs("ACTIVE", "REPAIRING")) == "ACTIVE/REPAIRING" != phase(obs("ACTIVE", "READY"))
    assert phase(None) == "absent"


def test_a_failed_create_backs_off_5_min_doubling_to_an_hour():
    assert [POLICY.backoff(n) / 60 for n in range(1, 8)] == [5, 10, 20, 40, 60, 60, 60]
    create = [Action(A0.name, A0.zone, CREATE, "absent")]
    history: dict = {}
    now = NOW
    for attempt in range(1, 5):
        history = remember(
            history,
            {},
            create,
            now,
            acted=True,
            apply_errors={A0.name: {"code": "PERMISSION_DENIED", "message": "denied", "class": "permission"}},
        )
        history = settle(history, {}, POLICY)  # next pass: still absent -> that create failed
        h = history[A0.name]
        assert (h.attempts, h.next_attempt, h.error["class"]) == (attempt, now + POLICY.backoff(attempt), "permission")
        assert decide([A0], {}, h.next_attempt - 1, POLICY, history=history)[0].kind == WAIT
        now = h.next_attempt
        assert decide([A0], {}, now, POLICY, history=history)[0].kind == CREATE
    # The create that finally takes resets the backoff; the errors stay counted.
    history = remember(history, {}, create, now, acted=True)
    history = settle(history, {A0.name: obs("ACCEPTED", None)}, POLICY)
    assert (history[A0.name].attempts, history[A0.name].error, history[A0.name].errors) == (0, None, 4)


def test_a_create_whose_queued_resource_failed_takes_its_reason():
    history = remember({}, {}, [Action(A0.name, A0.zone, CREATE, "absent")], NOW, acted=True)
    failed = {
        A0.name: obs(
            "FAILED",
            None,
            error_code="INVALID_ARGUMENT",
            error_message="accelerator type v5litepod-8 is not offered in us-central1-b",
        )
    }
    h = settle(history, failed, POLICY)[A0.name]
    assert h.attempts == 1 and h.error["class"] == "invalid-argument" and "not offered" in h.error["message"]


def test_a_dry_run_or_unseen_zone_judges_no_create():
    history = remember({}, {}, [Action(A0.name, A0.zone, CREATE, "absent")], NOW, acted=False)
    assert history[A0.name].last_attempt is None
    history = remember({}, {}, [Action(A0.name, A0.zone, CREATE, "absent")], NOW, acted=True)
    assert settle(history, {}, POLICY, frozenset({A0.zone}))[A0.name].last_attempt == NOW


def test_preemptions_and_errors_are_counted_apart():
    history: dict = {}
    for a in (
        Action(A0.name, A0.zone, REPLACE, "node PREEMPTED", cause="preemption"),
        Action(A0.name, A0.zone, REPLACE, "node PREEMPTED", cause="preemption"),
        Action(A0.name, A0.zone, REPLACE, "stalled", cause="error"),
    ):
        history = remember(history, {A0.name: obs("ACTIVE", "READY")}, [a], NOW, acted=True)
    assert (history[A0.name].preemptions, history[A0.name].errors) == (2, 1)


@pytest.mark.parametrize(
    "code, message, cls",
    [
        ("PERMISSION_DENIED", "Permission 'tpu.nodes.create' denied", "permission"),
        ("INVALID_ARGUMENT", "Accelerator type v5litepod-8 is not offered in zone us-central1-b", "invalid-argument"),
        ("RESOURCE_EXHAUSTED", "Quota 'TPUV5sLitepodPerProjectPerZoneForTPUAPI' exceeded", "quota"),
        ("UNKNOWN", "There is no more capacity in the zone", "quota"),
        ("INTERNAL", "something broke", "unknown"),
    ],
)
def test_errors_are_classified(code, message, cls):
    assert classify(code, message) == cls
    assert cls in ERROR_CLASSES


def test_a_failure_class_outside_error_classes_is_refused():
    assert failure("STALLED", "last heartbeat 20 min ago", "stalled")["class"] == "stalled"
    with pytest.raises(ValueError, match="'stale' is not one of permission, invalid-argument"):
        failure("STALLED", "last heartbeat 20 min ago", "stale")
    # the report's JSON schema lists the same classes and kinds
    from actfleet.infra.reconcile import REPORT_JSON_SCHEMA

    action = REPORT_JSON_SCHEMA["properties"]["actions"]["items"]
    assert action["properties"]["error"]["properties"]["class"]["enum"] == list(ERROR_CLASSES)
    assert action["properties"]["kind"]["enum"] == list(KINDS)


def test_tpu_state_names_are_the_apis_and_defined_once():
    """infra/tpu_states.py names states as google.cloud.tpu_v2 spells them, and no other infra module
    defines its own (tests/fakes/tpu_server.py, the fake, uses the proto enums themselves)."""
    import re
    from pathlib import Path

    from google.cloud.tpu_v2 import Node, QueuedResourceState

    from actfleet.infra import tpu_states

    names = {k: v for k, v in vars(tpu_states).items() if k.startswith(("QR_", "NODE_"))}
    for const, value in names.items():
        enum = QueuedResourceState.State if const.startswith("QR_") else Node.State
        for state in value if isinstance(value, frozenset) else {value}:
            assert state in enum.__members__, (const, state)
    infra = Path(tpu_states.__file__).parent
    for path in infra.rglob("*.py"):
        if path.name != "tpu_states.py":
            assert not re.findall(r"^(?:QR|NODE)_[A-Z_]+ *=", path.read_text(), re.M), path


def test_unreachable_zone_is_left_alone_while_other_zones_are_judged():
    observed = {B1.name: obs("ACTIVE", "PREEMPTED", name=B1.name, zone=B1.zone)}
    actions = decide([A0, B1], observed, NOW, POLICY, unreachable_zones=frozenset({A0.zone}))
    assert [(a.worker, a.kind) for a in actions] == [(A0.name, WAIT), (B1.name, REPLACE)]
    assert "could not be observed" in actions[0].reason


def test_orphan_with_our_label_is_deleted_and_foreign_resources_are_ignored():
    orphan = obs("ACTIVE", "READY", name="tpu-us-central1-a-9")
    foreign = obs("ACTIVE", "READY", name="tpu-us-central1-a-8", labels={"team": "x"})
    unlabelled_other_fleet = obs("ACTIVE", "READY", name="tpu-us-central1-a-7", labels={"actfleet-fleet": "b"})
    observed = {
        A0.name: obs("ACTIVE", "READY"),
        orphan.name: orphan,
        foreign.name: foreign,
        unlabelled_other_fleet.name: unlabelled_other_fleet,
    }
    actions = decide([A0], observed, NOW, POLICY)
    assert [(a.worker, a.kind) for a in actions] == [(A0.name, HEALTHY), (orphan.name, DELETE_ORPHAN)]


def test_worker_removed_from_config_is_removed_by_terraform_not_deleted_as_orphan():
    gone = obs("ACTIVE", "READY", name="tpu-us-central1-a-5")
    actions = decide(
        [A0],
        {A0.name: obs("ACTIVE", "READY"), gone.name: gone},
        NOW,
        POLICY,
        managed={A0.name, gone.name, "tpu-us-central1-b-4"},
    )
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
    zero = decide(
        [A0, B1], observed, NOW, dataclasses.replace(POLICY, scale_to_zero=True), job_complete=True, managed={A0.name}
    )
    assert [(a.worker, a.kind) for a in zero] == [(A0.name, REMOVE), (B1.name, DELETE_ORPHAN)]
    assert all("scaling to zero" in a.reason or "holds quota" in a.reason for a in zero)


def test_undesired_resource_already_deleting_is_waited_for():
    going = obs("DELETING", None, name="tpu-us-central1-a-3")
    assert decide([], {going.name: going}, NOW, POLICY)[0].kind == WAIT


def cfg_raw() -> dict:
    return {
        "fleet": {"id": "acts", "project": "my-project", "region": "us-central1", "zones": {"us-central1-a": 1}},
        "repo": {"url": "https://example.com/r.git", "commit": "0" * 40},
        "storage": {"bucket": "bkt-acts"},
        "job": {"model": "m", "input": "i", "layers": [1]},
    }


def test_policy_from_config_reads_reconcile_section():
    from actfleet.config import parse

    cfg = parse(
        {
            **cfg_raw(),
            "reconcile": {
                "provision_timeout_minutes": 7,
                "on_provision_timeout": "replace",
                "scale_to_zero_when_done": True,
            },
        }
    )
    fractional = parse({**cfg_raw(), "reconcile": {"boot_timeout_minutes": 0.5, "heartbeat_timeout_minutes": 7.5}})
    assert (Policy.from_config(fractional).boot_timeout_s, Policy.from_config(fractional).heartbeat_timeout_s) == (
        30.0,
        450.0,
    )
    assert Policy.from_config(cfg) == Policy(
        fleet_id="acts",
        provision_timeout_s=420.0,
        on_provision_timeout="replace",
        scale_to_zero=True,
        boot_timeout_s=1800.0,
        heartbeat_timeout_s=900.0,
    )


# ----------------------------------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------------------------------

QR_STATES = [
    None,
    "CREATING",
    "ACCEPTED",
    "PROVISIONING",
    "FAILED",
    "DELETING",
    "ACTIVE",
    "SUSPENDING",
    "SUSPENDED",
    "WAITING_FOR_RESOURCES",
    "STATE_UNSPECIFIED",
]
NODE_STATES = [
    None,
    "CREATING",
    "READY",
    "RESTARTING",
    "REIMAGING",
    "DELETING",
    "REPAIRING",
    "STOPPED",
    "STOPPING",
    "STARTING",
    "PREEMPTED",
    "TERMINATED",
    "HIDING",
    "HIDDEN",
    "UNHIDING",
    "UNKNOWN",
]
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
    policy = Policy(
        fleet_id="acts",
        provision_timeout_s=draw(st.sampled_from([60.0, 3600.0])),
        on_provision_timeout=draw(st.sampled_from(["report", "replace"])),
        scale_to_zero=draw(st.booleans()),
    )
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
        assert names[: len(desired)] == [w.name for w in desired]
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
        healthy = (
            o is not None
            and o.labels.get("actfleet-fleet") == "acts"
            and o.qr_state in (None, "ACTIVE")
            and o.node_state == "READY"
        )
        if healthy and not (done and policy.scale_to_zero):
            assert by_name[w.name].kind == (WAIT if w.zone in unreachable else HEALTHY)


@settings(max_examples=200, deadline=None)
@given(worlds(), st.floats(0, 14 * 60))
def test_a_worker_heartbeating_on_a_ready_node_is_never_replaced(world, heartbeat_age):
    desired, observed, managed, unreachable, policy, done = world
    observed = {n: dataclasses.replace(o, created=NOW - DAY) for n, o in observed.items()}
    liveness = Liveness({w.name: WorkRecord(NOW - heartbeat_age, "working") for w in desired})
    by_name = {
        a.worker: a for a in decide(desired, observed, NOW, policy, unreachable, done, managed, liveness=liveness)
    }
    for w in desired:
        o = observed.get(w.name)
        if (
            o is not None
            and o.labels.get("actfleet-fleet") == "acts"
            and o.qr_state in (None, "ACTIVE")
            and o.node_state == "READY"
            and not (done and policy.scale_to_zero)
        ):
            assert by_name[w.name].kind == (WAIT if w.zone in unreachable else HEALTHY)


@settings(max_examples=200, deadline=None)
@given(worlds())
@example(([A0], {A0.name: obs("SUSPENDING", "PREEMPTED")}, frozenset({A0.name}), frozenset(), POLICY, False))
def test_a_suspending_queued_resource_is_never_acted_on(world):
    desired, observed, managed, unreachable, policy, done = world
    for a in decide(desired, observed, NOW, policy, unreachable, done, managed):
        o = observed.get(a.worker)
        if o is not None and o.qr_state == "SUSPENDING" and o.labels.get("actfleet-fleet") == "acts":
            assert not a.acts, a


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
    assert APPLY_KINDS | {DELETE_ORPHAN, "hold", "drain"} == ACTING_KINDS  # hold, drain: infra/rollout.py
    assert set(ACTING_KINDS) < set(KINDS)
