"""prepare, claim/commit and progress through the public functions of actfleet/work_queue.py, on a real
filesystem store (the GCS store runs the same contract in test_store.py and test_leases.py)."""

from __future__ import annotations

import pytest

from actfleet import work_queue as q
from actfleet.errors import InputError
from actfleet.store import open_store
from tests.fakes.gcs_server import fake_gcs  # noqa: F401  (fixture)

OPTS = {"model": "tiny", "sites": ["blocks.0.hook_resid_post"], "positions": "all"}


@pytest.fixture
def store(tmp_path):
    return open_store(str(tmp_path / "bucket"))


def prep(store, job="j", rows=10, unit_rows=3, fingerprint="ab" * 32, options=OPTS):
    return q.prepare(
        store, job, input="data.jsonl", fingerprint=fingerprint, rows=rows, unit_rows=unit_rows, options=options
    )


def test_prepare_writes_contiguous_units_and_is_idempotent(store):
    spec, created = prep(store)
    assert created and spec.units == 4
    assert [spec.unit_range(u) for u in range(4)] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert list(store.list("j/units/")) == [f"j/units/{u:06d}.json" for u in range(4)]
    again, created = prep(store)
    assert not created and again == spec


@pytest.mark.parametrize(
    "change, message",
    [
        ({"fingerprint": "cd" * 32}, "different dataset"),
        ({"rows": 11}, "rows=10, now 11"),
        ({"unit_rows": 5}, "unit_rows=3, now 5"),
        ({"options": {**OPTS, "positions": "last"}}, "positions='all', now 'last'"),
    ],
)
def test_prepare_refuses_a_changed_job(store, change, message):
    prep(store)
    with pytest.raises(InputError, match=message):
        prep(store, **change)


def test_check_input_refuses_a_changed_dataset(store):
    spec, _ = prep(store)
    q.check_input(spec, "ab" * 32)
    with pytest.raises(InputError, match="changed since prepare"):
        q.check_input(spec, "cd" * 32)


def record(lease, spec, tokens=5, store=None):
    """A done record for this attempt, listing one shard of this attempt's name (uploaded when `store` is
    given: commit checks every listed shard is there with its size)."""
    start, stop = spec.unit_range(lease.unit)
    key = q.shard_key(lease.job, lease.unit, 0, lease.tag)
    if store is not None:
        store.put(key, b"s" * 100)
    return q.DoneRecord(
        unit=lease.unit,
        start=start,
        stop=stop,
        worker=lease.worker,
        attempt=lease.attempt,
        rows_stored=stop - start,
        tokens=tokens,
        skipped={},
        shards=[q.ShardInfo(key[len(lease.job) + 1 :], 100, "0" * 64, tokens)],
        committed_at=0.0,
        seconds=1.0,
    )


def test_claim_commit_until_done_and_progress(store):
    spec, _ = prep(store)
    assert not q.job_complete(store, "j")
    seen = []
    while True:
        nxt = q.next_unit(store, spec, "w1", 60)
        if nxt.all_done:
            break
        assert nxt.lease is not None
        seen.append(nxt.lease.unit)
        assert q.commit(store, nxt.lease, record(nxt.lease, spec, store=store), 60)
    assert sorted(seen) == [0, 1, 2, 3]
    assert list(store.list("j/leases/")) == []  # released after commit
    p = q.job_progress(store, "j")
    assert p.complete and p.units_done == 4 and p.rows_done == 10 and p.tokens == 20 and p.shards == 4
    assert p.workers["w1"].units_done == 4
    assert q.job_complete(store, "j")


def test_the_key_helpers_spell_the_documented_layout_and_parse_it_back(store):
    """The layout of docs/jobs.md, literally (the helpers are the only code that spells it), and each
    listing prefix lists that job's records of that kind only (a neighbouring job "jx" holds every kind too)."""
    assert (
        q.job_key("j"),
        q.unit_key("j", 42),
        q.lease_key("j", 42),
        q.done_key("j", 42),
        q.worker_key("j", "w1"),
    ) == ("j/job.json", "j/units/000042.json", "j/leases/000042", "j/done/000042", "j/workers/w1.json")
    assert q.shard_key("j", 42, 3, "a2-5f1c9a2b") == "j/shards/000042-0003.a2-5f1c9a2b.safetensors"
    assert q.shard_key("j", 42, 3) == "j/shards/000042-0003.safetensors"
    for job in ("j", "jx"):
        spec, _ = prep(store, job=job)
        lease = q.claim(store, job, 0, "w1", 60)
        assert q.commit(store, lease, record(lease, spec, store=store), 60)
        q.claim(store, job, 1, "w1", 60)
        q.write_worker_record(store, job, q.WorkerProgress("w1"))
    assert list(store.list(q.units_prefix("j"))) == [q.unit_key("j", u) for u in range(4)]
    assert list(store.list(q.done_prefix("j"))) == [q.done_key("j", 0)]
    assert list(store.list(q.leases_prefix("j"))) == [q.lease_key("j", 1)]
    assert list(store.list(q.workers_prefix("j"))) == [q.worker_key("j", "w1")]
    shards = list(store.list(q.shards_prefix("j")))
    assert len(shards) == 1 and shards[0].startswith("j/shards/")
    assert [q.unit_of(k) for k in (q.unit_key("j", 7), q.lease_key("j", 7), q.done_key("j", 7))] == [7, 7, 7]
    assert q.unit_of("j/done/notes") is None
    assert q.parse_shard_name(q.shard_key("j", 7, 2, "a3-0123abcd")) == (7, 2, "a3-0123abcd")
    assert q.parse_shard_name(q.shard_key("j", 7, 2)) == (7, 2, None)
    assert q.parse_shard_name("j/shards/000007-0002.a3-XYZ.safetensors") is None  # not an attempt tag
    name = q.job_relative("j", shards[0])
    assert name.startswith("shards/") and q.in_job("j", name) == shards[0]
    assert q.read_done(store, "j", 0).shards[0].name == name  # as done records list shards
    with pytest.raises(ValueError, match="not a key of job"):
        q.job_relative("j", q.done_key("jx", 0))


def test_a_second_commit_of_a_unit_is_refused(store):
    spec, _ = prep(store)
    import time

    lease = q.claim(store, "j", 0, "w1", 60, now=time.time() - 120)
    other = q.take_over(store, lease, "w2", 60)  # w1's lease expired; w2 took over
    assert other is not None and other.attempt == 2
    with pytest.raises(q.LeaseLost):
        q.commit(store, lease, record(lease, spec, store=store), 60)  # never commit on a lost lease
    assert q.commit(store, other, record(other, spec, store=store), 60)
    third = q.claim(store, "j", 0, "w3", 60)
    assert q.commit(store, third, record(third, spec, store=store), 60) is False  # done record exists: not twice
    assert q.read_done(store, "j", 0).worker == "w2"


def test_progress_before_prepare_and_with_live_leases(store):
    assert not q.job_progress(store, "nope").prepared
    assert not q.job_complete(store, "nope")
    spec, _ = prep(store)
    q.claim(store, "j", 1, "w1", 60, now=1000.0)
    q.claim(store, "j", 2, "w2", 60, now=1000.0)
    q.write_worker_record(store, "j", q.WorkerProgress("w1", current_unit=1, state="working"))
    p = q.job_progress(store, "j", now=1030.0)
    assert p.units_leased == 2 and p.units_done == 0
    assert p.workers["w1"].current_unit == 1 and p.workers["w1"].state == "working"
    assert q.job_progress(store, "j", now=1100.0).units_leased == 0  # expired


# ----------------------------------------------------------------------------------------------------
# The work loop (worker/work_loop.py) over the stand-in extractor: failure paths and bounded memory
# ----------------------------------------------------------------------------------------------------

import threading  # noqa: E402

from actfleet.worker.verify import verify  # noqa: E402
from actfleet.worker.work_loop import Worker  # noqa: E402
from tests.fakes import standin_extractor as sx  # noqa: E402


def standin_job(tmp_path, store, rows=30, unit_rows=10):
    data = sx.write_dataset(tmp_path / "data.jsonl", rows)
    spec, _ = q.prepare(
        store, "job", input=str(data), fingerprint=sx.fingerprint(data), rows=rows, unit_rows=unit_rows, options={}
    )
    return spec, data


class FlakyStore:
    """Wraps a store; puts of shard keys fail while `failing` is set (an outage during upload)."""

    def __init__(self, inner):
        self.inner, self.failing, self.attempts = inner, True, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def put(self, key, data):
        if "/shards/" in key and self.failing:
            self.attempts += 1
            raise ConnectionError("injected: upload failed")
        return self.inner.put(key, data)


def test_a_failed_upload_never_marks_a_unit_done(tmp_path, store):
    spec, data = standin_job(tmp_path, store)
    flaky = FlakyStore(store)
    w = Worker(flaky, spec, sx.StandinExtractor(data), "w1", lease_seconds=30, upload_attempts=2)
    lease = q.claim(store, "job", 0, "w1", 30)
    committed, _ = w._process(lease)
    assert not committed and flaky.attempts == 2
    assert store.generation(q.done_key("job", 0)) is None  # not done
    assert store.generation(q.lease_key("job", 0)) is None  # lease released: another worker can take it now
    flaky.failing = False
    result = Worker(flaky, spec, sx.StandinExtractor(data), "w2", lease_seconds=30).run()
    assert result.job_complete and verify(store, "job").ok


def test_a_lost_lease_stops_the_unit_and_commits_nothing(tmp_path, store):
    spec, data = standin_job(tmp_path, store)
    stolen = threading.Event()

    def on_event(kind, info):
        if kind == "uploading" and not stolen.is_set():  # another worker takes the lease mid-unit
            stale = q.read_lease(store, "job", info["unit"])
            stale.expires = 0
            assert q.take_over(store, stale, "thief", 30) is not None
            stolen.set()

    w = Worker(store, spec, sx.StandinExtractor(data), "w1", lease_seconds=30, on_event=on_event)
    lease = q.claim(store, "job", 0, "w1", 30)
    committed, _ = w._process(lease)
    assert stolen.is_set() and not committed
    assert store.generation(q.done_key("job", 0)) is None
    assert q.read_lease(store, "job", 0).worker == "thief"  # not released by the loser


def test_queues_apply_backpressure_to_the_device_loop(tmp_path, store):
    """With uploads stalled, the device loop gets at most depth(batches) + depth(shards) + in-flight
    batches ahead; it does not buffer the unit in memory."""
    spec, data = standin_job(tmp_path, store, rows=60, unit_rows=60)
    gate = threading.Event()
    produced = []

    class StalledStore(FlakyStore):
        def put(self, key, data):
            if "/shards/" in key:
                gate.wait()
            return self.inner.put(key, data)

    class CountingExtractor(sx.StandinExtractor):
        def run(self, rows):
            for b in super().run(rows):
                produced.append(len(b.sample_ids))
                yield b

    ex = CountingExtractor(data, shard_tokens=1, batch_rows=1)  # one shard per batch
    w = Worker(StalledStore(store), spec, ex, "w1", lease_seconds=30, queue_depth=2)
    t = threading.Thread(target=w.run)
    t.start()
    seen, still = -1, 0
    while still < 3:  # wait until the pipeline has filled up and stopped moving for a while
        t.join(0.3)
        still = still + 1 if len(produced) == seen and seen > 0 else 0
        seen = len(produced)
    # 1 blocked in upload + 2 queued shards + 1 in the serializer + 2 queued batches + 1 being put
    assert 3 <= len(produced) <= 7
    gate.set()
    t.join()
    assert len(produced) == 60 and verify(store, "job").ok


def test_work_refuses_a_changed_dataset(tmp_path, store):
    spec, data = standin_job(tmp_path, store)
    data.write_text(data.read_text().replace("row 3", "row X"))
    with pytest.raises(InputError, match="changed since prepare"):
        Worker(store, spec, sx.StandinExtractor(data), "w1").run()
    assert list(store.list("job/leases/")) == []


@pytest.mark.slow
def test_the_loop_on_the_gcs_store_survives_transient_errors(tmp_path, fake_gcs):
    """Against the enforcing fake GCS: 503s and 429s in the middle of a job are retried with backoff."""
    gcs = open_store("gs://acts/run1")
    spec, data = standin_job(tmp_path, gcs, rows=24, unit_rows=8)
    faults = {"n": 0}

    def on_event(kind, info):
        if kind in ("computing", "uploading", "committing") and faults["n"] < 6:
            fake_gcs.fail_next(1, 503 if faults["n"] % 2 else 429)
            faults["n"] += 1

    result = Worker(gcs, spec, sx.StandinExtractor(data), "w1", lease_seconds=30, on_event=on_event).run()
    assert result.job_complete and result.units_committed == 3 and faults["n"] == 6
    assert verify(gcs, "job").ok
    assert q.job_progress(gcs, "job").complete
