"""Clock skew (issue 27 item 8): leases and heartbeats are judged by the store's clock, never a worker's.

A worker's wall clock is faked in two ways: in this process by replacing `time.time` (the stores' clocks are
the kernel's file timestamps and the fake GCS server's own, which that leaves alone), and in a real worker
process by tests/fakes/skewed_clock/sitecustomize.py. The fake GCS server's clock is moved with
`clock_offset` ("time passes for the store") or an object made older with `backdate`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from actfleet import work_queue as q
from actfleet.store import GcsStore, open_store
from tests.fakes import standin_extractor as sx
from tests.fakes.gcs_server import fake_gcs  # noqa: F401  (fixture)
from tests.test_chaos import Proc
from tests.test_reconcile import Clock, Provisioners, api_for, fake, make_cfg, w  # noqa: F401  (fake: fixture)

SKEWED_CLOCK = Path(__file__).parent / "fakes" / "skewed_clock"
REAL_TIME, REAL_TIME_NS = time.time, time.time_ns
HOUR = 3600.0


@pytest.fixture(params=["local", "gcs"])
def store(request, tmp_path, monkeypatch):
    if request.param == "local":
        return open_store(str(tmp_path / "store"))
    from tests.fakes.gcs_server import FakeGcs

    server = FakeGcs.start(port=0)
    request.addfinalizer(server.stop)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.url)
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "actfleet-test")
    s = open_store("gs://skew-bucket/jobs")
    s.fake = server
    return s


def one_unit_job(store, name="job", rows=4):
    spec, _ = q.prepare(store, name, input="i", fingerprint="f" * 64, rows=rows, unit_rows=rows, options={})
    return spec


def skew_this_process(monkeypatch, seconds: float) -> None:
    monkeypatch.setattr(time, "time", lambda: REAL_TIME() + seconds)
    monkeypatch.setattr(time, "time_ns", lambda: REAL_TIME_NS() + int(seconds * 1e9))


# -- leases ---------------------------------------------------------------------------------------------


def test_a_worker_whose_clock_runs_ahead_does_not_steal_a_live_lease(store, monkeypatch):
    spec = one_unit_job(store)
    holder = q.next_unit(store, spec, "worker-a", 60).lease
    assert holder is not None
    skew_this_process(monkeypatch, HOUR)  # worker-b's clock is an hour ahead
    # The store's clock held still, so the wait next_unit computes is one exact number: what is left of the
    # holder's lease by the store's clock (judged by worker-b's clock it would be spent: the 0.05 s floor).
    store_now = store.now()
    monkeypatch.setattr(store, "now", lambda: store_now)
    nxt = q.next_unit(store, spec, "worker-b", 60)
    assert nxt.lease is None and not nxt.all_done
    left_by_store = q.read_lease(store, "job", 0).expires - store_now
    assert nxt.wait_seconds == pytest.approx(left_by_store)  # worker-b waits exactly that out
    skew_this_process(monkeypatch, 0)
    q.renew(store, holder, 60)  # still worker-a's


def test_a_worker_whose_clock_runs_behind_does_not_lose_its_lease_early(store, monkeypatch):
    spec = one_unit_job(store)
    skew_this_process(monkeypatch, -HOUR)
    lease = q.next_unit(store, spec, "worker-a", 60).lease
    skew_this_process(monkeypatch, 0)
    assert q.next_unit(store, spec, "worker-b", 60).lease is None  # not expired an hour ago
    skew_this_process(monkeypatch, -HOUR)
    q.renew(store, lease, 60)  # and worker-a still renews it


def test_a_dead_holder_whose_clock_ran_ahead_blocks_its_unit_for_one_lease_not_skew_plus_lease(fake_gcs, monkeypatch):
    store = open_store("gs://skew-bucket/jobs")
    spec = one_unit_job(store)
    skew_this_process(monkeypatch, HOUR)
    assert q.next_unit(store, spec, "ahead", 60).lease is not None  # then it dies
    skew_this_process(monkeypatch, 0)
    assert q.next_unit(store, spec, "other", 60).lease is None
    fake_gcs.clock_offset += 61  # a lease's worth of the store's time later
    store = open_store("gs://skew-bucket/jobs")  # a fresh process reads the store's clock anew
    won = q.next_unit(store, spec, "other", 60).lease
    assert won is not None and won.attempt == 2


def test_a_lease_body_claiming_a_far_expiry_is_capped_at_its_write_time_plus_its_duration(fake_gcs):
    """Whatever a writer puts in `expires` (a clock hours ahead, a foreign writer), the store's time of the
    write plus the lease's duration bounds it."""
    store = open_store("gs://skew-bucket/jobs")
    spec = one_unit_job(store)
    body = {"job": "job", "unit": 0, "worker": "liar", "attempt": 1, "nonce": "ab" * 8, "seconds": 60}
    store.create(q.lease_key("job", 0), json.dumps({**body, "expires": REAL_TIME() + 10 * HOUR}).encode())
    assert q.read_lease(store, "job", 0).expires <= fake_gcs.now() + 60
    fake_gcs.backdate("skew-bucket", "jobs/" + q.lease_key("job", 0), 61)
    assert q.next_unit(store, spec, "honest", 60).lease is not None
    assert q.job_progress(store, "job").units_leased == 1  # honest's own, live


def test_the_local_store_stamps_writes_with_the_filesystems_clock(tmp_path, monkeypatch):
    store = open_store(str(tmp_path / "s"))
    skew_this_process(monkeypatch, -HOUR)
    store.put("a", b"x")
    _, _, written = store.read_stamped("a")
    assert abs(written - REAL_TIME()) < 60 and abs(store.now() - REAL_TIME()) < 60


def test_the_gcs_store_clock_is_the_servers(fake_gcs, monkeypatch):
    fake_gcs.clock_offset = -HOUR
    skew_this_process(monkeypatch, HOUR)
    store = open_store("gs://skew-bucket/x")
    assert isinstance(store, GcsStore)
    assert fake_gcs.now() - 2 <= store.now() <= fake_gcs.now()  # a lower bound, within Date's second
    store.put("k", b"v")
    assert abs(store.read_stamped("k")[2] - fake_gcs.now()) < 5
    assert abs(store.list_written("")["k"] - fake_gcs.now()) < 5


# -- a real worker process with a skewed clock -------------------------------------------------------------


def test_a_worker_process_an_hour_ahead_waits_for_a_live_lease_and_takes_it_once_expired(fake_gcs, tmp_path):
    data = sx.write_dataset(tmp_path / "data.jsonl", 10)
    store = open_store("gs://skew-bucket/jobs")
    q.prepare(store, "job", input=str(data), fingerprint=sx.fingerprint(data), rows=10, unit_rows=10, options={})
    held = q.claim(store, "job", 0, "holder", 600)  # live for ten minutes, by the store's clock
    env = {"PYTHONPATH": str(SKEWED_CLOCK), "ACTFLEET_TEST_CLOCK_OFFSET_S": str(HOUR)}
    argv = [os.sys.executable, "-m", "tests.fakes.standin_extractor", store.url, "job", "ahead", str(data), "0", "3"]
    proc = Proc(argv, env=env)
    try:

        def waiting():
            rec = q.read_worker_records(store, "job").get("ahead")
            return rec is not None and rec.state == "waiting"

        deadline = REAL_TIME() + 120
        while not waiting() and REAL_TIME() < deadline and proc.p.poll() is None:
            time.sleep(0.2)  # polling only: the assertion is on the state reached
        rec = q.read_worker_records(store, "job")["ahead"]
        assert rec.state == "waiting", "\n".join(proc.lines[-20:])
        assert HOUR - 60 < rec.clock_skew < HOUR + 60  # reported, not trusted
        assert q.renew(store, held, 600).worker == "holder"  # the lease is still the holder's
        assert proc.wait_for(lambda line: "clock is 60 min ahead of the store's" in line, timeout=30)

        fake_gcs.clock_offset += 601  # the holder died; ten minutes pass for the store
        assert proc.wait_for(lambda line: line.startswith("result "), timeout=120), "\n".join(proc.lines[-20:])
    finally:
        if proc.p.poll() is None:
            proc.p.kill()
        proc.p.wait()
    assert q.job_complete(store, "job") and q.read_done(store, "job", 0).worker == "ahead"


# -- heartbeats: reconcile and status ---------------------------------------------------------------------


def write_record_with_clock(store, job, worker, skew: float, monkeypatch) -> None:
    skew_this_process(monkeypatch, skew)
    q.write_worker_record(store, job, q.WorkerProgress(worker, state="working"))
    skew_this_process(monkeypatch, 0)


def test_reconcile_judges_heartbeats_by_the_store_not_by_worker_clocks(tmp_path, fake, store, monkeypatch):  # noqa: F811
    """16 min behind: healthy (it used to be replaced as stalled). 30 min ahead but silent for 16 min by the
    store's clock: replaced (its clock used to hide the stall). Both skews are reported."""
    from actfleet.infra.reconcile import reconcile_pass

    cfg = make_cfg(tmp_path, count=2).replace("job", store=store.url)
    q.prepare(store, cfg.job.name, input="i", fingerprint="f" * 64, rows=4, unit_rows=1, options={})
    api = api_for(fake)
    apply = Provisioners(api)
    clock = Clock(REAL_TIME())
    reconcile_pass(cfg, api=api, apply=apply, clock=clock)  # creates both nodes
    write_record_with_clock(store, cfg.job.name, w(0), -16 * 60, monkeypatch)
    write_record_with_clock(store, cfg.job.name, w(1), 30 * 60, monkeypatch)
    clock.advance(16)  # 16 minutes pass (for the store too: w(0)'s next write is stamped then)
    write_record_with_clock(store, cfg.job.name, w(0), -16 * 60, monkeypatch)
    set_written(store, q.worker_key(cfg.job.name, w(0)), clock())
    report = reconcile_pass(cfg, api=api, apply=apply, clock=clock)
    kinds = {a.worker: (a.kind, a.reason) for a in report.actions}
    assert kinds[w(0)][0] == "healthy", kinds
    assert kinds[w(1)] == ("replace", "stalled: last heartbeat 16 min ago (heartbeat timeout 15 min)")
    skew = report.workers["clock_skew"]
    assert set(skew) == {w(0), w(1)} and skew[w(0)] < -15 * 60 and 29 * 60 < skew[w(1)] < 31 * 60


def set_written(store, key: str, at: float) -> None:
    """Make the store's time of the key's last write `at` (the local store's is the file's mtime)."""
    if isinstance(store, GcsStore):
        store.fake.backdate("skew-bucket", f"jobs/{key}", store.fake.now() - at)
    else:
        os.utime(store.local_path(key), (at, at))


def test_status_reports_a_skewed_worker_clock(tmp_path, store, monkeypatch):
    from rich.console import Console

    from actfleet.infra.commands.status import render, take_snapshot
    from tests.test_plan import MemoryApi

    job = "j"
    q.prepare(store, job, input="i", fingerprint="f" * 64, rows=4, unit_rows=1, options={})
    write_record_with_clock(store, job, "tpu-us-central1-a-0", -16 * 60, monkeypatch)
    write_record_with_clock(store, job, "tpu-us-central1-a-1", 5, monkeypatch)
    p = q.job_progress(store, job)
    assert p.workers["tpu-us-central1-a-0"].clock_skew < -15 * 60
    assert abs(p.workers["tpu-us-central1-a-0"].last_heartbeat - store.now()) < 10  # fresh by the store
    cfg = make_cfg(tmp_path, count=2).replace("job", name=job, store=store.url)
    snap = take_snapshot(cfg, api=MemoryApi({"zones": {}, "resources": {}}), store=store, job_name=job)
    console = Console(record=True, width=200)
    console.print(render(snap))
    text = console.export_text()
    assert "worker tpu-us-central1-a-0's clock is 16 min behind the store's" in text
    assert "tpu-us-central1-a-1's clock" not in text  # 5 s is within the bound


# -- the reconcile lock -----------------------------------------------------------------------------------


def test_a_machine_whose_clock_runs_ahead_does_not_take_over_another_hosts_live_reconcile_lock(fake_gcs, monkeypatch):
    from actfleet.infra.lock import LOCK_KEY, ReconcileLock

    store = open_store("gs://skew-state/locks")
    other = {"holder": "ops@elsewhere", "host": "elsewhere", "pid": 1, "pid_start": "", "since": fake_gcs.now()}
    record = {**other, "expires": fake_gcs.now() + 300, "command": "actfleet reconcile", "nonce": "cd" * 8}
    store.create(LOCK_KEY, json.dumps(record).encode())
    skew_this_process(monkeypatch, HOUR)
    lock = ReconcileLock(store)
    assert not lock.try_acquire() and lock.holder.host == "elsewhere"
    fake_gcs.clock_offset += 301  # its holder stopped renewing: five minutes later by the store's clock
    assert ReconcileLock(open_store("gs://skew-state/locks")).try_acquire()
