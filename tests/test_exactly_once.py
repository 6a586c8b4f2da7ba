"""Exactly once under the faults SIGKILL never exercises: a worker that stalls past its lease and resumes,
`verify --clean` running during a job, edited records, stray keys, corrupt records, bad worker ids, and
GCS replies lost after the write landed (the enforcing fake GCS carries a request out, then answers 503).

Each test names the item of issue 14 it guards. The process-level chaos with stalls is in
tests/test_chaos_stalls.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from actfleet import work_queue as q
from actfleet.errors import ActfleetError
from actfleet.store import open_store
from actfleet.worker.verify import verify
from tests.fakes import standin_extractor as sx
from tests.fakes.gcs_server import fake_gcs  # noqa: F401  (fixture)
from tests.test_verify import run_job

REPO = Path(__file__).resolve().parents[1]


def prep(store, rows=10, unit_rows=5):
    spec, _ = q.prepare(
        store,
        "job",
        input="data.jsonl",
        fingerprint="ab" * 32,
        rows=rows,
        unit_rows=unit_rows,
        options={"model": "standin"},
    )
    return spec


def claimed_with_a_shard(store, data: bytes):
    """(spec, lease, shard key, done record): unit 0 claimed by w1, one shard of its attempt uploaded."""
    spec = prep(store)
    lease = q.claim(store, "job", 0, "w1", 60)
    key = q.shard_key("job", 0, 0, lease.tag)
    store.put(key, data)
    return spec, lease, key, done_record(lease, spec, [key], store)


def done_record(lease, spec, keys: list[str], store) -> q.DoneRecord:
    start, stop = spec.unit_range(lease.unit)
    shards = []
    for key in keys:
        data, _ = store.read(key)
        shards.append(q.ShardInfo(key[len("job/") :], len(data), "0" * 64, 1))
    return q.DoneRecord(
        unit=lease.unit,
        start=start,
        stop=stop,
        worker=lease.worker,
        attempt=lease.attempt,
        rows_stored=0,
        tokens=len(keys),
        skipped={},
        shards=shards,
        committed_at=time.time(),
        seconds=1.0,
    )


# ---------------------------------------------------------------------------------------------------
# 1. a stalled worker, `verify --clean`, and commit
# ---------------------------------------------------------------------------------------------------


def test_renew_refuses_an_expired_lease_even_if_nobody_took_it_over(tmp_path):
    store = open_store(str(tmp_path))
    prep(store)
    t0 = time.time()
    lease = q.claim(store, "job", 0, "w1", 10, now=t0)
    lease = q.renew(store, lease, 10, now=t0 + 5)  # in time: fine, and still ours (nobody took it over)
    assert q.read_lease(store, "job", 0).generation == lease.generation
    with pytest.raises(q.LeaseLost, match="expired"):
        q.renew(store, lease, 10, now=t0 + 16)  # SIGSTOPped past its expiry, then SIGCONTed


def test_commit_refuses_when_a_listed_shard_is_gone_and_creates_no_done_record(tmp_path):
    store = open_store(str(tmp_path))
    spec, lease, key, record = claimed_with_a_shard(store, b"activations")
    store.delete(key)  # lost: an operator's cleanup, a lifecycle rule, a bucket restore
    with pytest.raises(q.ShardsMissing, match="missing"):
        q.commit(store, lease, record, 60)
    assert store.generation(q.done_key("job", 0)) is None
    assert store.generation(q.lease_key("job", 0)) is None  # released: the next worker takes it at once
    store.put(key, b"truncated")  # a shard of another size than the record says is refused too
    lease = q.claim(store, "job", 0, "w1", 60)
    record.shards[0].bytes = len(b"activations")
    with pytest.raises(q.ShardsMissing, match="9 bytes"):
        q.commit(store, lease, record, 60)
    assert store.generation(q.done_key("job", 0)) is None


def test_an_attempt_that_lost_its_lease_cannot_touch_the_committed_shards(tmp_path):
    """Attempt-scoped names: the zombie writes only its own names, which are garbage; the committed
    attempt's bytes are never overwritten, whatever the zombie computed."""
    store = open_store(str(tmp_path))
    spec = prep(store)
    t0 = time.time()
    zombie = q.claim(store, "job", 0, "stalled", 5, now=t0 - 60)
    winner = q.take_over(store, zombie, "w2", 60)
    assert winner is not None and winner.tag != zombie.tag
    mine = q.shard_key("job", 0, 0, winner.tag)
    store.put(mine, b"winner's bytes")
    assert q.commit(store, winner, done_record(winner, spec, [mine], store), 60)
    theirs = q.shard_key("job", 0, 0, zombie.tag)
    assert theirs != mine
    store.put(theirs, b"zombie's different bytes")  # the stalled attempt resumes and uploads
    with pytest.raises(q.LeaseLost):
        q.commit(store, zombie, done_record(zombie, spec, [theirs], store), 60)
    assert store.read(mine)[0] == b"winner's bytes"
    assert q.read_done(store, "job", 0).shards[0].name == mine[len("job/") :]


def test_clean_deletes_only_unlisted_shards_of_done_units_by_generation_and_says_why(tmp_path):
    store, spec, _ = run_job(tmp_path, rows=20, unit_rows=5)
    listed = [f"job/{s.name}" for u in range(spec.units) for s in q.read_done(store, "job", u).shards]
    dead = q.shard_key("job", 1, 0, "a7-0badc0de")  # a dead attempt's shard on a done unit: garbage
    store.put(dead, b"dead attempt")
    # Unit 3 is being redone (its done record is gone): none of its shards may go, the old attempt's
    # included, whatever their leases say: some attempt may still commit them (a stalled one, too).
    old_3 = [f"job/{s.name}" for s in q.read_done(store, "job", 3).shards]
    store.delete(q.done_key("job", 3))
    stalled = q.shard_key("job", 3, 0, "a5-5ca1ab1e")  # an attempt whose lease has long expired
    store.put(stalled, b"stalled attempt")
    # ... and garbage that an attempt rewrites between the judgement and the delete (by generation)
    rewritten = q.shard_key("job", 2, 5, "a9-feedface")
    store.put(rewritten, b"old")

    class RewritingStore:
        """Delegates to the store; rewrites `rewritten` right after clean reads its generation."""

        def __init__(self, inner):
            self.inner, self.url = inner, inner.url

        def generation(self, key):
            gen = self.inner.generation(key)
            if key == rewritten:
                self.inner.put(key, b"new")
            return gen

        def __getattr__(self, name):
            return getattr(self.inner, name)

    rep = verify(RewritingStore(store), "job", clean=True)
    assert rep.cleaned == [dead]
    kept = {k["key"]: k["reason"] for k in rep.kept}
    assert all("unit 3 is not done" in kept[k] for k in old_3 + [stalled])
    assert "rewritten since" in kept[rewritten]
    assert all(store.generation(k) is not None for k in listed + [stalled])
    assert store.read(rewritten)[0] == b"new"


def test_clean_never_races_a_commit_whatever_the_clocks(tmp_path):
    """The attempt checked its shards, then stalled for longer than its lease before creating done/ (a
    SIGSTOP has no upper bound). Clean runs during the stall, with a clock an hour ahead: the unit is not
    done, so its shards are kept; the commit lands afterwards with every shard it lists."""
    store = open_store(str(tmp_path))
    spec, lease, key, record = claimed_with_a_shard(store, b"acts")
    rep = verify(store, "job", clean=True, now=time.time() + 3600)
    assert key not in rep.cleaned and store.read(key)[0] == b"acts"
    store.create(q.done_key("job", 0), record.to_json())  # the stalled create, landing now
    assert store.size(key) == record.shards[0].bytes


# ---------------------------------------------------------------------------------------------------
# 4, 5, 7. records that lie or are broken
# ---------------------------------------------------------------------------------------------------


def test_verify_does_not_trust_an_edited_unit_count(tmp_path):
    store, spec, _ = run_job(tmp_path, rows=10, unit_rows=5)
    assert verify(store, "job").ok
    data, gen = store.read(q.job_key("job"))
    store.replace(q.job_key("job"), data.replace(b'"units": 2', b'"units": 1'), gen)
    store.delete(q.done_key("job", 1))
    rep = verify(store, "job")
    assert not rep.ok
    assert any(p.kind == "bad-job" and "units=1" in p.message for p in rep.problems)


def test_stray_done_keys_do_not_make_a_job_complete(tmp_path):
    store = open_store(str(tmp_path))
    spec = prep(store, rows=15, unit_rows=5)  # 3 units, none done
    for unit in (7, 8, 9):
        store.create(q.done_key("job", unit), b"{}")
    assert not q.job_complete(store, "job")
    assert not q.next_unit(store, spec, "w1", 60).all_done
    progress = q.job_progress(store, "job")
    assert not progress.complete and progress.units_done == 0 and progress.bad_records == 3


@pytest.mark.parametrize(
    "field, value",
    [
        ("tokens", "many"),
        ("shards", [{"name": 5, "bytes": "x", "sha256": 1, "tokens": 0}]),
        ("skipped", ["not", "a", "dict"]),
        ("start", None),
    ],
)
def test_a_corrupt_done_record_is_one_line_and_clean_keeps_its_shards(tmp_path, field, value):
    store, spec, _ = run_job(tmp_path, rows=10, unit_rows=5)
    shards = [f"job/{s.name}" for s in q.read_done(store, "job", 1).shards]
    data, gen = store.read(q.done_key("job", 1))
    store.replace(q.done_key("job", 1), json.dumps({**json.loads(data), field: value}).encode(), gen)
    with pytest.raises(ActfleetError, match=f"{field}.*corrupt record"):
        q.read_done(store, "job", 1)
    rep = verify(store, "job", clean=True)
    assert any(p.kind == "bad-record" and p.unit == 1 for p in rep.problems)
    assert rep.cleaned == [] and all(store.generation(k) is not None for k in shards)
    p = subprocess.run(
        [sys.executable, "-c", "from actfleet.cli import main; main()", "verify", "--store", store.url, "--job", "job"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert [line for line in p.stderr.splitlines() if "bad-record" in line and "000001" in line]


# ---------------------------------------------------------------------------------------------------
# 8. worker ids
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["../../../evil", "Upper", "has space", "-lead", "trail-", "x" * 64, "a/b"])
def test_a_bad_worker_id_is_refused_with_exit_2(tmp_path, bad):
    data = sx.write_dataset(tmp_path / "data.jsonl", 4)
    store = open_store(str(tmp_path / "bucket"))
    q.prepare(
        store,
        "job",
        input=str(data),
        fingerprint=sx.fingerprint(data),
        rows=4,
        unit_rows=2,
        options={"model": "standin"},
    )
    p = subprocess.run(
        [
            sys.executable,
            "-c",
            "from actfleet.cli import main; main()",
            "work",
            "--store",
            str(tmp_path / "bucket"),
            "--job",
            "job",
            "--worker-id",
            bad,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().count("\n") == 0 and "worker id" in p.stderr
    assert list(store.list("job/workers/")) == [] and list(store.list("job/leases/")) == []


def test_worker_ids_follow_the_tpu_node_name_rules():
    for good in ("tpu-us-central1-a-0", "w1", "chaos-12", "local-3"):
        assert q.check_worker_id(good) == good
    assert q.check_worker_id(q.default_worker_id())  # the default is always valid, whatever the hostname


# ---------------------------------------------------------------------------------------------------
# GCS: a 503 returned after the write landed (the client retries a request that already succeeded)
# ---------------------------------------------------------------------------------------------------


def test_gcs_writes_whose_reply_was_lost_are_handled(fake_gcs):  # noqa: F811
    store = open_store("gs://acts/prefix")
    fake_gcs.fail_after_next("POST", 1, 503, match="k1")
    gen = store.create("k1", b"v1")  # create: landed, 503, retried -> 412 -> our own bytes: success
    assert store.read("k1") == (b"v1", gen)
    fake_gcs.fail_after_next("POST", 1, 503, match="k1")
    gen2 = store.replace("k1", b"v2", gen)  # replace: the same
    assert store.read("k1") == (b"v2", gen2)
    fake_gcs.fail_after_next("DELETE", 1, 503, match="k1")
    try:  # delete: landed, 503, retried -> 404. The store says NotFound; callers treat that as done.
        store.delete("k1", gen2)
    except Exception as e:
        assert type(e).__name__ == "NotFound"
    assert store.generation("k1") is None


def test_gcs_commit_and_release_whose_replies_were_lost(fake_gcs):  # noqa: F811
    store = open_store("gs://acts/prefix")
    spec = prep(store)
    lease = q.claim(store, "job", 0, "w1", 60)
    key = q.shard_key("job", 0, 0, lease.tag)
    store.put(key, b"acts")
    fake_gcs.fail_after_next("POST", 1, 503, match="job/leases/000000")  # the renew inside commit
    fake_gcs.fail_after_next("POST", 1, 503, match="job/done/000000")  # the done record
    fake_gcs.fail_after_next("DELETE", 1, 503, match="job/leases/000000")  # the release after it
    assert q.commit(store, lease, done_record(lease, spec, [key], store), 60) is True
    assert q.read_done(store, "job", 0).worker == "w1"
    assert store.generation(q.lease_key("job", 0)) is None
    assert q.job_progress(store, "job").units_done == 1
