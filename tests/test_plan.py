"""infra/plan.py: the one plan reconcile acts on and `actfleet status` shows.

The property: on random worlds (queued-resource and node states, ages, listings that leave a resource out,
unreachable zones, remembered history with creates awaiting judgement, Terraform's managed set, job
complete or not, worker records of any age), the `health` status shows for every worker is the action a
dry-run reconcile pass plans, with the same reason. Both run for real over one in-memory TPU API, one
store and one state directory: nothing is shared between them but what the cloud and the files say.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from hypothesis import example, given, settings
from hypothesis import strategies as st

from actfleet.config import Worker, parse
from actfleet.errors import ActfleetError
from actfleet.infra.commands.status import take_snapshot
from actfleet.infra.decide import CREATE, HEALTHY, REMOVE, WAIT, Observed, Policy, Remembered, decide, failure
from actfleet.infra.plan import plan
from actfleet.infra.reconcile import MEMORY_SCHEMA, memory_location, reconcile_pass
from actfleet.infra.terraform_layout import FLEET, state_location
from actfleet.infra.tpu_api import Node, QueuedResource, ZoneError, ZoneView
from actfleet.store import open_store
from actfleet.work_queue import WorkerProgress, done_key, prepare, worker_key

NOW = 2_000_000_000.0
A, B, C = "us-central1-a", "us-central1-b", "us-central1-c"  # C: not configured, only managed names live there
OURS = {"actfleet-fleet": "pl", "managed-by": "actfleet"}
JOB = "j1"
QR_STATES = [
    None,
    "ACCEPTED",
    "WAITING_FOR_RESOURCES",
    "PROVISIONING",
    "CREATING",
    "ACTIVE",
    "ACTIVE",
    "SUSPENDING",
    "SUSPENDED",
    "FAILED",
    "DELETING",
    "STATE_UNSPECIFIED",
]
NODE_STATES = [
    None,
    "CREATING",
    "READY",
    "READY",
    "REPAIRING",
    "PREEMPTED",
    "TERMINATED",
    "STOPPED",
    "STOPPING",
    "DELETING",
    "UNKNOWN",
]
# What real workers mostly look like (healthy, on their way up, preempted), drawn as often as any pair.
PAIRS = [("ACTIVE", "READY")] * 4 + [
    (None, "READY"),
    ("ACCEPTED", None),
    ("PROVISIONING", None),
    ("ACTIVE", "CREATING"),
    ("SUSPENDING", "PREEMPTED"),
    ("SUSPENDED", "PREEMPTED"),
    ("FAILED", None),
    ("ACTIVE", None),
    ("DELETING", "DELETING"),
]
STATE_PAIRS = st.sampled_from(PAIRS) | st.tuples(st.sampled_from(QR_STATES), st.sampled_from(NODE_STATES))
# A worker's own record: (its last heartbeat, seconds ago, -1 for none; its state)
RECORDS = st.tuples(
    st.sampled_from([-1.0, 30.0, 200.0, 1000.0, 20_000.0]), st.sampled_from(["working", "working", "idle", "finished"])
)
NAMES = [f"tpu-{z}-{i}" for z in (A, B) for i in range(3)] + [f"tpu-{C}-0"]
AGES = [0.0, 30.0, 200.0, 1000.0, 3000.0, 20_000.0]  # seconds: around every limit the policy has
CREATED_AGES = AGES + [86_400.0] * 3  # often long-lived, so that heartbeats are this node's own


def cfg_for(root: Path, *, scale_to_zero: bool, on_timeout: str):
    return parse(
        {
            "fleet": {"id": "pl", "project": "fake-project", "region": "us-central1", "zones": {A: 2, B: 2}},
            "repo": {"url": "https://example.com/r.git", "commit": "d" * 40},
            "storage": {"bucket": "pl-activations"},
            "state": {"path": str(root / "state")},
            "job": {"name": JOB, "model": "m", "input": "i", "layers": [1], "store": str(root / "store")},
            "reconcile": {
                "watch_job": True,
                "scale_to_zero_when_done": scale_to_zero,
                "on_provision_timeout": on_timeout,
                "provision_timeout_minutes": 30,
                "boot_timeout_minutes": 10,
                "heartbeat_timeout_minutes": 5,
            },
        }
    )


class MemoryApi:
    """The TpuApi surface observe_inputs reads: per-zone lists (which may leave a resource out, as real
    ones do) and GETs, over a fixed world. A zone may fail its lists, or only its GETs."""

    def __init__(self, world: dict):
        self.world, self.calls = world, 0

    def observe(self, zones):
        out = {}
        for zone in zones:
            self.calls += 2
            if self.world["zones"].get(zone) == "lists fail":
                out[zone] = ZoneError("503 service unavailable")
                continue
            res = [r for r in self.world["resources"].values() if r["zone"] == zone and not r["unlisted"]]
            out[zone] = ZoneView(
                tuple(q for r in res if (q := self._qr(r))), tuple(n for r in res if (n := self._node(r)))
            )
        return out

    def get_queued_resource(self, zone, name):
        return self._get(zone, name, self._qr)

    def get_node(self, zone, name):
        return self._get(zone, name, self._node)

    def _get(self, zone, name, make):
        self.calls += 1
        if self.world["zones"].get(zone) in ("lists fail", "gets fail"):
            raise ActfleetError(f"TPU API: {name}: 503 service unavailable")
        r = self.world["resources"].get(name)
        return make(r) if r is not None and r["zone"] == zone else None

    @staticmethod
    def _qr(r):
        if r["qr"] is None:
            return None
        return QueuedResource(
            r["name"],
            r["zone"],
            r["qr"],
            r["initiator"],
            dict(r["labels"]),
            (r["name"],) if r["node"] else (),
            NOW - r["created_ago"],
            error_code=r["error_code"] if r["qr"] == "FAILED" else "",
            error_message="no capacity" if r["qr"] == "FAILED" else "",
        )

    @staticmethod
    def _node(r):
        if r["node"] is None:
            return None
        return Node(
            r["name"],
            r["zone"],
            r["node"],
            dict(r["labels"]),
            NOW - r["created_ago"],
            queued_resource=r["name"] if r["qr"] else "",
        )


@st.composite
def resources(draw, name):
    zone = name[len("tpu-") :].rsplit("-", 1)[0]
    qr, node = draw(STATE_PAIRS)
    if qr is None and node is None:
        return None
    return {
        "name": name,
        "zone": zone,
        "qr": qr,
        "node": node,
        "labels": draw(st.sampled_from([OURS, OURS, OURS, {"actfleet-fleet": "other"}])),
        "created_ago": draw(st.sampled_from(CREATED_AGES)),
        "unlisted": draw(st.sampled_from([False, False, True])),
        "initiator": draw(st.sampled_from(["USER", "SERVICE"])),
        "error_code": draw(st.sampled_from(["", "RESOURCE_EXHAUSTED", "PERMISSION_DENIED"])),
    }


@st.composite
def memories(draw):
    """A remembered worker: the phase it was in and since when, and maybe a create awaiting judgement or
    a backoff under way (what settle() judges: the step status once skipped)."""
    attempts = draw(st.integers(0, 3))
    return Remembered(
        phase=draw(st.sampled_from(["", "absent", "provisioning", "ACTIVE/READY", "-/READY", "SUSPENDED/-"])),
        since=NOW - draw(st.sampled_from(AGES)),
        attempts=attempts,
        next_attempt=NOW + draw(st.sampled_from([-100.0, 100.0, 5000.0])) if attempts else None,
        last_attempt=NOW - draw(st.sampled_from(AGES)) if draw(st.booleans()) else None,
        pending_error=draw(st.sampled_from([None, failure("PERMISSION_DENIED", "no")])),
        error=failure("RESOURCE_EXHAUSTED", "no capacity") if attempts else None,
    )


@st.composite
def worlds(draw):
    res = {}
    for name in NAMES:
        r = draw(resources(name))
        if r is not None:
            res[name] = r
    return {
        "resources": res,
        "zones": {z: draw(st.sampled_from(["ok"] * 6 + ["lists fail", "gets fail"])) for z in (A, B, C)},
        "history": {n: draw(memories()) for n in draw(st.sets(st.sampled_from(NAMES)))},
        # None: no state yet; "corrupt": unreadable (reconcile cannot plan, and status must say so)
        "managed": draw(
            st.sampled_from(["some"] * 6 + [None, "corrupt"]).flatmap(
                lambda m: st.sets(st.sampled_from(NAMES)) if m == "some" else st.just(m)
            )
        ),
        "job": draw(st.sampled_from(["absent", "running", "running", "complete"])),
        "records": {n: rec for n in NAMES if (rec := draw(st.none() | RECORDS)) is not None},
        "scale_to_zero": draw(st.booleans()),
        "on_timeout": draw(st.sampled_from(["report", "replace"])),
    }


def write_world(root: Path, world: dict):
    """The files both commands read: Terraform's state, reconcile's memory, the job and its worker records."""
    cfg = cfg_for(root, scale_to_zero=world["scale_to_zero"], on_timeout=world["on_timeout"])
    if world["managed"] is not None:
        path = Path(state_location(cfg, FLEET))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            "{not json"
            if world["managed"] == "corrupt"
            else json.dumps(
                {
                    "version": 4,
                    "resources": [
                        {
                            "mode": "managed",
                            "type": "terraform_data",
                            "name": "workers",
                            "each": "map",
                            "instances": [{"index_key": n, "attributes": {}} for n in sorted(world["managed"])],
                        }
                    ],
                }
            )
        )
    mem_store, mem_key = memory_location(cfg)
    mem_store.put(
        mem_key,
        json.dumps(
            {"schema": MEMORY_SCHEMA, "workers": {n: h.to_json() for n, h in world["history"].items()}}
        ).encode(),
    )
    store = open_store(cfg.job.store)
    if world["job"] != "absent":
        prepare(store, JOB, input="data.jsonl", fingerprint="f" * 64, rows=20, unit_rows=10, options={})
        for unit in range(2 if world["job"] == "complete" else 1):
            store.put(
                done_key(JOB, unit),
                json.dumps(
                    {
                        "unit": unit,
                        "start": unit * 10,
                        "stop": unit * 10 + 10,
                        "worker": NAMES[0],
                        "attempt": 1,
                        "rows_stored": 10,
                        "tokens": 5,
                        "skipped": {},
                        "shards": [],
                        "committed_at": NOW - 50,
                        "seconds": 1.0,
                    }
                ).encode(),
            )
        for name, (ago, state) in world["records"].items():
            wp = WorkerProgress(name, state=state, last_heartbeat=None if ago < 0 else NOW - ago)
            store.put(worker_key(JOB, name), json.dumps(asdict(wp)).encode())
    return cfg


def verdicts_of_both(world: dict):
    root = Path(tempfile.mkdtemp(prefix="actfleet-plan-"))
    try:
        cfg = write_world(root, world)
        snap = take_snapshot(cfg, api=MemoryApi(world), now=NOW)
        report = reconcile_pass(cfg, dry_run=True, api=MemoryApi(world), clock=lambda: NOW)
    finally:
        shutil.rmtree(root)
    shown = {r["worker"]: (r["health"], r["reason"]) for r in snap.rows if r["health"] is not None}
    planned = {a.worker: (a.kind, a.reason) for a in report.actions}
    return shown, planned, snap, report


def a_world(**kw):
    world = {
        "resources": {},
        "zones": {A: "ok", B: "ok", C: "ok"},
        "history": {},
        "managed": None,
        "job": "absent",
        "records": {},
        "scale_to_zero": False,
        "on_timeout": "report",
    }
    return world | kw


def ready(name):
    zone = name[len("tpu-") :].rsplit("-", 1)[0]
    return {
        "name": name,
        "zone": zone,
        "qr": "ACTIVE",
        "node": "READY",
        "labels": OURS,
        "created_ago": 3000.0,
        "unlisted": False,
        "initiator": "USER",
        "error_code": "",
    }


A0 = "tpu-us-central1-a-0"


@settings(max_examples=100, deadline=None)
@given(worlds())
# Rare in random worlds, so always tried: a stalled worker, and one that never started work.
@example(a_world(resources={A0: ready(A0)}, job="running", records={A0: (1000.0, "working")}))
@example(a_world(resources={A0: ready(A0)}, job="running", history={A0: Remembered("ACTIVE/READY", NOW - 3000)}))
def test_status_shows_for_every_worker_the_action_reconcile_plans(world):
    shown, planned, snap, report = verdicts_of_both(world)
    assert shown == planned
    assert snap.plan["planned"] == (report.outcome != "failed")
    if snap.plan["planned"]:
        # The same inputs, read the same way, and the same lines about what could not be read.
        assert snap.plan["managed"] == report.managed
        assert (snap.plan["job"], snap.plan["workers"], snap.plan["confirmed"]) == (
            report.job,
            report.workers,
            report.confirmed,
        )
        assert snap.plan["errors"] == report.errors
        assert snap.unreachable == report.unreachable
    else:  # Terraform's state is unreadable: reconcile fails, status says it cannot plan either
        assert world["managed"] == "corrupt" and not planned
        assert "not planned" in snap.plan["errors"][0] and "unreadable" in snap.plan["errors"][0]


# The two disagreements issue 21 found, as examples: status used to decide without settle, the managed set
# or the job's completion.


def test_a_create_that_did_not_take_backs_off_in_both():
    # The last pass asked for a-0's create; it is still absent: settle judges the create failed, so the
    # worker backs off (wait) rather than being created again at once.
    world = a_world(history={"tpu-us-central1-a-0": Remembered(phase="absent", since=NOW - 60, last_attempt=NOW - 60)})
    shown, planned, _, _ = verdicts_of_both(world)
    assert shown["tpu-us-central1-a-0"][0] == planned["tpu-us-central1-a-0"][0] == WAIT
    assert shown["tpu-us-central1-b-0"][0] == CREATE


def test_a_complete_job_scaling_to_zero_removes_in_both():
    names = [f"tpu-{z}-{i}" for z in (A, B) for i in range(2)]
    world = a_world(resources={n: ready(n) for n in names}, managed=set(names), job="complete", scale_to_zero=True)
    shown, planned, snap, _ = verdicts_of_both(world)
    assert {k for k, _ in shown.values()} == {k for k, _ in planned.values()} == {REMOVE}
    assert snap.plan["job"] == {"watched": True, "complete": True, "error": None}


def test_status_without_the_job_says_which_rules_it_left_out(tmp_path):
    world = a_world(resources={"tpu-us-central1-a-0": ready("tpu-us-central1-a-0")})
    cfg = write_world(tmp_path, world)
    snap = take_snapshot(cfg, api=MemoryApi(world), now=NOW, with_job=False)
    assert {r["worker"]: r["health"] for r in snap.rows}["tpu-us-central1-a-0"] == HEALTHY
    assert snap.plan["job"]["error"] == f"job {JOB} in {cfg.job.store} not read (--no-job)"
    assert any("boot and heartbeat not judged" in e for e in snap.plan["errors"])


def test_plan_is_settle_then_history_then_decide():
    w = Worker.make("us-central1", A, 0)
    policy = Policy(fleet_id="pl")
    history = {w.name: Remembered(phase="absent", since=NOW - 60, last_attempt=NOW - 60)}
    p = plan([w], {}, NOW, policy, history=history)
    assert [a.kind for a in p.actions] == [WAIT] and p.verdicts[w.name].next_attempt == NOW - 60 + policy.backoff(1)
    assert p.history[w.name].attempts == 1 and p.history[w.name].last_attempt is None
    # decide alone, without settle, would create at once: what status used to show
    assert [a.kind for a in decide([w], {}, NOW, policy, history=history)] == [CREATE]
    seen = {w.name: Observed(w.name, A, "ACTIVE", "READY", OURS, since=NOW - 9999)}
    assert plan([w], seen, NOW, policy, history={}).observed[w.name].since == NOW  # first sighting, not provisioning
