"""A worker that stops for good (a full disk: exit 74) leaves a lasting `failed` record with its reason, systemd
does not restart it, and reconcile replaces the node on that record, says why, and counts it toward the
release's circuit breaker (issue 27's closing note, "Left alone": the disk-full restart loop).

    worker        Worker.run / `actfleet work` -> workers/{id}.json {"state": "failed", "reason": "disk full: ..."}
    systemd       RestartPreventExitStatus=74: the worker stays down
    decide        READY node + failed record since the node was made -> replace (class worker-failed)
    rollout       a worker-failed replace is a failed boot; a failed worker is no proof the release works
    reconcile     the reason in the report and --json; status shows it
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import time

import pytest

from actfleet import work_queue as q
from actfleet.config import Worker as FleetWorker
from actfleet.errors import EXIT_DISK_FULL, DiskFull
from actfleet.infra.decide import (
    ERROR,
    HEALTHY,
    HOLD,
    PENDING,
    REPLACE,
    Liveness,
    Observed,
    Policy,
    WorkRecord,
    decide,
)
from actfleet.worker.work_loop import Worker
from tests.fakes import standin_extractor as sx
from tests.test_bootstrap import UNIT, unit_file
from tests.test_reconcile import Clock, Provisioners, api_for, beat, fake, job_store, prepared, w  # noqa: F401
from tests.test_rollout import FLEET, NEW, OLD, ready, run
from tests.test_worker_liveness import Failing, finish, make_job, run_in_thread

NOW = 1_000_000.0
DAY = 86400.0
A0 = FleetWorker.make("us-central1", "us-central1-a", 0)
POLICY = Policy(fleet_id="acts", boot_timeout_s=1800, heartbeat_timeout_s=900)
OURS = {"actfleet-fleet": "acts", "managed-by": "actfleet"}
FULL = "disk full: storing job/shards/000001-0000.safetensors in /var/lib/actfleet: No space left on device (ENOSPC)"


# ----------------------------------------------------------------------------------------------------
# The worker's side: the record, and the unit file
# ----------------------------------------------------------------------------------------------------


def test_a_full_disk_leaves_a_failed_record_that_says_why(tmp_path):
    store, spec, data = make_job(tmp_path, rows=8, unit_rows=4)
    full = Failing(
        store,
        {"put"},
        "/shards/",
        lambda key: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "bucket" / key)),
        99,
    )
    w1 = Worker(full, spec, sx.StandinExtractor(data), "w1", lease_seconds=30)
    with pytest.raises(DiskFull) as e:
        finish(run_in_thread(w1), w1)
    rec = q.read_worker_records(store, "job")["w1"]
    assert rec.state == "failed" and rec.reason == str(e.value)
    assert rec.reason.startswith("disk full: storing job/shards/") and "(ENOSPC)" in rec.reason
    # status reads it through job_progress
    assert q.job_progress(store, "job").workers["w1"].reason == rec.reason


def test_a_model_cache_that_fills_before_the_work_loop_leaves_the_record_too(tmp_path, monkeypatch, capsys):
    """`actfleet work` loads the model into its cache before the loop exists: a full cache there is the same
    exit 74 with the same lasting record."""
    from actfleet.cli import main
    from actfleet.worker.commands import jobs

    store, spec, data = make_job(tmp_path, rows=8, unit_rows=4)
    cache = tmp_path / "cache" / "models" / "model.safetensors"

    def full_cache(spec):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(cache))

    monkeypatch.setattr(jobs, "EngineExtractor", full_cache)
    with pytest.raises(SystemExit) as e:
        main(["work", "--store", str(tmp_path / "bucket"), "--job", "job", "--worker-id", "w1"])
    assert e.value.code == EXIT_DISK_FULL
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("actfleet:")]
    assert len(err) == 1 and err[0].startswith("actfleet: disk full:") and str(cache) in err[0], err
    rec = q.read_worker_records(store, "job")["w1"]
    assert rec.state == "failed" and rec.reason.startswith("disk full:") and str(cache) in rec.reason


def test_a_bad_reason_in_a_record_is_no_reason(tmp_path):
    store, _, _ = make_job(tmp_path, rows=4, unit_rows=4)
    store.put(q.worker_key("job", "w9"), json.dumps({"worker": "w9", "state": "failed", "reason": 7}).encode())
    assert q.read_worker_records(store, "job")["w9"].reason is None


def test_systemd_does_not_restart_a_worker_whose_disk_is_full():
    s = unit_file(UNIT)["Service"]
    assert s["Restart"] == ["on-failure"]  # everything else still restarts
    (prevent,) = s["RestartPreventExitStatus"]
    assert str(EXIT_DISK_FULL) in prevent.split() and "2" in prevent.split()  # full disk, bad input
    # (tests/test_worker_unit.py runs the real systemd-analyze over the unit: an unknown key fails it)


# ----------------------------------------------------------------------------------------------------
# decide: one row per case
# ----------------------------------------------------------------------------------------------------


def node(created_ago=600.0, since_ago=600.0, created=True):
    return Observed(
        A0.name,
        A0.zone,
        "ACTIVE",
        "READY",
        OURS,
        since=NOW - since_ago,
        created=NOW - created_ago if created else None,
    )


def one(o, record, policy=POLICY):
    (a,) = decide([A0], {A0.name: o}, NOW, policy, liveness=Liveness({A0.name: record} if record else {}))
    return a


ROWS = [
    # id, node, record, kind, words in the reason
    (
        "failed with a reason -> replace",
        node(),
        WorkRecord(NOW - 60, "failed", FULL),
        REPLACE,
        "worker failed: " + FULL,
    ),
    ("failed without a reason -> the heartbeat rules judge", node(), WorkRecord(NOW - 60, "failed"), HEALTHY, "READY"),
    (
        "a past life's failed record (before this node was made) -> not started yet",
        node(created_ago=60),
        WorkRecord(NOW - 600, "failed", FULL),
        PENDING,
        "not started yet",
    ),
    (
        "no creation time: a failed record since the node entered READY -> replace",
        node(created=False, since_ago=600),
        WorkRecord(NOW - 60, "failed", FULL),
        REPLACE,
        "disk full",
    ),
    (
        "no creation time: a failed record older than the READY state -> not judged on it",
        node(created=False, since_ago=60),
        WorkRecord(NOW - 600, "failed", FULL),
        HEALTHY,
        "READY",
    ),
    ("working -> healthy", node(), WorkRecord(NOW - 60, "working"), HEALTHY, "READY"),
]


@pytest.mark.parametrize("case", ROWS, ids=[r[0] for r in ROWS])
def test_decide_replaces_a_worker_that_failed_for_good(case):
    _, o, record, kind, words = case
    a = one(o, record)
    assert a.kind == kind and words in a.reason, a
    if kind == REPLACE:
        assert a.cause == ERROR
        assert a.error == {"code": "WORKER_FAILED", "message": FULL, "class": "worker-failed"}


def test_once_replaced_the_old_record_asks_for_nothing_more():
    record = WorkRecord(NOW - 60, "failed", FULL)
    assert one(node(), record).kind == REPLACE
    fresh = dataclasses.replace(node(created_ago=10, since_ago=10))  # the new VM, its worker not started yet
    assert one(fresh, record).kind == PENDING


def test_records_not_judged_replace_nothing_on_them():
    record = WorkRecord(NOW - 60, "failed", FULL)
    (a,) = decide([A0], {A0.name: node()}, NOW, POLICY, liveness=Liveness({A0.name: record}, judged=False))
    assert a.kind == HEALTHY


# ----------------------------------------------------------------------------------------------------
# The circuit breaker: a release that fills every disk halts
# ----------------------------------------------------------------------------------------------------


def failed_records(*ws, ago=60):
    return {x.name: WorkRecord(1_000_000.0 - ago, "failed", FULL) for x in ws}


def working_records(*ws):
    return {x.name: WorkRecord(1_000_000.0 - 30, "working") for x in ws}


def test_three_workers_of_a_release_whose_disks_fill_halt_it():
    observed = [ready(x, NEW, created_ago=600) for x in FLEET[:3]] + [ready(x, OLD) for x in FLEET[3:]]
    p = run(observed, records=failed_records(*FLEET[:3]) | working_records(*FLEET[3:]))
    kinds = {a.worker: a.kind for a in p.actions}
    assert [kinds[x.name] for x in FLEET[:3]] == [HOLD] * 3  # deleted, not recreated: no more money burnt
    assert all(kinds[x.name] == HEALTHY for x in FLEET[3:])  # the old release keeps working
    assert p.rollout["halted"] and p.releases[NEW].failed_in_row == 3
    assert all("disk full" in a.reason for a in p.actions[:3])


def test_a_worker_whose_disk_filled_is_no_proof_that_its_release_works():
    """It wrote records since its node was made, but stopped for good: its record must not reset the count
    that its own failure adds to."""
    from actfleet.infra.rollout import ReleaseMemory

    releases = {NEW: ReleaseMemory(failed_in_row=2, failed=("x", "y"))}
    observed = [ready(FLEET[0], NEW, created_ago=600)] + [ready(x, OLD) for x in FLEET[1:]]
    p = run(observed, records=failed_records(FLEET[0]) | working_records(*FLEET[1:]), releases=releases)
    assert p.rollout["halted"] and {a.worker: a.kind for a in p.actions}[FLEET[0].name] == HOLD


# ----------------------------------------------------------------------------------------------------
# reconcile and status, over a real store and the fake TPU API
# ----------------------------------------------------------------------------------------------------


def test_reconcile_replaces_the_node_and_says_why_in_its_report_and_json(tmp_path, fake, job_store):  # noqa: F811
    from actfleet.infra.reconcile import reconcile_pass

    cfg, store = prepared(tmp_path, job_store)
    api = api_for(fake)
    apply = Provisioners(api)
    clock = Clock(time.time())
    reconcile_pass(cfg, api=api, apply=apply, clock=clock)
    clock.advance(1)
    beat(store, cfg.job.name, w(0), clock())
    q.write_worker_record(store, cfg.job.name, q.WorkerProgress(w(1), state="failed", reason=FULL))
    clock.advance(1)
    report = reconcile_pass(cfg, api=api, apply=apply, clock=clock)
    assert [a.kind for a in report.actions] == ["healthy", "replace"]
    assert report.actions[1].reason == "worker failed: " + FULL
    doc = json.loads(report.to_json())
    assert doc["actions"][1]["error"] == {"code": "WORKER_FAILED", "message": FULL, "class": "worker-failed"}
    import jsonschema

    from actfleet.infra.reconcile import REPORT_JSON_SCHEMA

    jsonschema.validate(doc, REPORT_JSON_SCHEMA)
    assert w(1) in " ".join(apply.calls[-1]["replace"])
    # The fresh VM's node is newer than the failed record it inherits under the same name: not replaced again.
    clock.advance(1)
    again = reconcile_pass(cfg, api=api, apply=apply, clock=clock)
    assert [a.kind for a in again.actions][1] != "replace", again.actions[1]


def test_status_shows_why_a_worker_stopped(tmp_path):
    from rich.console import Console

    from actfleet.infra.commands.status import render, take_job_snapshot

    store, _, _ = make_job(tmp_path, rows=4, unit_rows=4)
    q.write_worker_record(store, "job", q.WorkerProgress("w1", state="failed", reason=FULL))
    q.write_worker_record(store, "job", q.WorkerProgress("w2", state="working"))
    snap = take_job_snapshot(store, "job")
    rows = {r["worker"]: r for r in snap.to_dict()["workers"]}
    assert rows["w1"]["failure"] == FULL and rows["w2"]["failure"] is None
    console = Console(width=240, record=True)
    console.print(render(snap))
    text = console.export_text()
    assert f"worker w1 failed: {FULL}" in text and "worker w2 failed" not in text


def test_a_disk_full_error_without_a_path_has_one_colon():
    """What the worker writes to its record and its log (seen on a real full tmpfs: "in /data/store:: No space")."""
    from actfleet.errors import disk_full_error

    e = disk_full_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "storing job/shards/x in /data/store:")
    assert str(e).startswith("disk full: storing job/shards/x in /data/store: No space left on device (ENOSPC);")
    with_path = disk_full_error(
        OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/store/x.tmp"), "storing x in s:"
    )
    assert str(with_path).startswith("disk full: storing x in s: /data/store/x.tmp: No space left on device")
