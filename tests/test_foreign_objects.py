"""Objects others write into a job's folders (units/, leases/, done/, shards/) are foreign: reported by verify
and status, never read as a unit's record, never counted, never deleted (docs/jobs.md, "Foreign objects").

The jobs are real: the real work loop over the stand-in extractor (tests/fakes/standin_extractor.py) into a
filesystem store and, where the path differs (object names a filesystem cannot hold: a key below another
key, ".." parts), through google-cloud-storage against the enforcing fake GCS server."""

from __future__ import annotations

import json

import pytest

from actfleet import work_queue as q
from actfleet.store import open_store
from actfleet.worker.verify import verify
from actfleet.worker.work_loop import Worker
from tests.fakes import standin_extractor as sx
from tests.fakes.gcs_server import fake_gcs  # noqa: F401  (fixture)
from tests.test_status import setup  # noqa: F401  (fixture)
from tests.test_verify import run_job


def keys(store, job="job"):
    return sorted(store.list(job + "/"))


def stray_record(store, unit: int) -> bytes:
    """A parseable done record for `unit` that lists none of its shards (every row "skipped"): trusted, it
    would make the unit's real committed shards garbage."""
    rec = q.read_done(store, "job", unit)
    rec.skipped, rec.shards, rec.tokens = {"stray": list(range(rec.start, rec.stop))}, [], 0
    return rec.to_json()


# ---------------------------------------------------------------------------------------------------
# done/: one canonical key per unit
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["000001.old", "1", "0000001", "000001.json"])
def test_a_stray_done_record_is_foreign_and_clean_keeps_the_real_shards(tmp_path, name):
    store, spec, _ = run_job(tmp_path)
    real = [q.in_job("job", s.name) for s in q.read_done(store, "job", 1).shards]
    stray = f"job/done/{name}"
    store.put(stray, stray_record(store, 1))
    before = keys(store)
    rep = verify(store, "job", clean=True)
    assert all(store.generation(k) is not None for k in real)  # trusted, the stray made these "garbage"
    assert keys(store) == before  # nothing deleted: not the real shards, not the stray record
    assert [(p.kind, p.key) for p in rep.problems] == [("foreign", stray)]
    assert rep.foreign == [stray] and rep.cleaned == []
    # The reader follows the real record: every committed shard is still readable.
    assert [store.read(k)[0][:8] for k in real]
    p = q.job_progress(store, "job")
    assert (p.units_done, p.foreign, p.bad_records) == (spec.units, 1, 0)
    assert p.shards == rep.shards == len(real) + sum(len(q.read_done(store, "job", u).shards) for u in (0, 2, 3, 4, 5))


@pytest.mark.parametrize("name", ["000002.bak", "2", "00002"])
def test_a_stray_done_key_does_not_complete_its_unit(tmp_path, name):
    store, spec, _ = run_job(tmp_path, rows=15, unit_rows=5)
    # Unit 2 undone again (its record removed), and "done" only by a stray key holding a copy of it.
    record = store.read(q.done_key("job", 2))[0]
    store.delete(q.done_key("job", 2))
    store.put(f"job/done/{name}", record)
    assert q.done_units(store, "job") == {0, 1}
    assert not q.job_complete(store, "job")  # reconcile's scale-to-zero check
    p = q.job_progress(store, "job")
    assert (p.units_done, p.complete, p.foreign) == (2, False, 1)
    # A new worker does unit 2 instead of exiting 0 with it undone.
    data = tmp_path / "data.jsonl"
    result = Worker(store, spec, sx.StandinExtractor(data), "w1", lease_seconds=30).run()
    assert result.job_complete and result.units_committed == 1
    assert q.read_done(store, "job", 2).worker == "w1"
    rep = verify(store, "job", clean=True)
    assert [p.kind for p in rep.problems] == ["foreign"] and rep.units_done == 3
    assert store.generation(f"job/done/{name}") is not None


def test_a_copied_record_does_not_double_count_in_status(tmp_path):
    store, spec, _ = run_job(tmp_path)
    honest = q.job_progress(store, "job")
    for name in ("000003.copy", "3"):
        store.put(f"job/done/{name}", store.read(q.done_key("job", 3))[0])
    p = q.job_progress(store, "job")
    assert (p.units_done, p.tokens, p.shards, p.bytes) == (
        honest.units_done,
        honest.tokens,
        honest.shards,
        honest.bytes,
    )
    assert p.workers["w0"].units_done == spec.units and p.foreign == 2


def test_a_record_naming_another_unit_is_refused_at_its_key(tmp_path):
    store, spec, _ = run_job(tmp_path)
    data, gen = store.read(q.done_key("job", 4))
    store.replace(q.done_key("job", 3), data, store.generation(q.done_key("job", 3)))  # unit 4's, at unit 3's key
    with pytest.raises(Exception, match="says unit 4, its key is unit 3"):
        q.read_done(store, "job", 3)
    rep = verify(store, "job", clean=True)
    assert ("bad-record", 3) in {(p.kind, p.unit) for p in rep.problems}
    # Unit 3's shards are kept: its record is unreadable as unit 3's.
    assert any(k["reason"].startswith("unit 3's done record") for k in rep.kept)
    assert q.job_progress(store, "job").bad_records == 1


# ---------------------------------------------------------------------------------------------------
# units/, leases/, shards/: the same rule
# ---------------------------------------------------------------------------------------------------

FOREIGN = [
    "job/units/000001.json.bak",
    "job/units/1.json",
    "job/units/000099.json",  # a unit the job does not have
    "job/leases/000001.old",
    "job/leases/000099",
    "job/leases/done/000001",  # nested look-alikes: a done record inside leases/ ...
    "job/done/leases/000001",  # ... and a lease inside done/
    "job/done/000099",
    "job/shards/1-0.safetensors",
    "job/shards/000001-0000.a1-XYZ.safetensors",  # not an attempt tag
    "job/shards/sub/000001-0000.safetensors",
    "job/shards/000099-0000.safetensors",
    "job/shards/notes.txt",
]


def plant(store, names, data=b"{}"):
    for k in names:
        store.put(k, data)


def test_foreign_objects_in_every_folder_are_reported_and_never_deleted(tmp_path):
    store, spec, _ = run_job(tmp_path)
    store.put(q.shard_key("job", 0, 99), b"a dead attempt's shard")  # real garbage, for contrast
    plant(store, FOREIGN, stray_record(store, 1))
    rep = verify(store, "job")
    assert sorted(rep.foreign) == sorted(FOREIGN)
    assert {p.kind for p in rep.problems} == {"foreign", "garbage"}
    assert [p.key for p in rep.problems if p.kind == "garbage"] == [q.shard_key("job", 0, 99)]
    cleaned = verify(store, "job", clean=True)
    assert cleaned.cleaned == [q.shard_key("job", 0, 99)]  # the garbage goes; every foreign object stays
    assert all(store.generation(k) is not None for k in FOREIGN)
    assert sorted(cleaned.foreign) == sorted(FOREIGN) and not cleaned.ok
    for k in FOREIGN:
        store.delete(k)
    assert verify(store, "job").ok  # removed by hand: the job verifies


def test_a_torn_lease_does_not_break_status_or_verify(tmp_path):
    data = sx.write_dataset(tmp_path / "data.jsonl", 10)
    store = open_store(str(tmp_path / "bucket"))
    spec, _ = q.prepare(
        store, "job", input=str(data), fingerprint=sx.fingerprint(data), rows=10, unit_rows=5, options={}
    )
    store.put(q.lease_key("job", 0), b'{"unit": [1], "expires": "soon"')  # torn mid-write
    store.put(q.lease_key("job", 1), json.dumps({"unit": [1], "expires": {}, "attempt": "x"}).encode())
    p = q.job_progress(store, "job")
    assert (p.units_done, p.units_leased) == (0, 0)
    rep = verify(store, "job")
    assert {p.kind for p in rep.problems} == {"not-done"} and rep.in_progress == []
    # The work loop treats them as expired and takes the units over.
    assert Worker(store, spec, sx.StandinExtractor(data), "w0", lease_seconds=30).run().job_complete


# ---------------------------------------------------------------------------------------------------
# GCS: names a filesystem cannot hold
# ---------------------------------------------------------------------------------------------------

GCS_FOREIGN = [
    "job/done/000001/x",  # below a real done record's name
    "job/done/../done/000001",  # ".." parts: the store refuses such keys, so reading one would stop verify
    "job/shards/../shards/000001-0000.safetensors",
    "job/units/000001.json/y",
    "job/leases/000001/z",
]


def test_gcs_foreign_names_are_reported_not_read_or_deleted(tmp_path, fake_gcs):  # noqa: F811
    store = open_store("gs://acts/prefix")
    store, spec, _ = run_job(tmp_path, store=store)
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    bucket = storage.Client(
        project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": fake_gcs.url}
    ).bucket("acts")
    for k in GCS_FOREIGN:  # written around the store (its keys refuse ".."), as another tool would
        bucket.blob(f"prefix/{k}").upload_from_string(stray_record(store, 1))
    rep = verify(store, "job", clean=True)
    assert sorted(rep.foreign) == sorted(GCS_FOREIGN) and rep.cleaned == []
    assert {p.kind for p in rep.problems} == {"foreign"}
    assert all(bucket.get_blob(f"prefix/{k}") is not None for k in GCS_FOREIGN)
    p = q.job_progress(store, "job")
    assert (p.units_done, p.complete, p.foreign) == (spec.units, True, 3)
    assert q.done_units(store, "job") == set(range(spec.units))


def test_gcs_a_done_record_listing_a_dotdot_shard_is_a_problem_not_a_crash(tmp_path, fake_gcs):  # noqa: F811
    store, spec, _ = run_job(tmp_path, store=open_store("gs://acts/prefix"))
    data, gen = store.read(q.done_key("job", 2))
    rec = json.loads(data)
    real = rec["shards"][0]["name"]
    rec["shards"][0]["name"] = "shards/../done/000001"
    store.replace(q.done_key("job", 2), json.dumps(rec).encode(), gen)
    rep = verify(store, "job", clean=True)
    assert ("bad-record", 2) in {(p.kind, p.unit) for p in rep.problems}
    assert any("'shards/../done/000001', which is no shard name" in p.message for p in rep.problems)
    assert store.generation(q.in_job("job", real)) is not None  # unit 2's shards are kept (record unreadable)
    assert store.generation(q.done_key("job", 1)) is not None


# ---------------------------------------------------------------------------------------------------
# Concurrent prepare with different options: the loser writes nothing
# ---------------------------------------------------------------------------------------------------


def race_prepares(store, data, job: str, unit_rows: tuple[int, int]) -> list:
    """Two prepares of `job` with other unit sizes, released together; each thread's outcome."""
    import threading

    barrier = threading.Barrier(2)
    outcomes: list = [None, None]

    def one(i: int) -> None:
        barrier.wait()
        try:
            outcomes[i] = q.prepare(
                store,
                job,
                input=str(data),
                fingerprint=sx.fingerprint(data),
                rows=60,
                unit_rows=unit_rows[i],
                options={"model": "standin"},
            )[1]
        except Exception as e:  # the loser's refusal
            outcomes[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def check_race(store, job: str, outcomes: list) -> None:
    from actfleet.errors import InputError

    won = [o for o in outcomes if o is True]
    lost = [o for o in outcomes if isinstance(o, InputError)]
    assert (len(won), len(lost)) == (1, 1), outcomes
    assert "unit_rows" in str(lost[0]) and "refusing to mix" in str(lost[0])
    spec = q.read_job(store, job)
    listing = q.list_units(store, job, q.UNITS)
    assert sorted(listing.units) == list(range(spec.units)) and listing.foreign == []
    for unit, key in listing.units.items():
        assert q.unit_record_matches(spec, unit, store.read(key)[0]), (unit, store.read(key)[0])
    assert {p.kind for p in verify(store, job).problems} == {"not-done"}


def test_concurrent_prepares_with_other_options_never_mix_unit_records(tmp_path):
    data = sx.write_dataset(tmp_path / "data.jsonl", 60)
    store = open_store(str(tmp_path / "bucket"))
    for round_ in range(10):
        check_race(store, f"job{round_}", race_prepares(store, data, f"job{round_}", (3, 4)))


def test_gcs_concurrent_prepares_with_other_options_never_mix_unit_records(tmp_path, fake_gcs):  # noqa: F811
    data = sx.write_dataset(tmp_path / "data.jsonl", 60)
    store = open_store("gs://acts/prefix")
    for round_ in range(3):
        check_race(store, f"job{round_}", race_prepares(store, data, f"job{round_}", (3, 4)))


def test_a_leftover_unit_record_or_intent_of_another_prepare_is_refused(tmp_path):
    from actfleet.errors import InputError

    data = sx.write_dataset(tmp_path / "data.jsonl", 60)
    store = open_store(str(tmp_path / "bucket"))
    args = dict(input=str(data), fingerprint=sx.fingerprint(data), rows=60, options={"model": "standin"})
    # A unit record from a prepare of an older version (no intent record), with another range.
    store.put(q.unit_key("old", 1), json.dumps({"unit": 1, "start": 4, "stop": 8}).encode())
    with pytest.raises(InputError, match=r"old/units/000001\.json exists and says"):
        q.prepare(store, "old", unit_rows=3, **args)
    # A prepare that stopped after its intent (no job.json yet): another one with other options is refused,
    # the same one completes it.
    store.put(
        q.intent_key("cut"),
        q.JobSpec("cut", str(data), sx.fingerprint(data), 60, 3, 20, q.JobOptions("standin")).to_json(),
    )
    with pytest.raises(InputError, match="unit_rows=3, now 4"):
        q.prepare(store, "cut", unit_rows=4, **args)
    assert list(store.list(q.units_prefix("cut"))) == []
    assert q.prepare(store, "cut", unit_rows=3, **args)[1] is True


# ---------------------------------------------------------------------------------------------------
# `actfleet status`: foreign objects are not counted, and said so; a torn lease does not break it
# ---------------------------------------------------------------------------------------------------


def test_status_counts_only_canonical_done_records_and_survives_a_torn_lease(setup):  # noqa: F811
    from tests.test_status import commit_units, run_status

    fake, config, env, tmp = setup
    store = open_store(str(tmp / "store"))
    q.prepare(store, "j1", input="data.jsonl", fingerprint="f" * 64, rows=40, unit_rows=10, options={})
    commit_units(store, "j1", "tpu-us-central1-a-0", range(0, 3), tokens_each=1000)
    store.put("j1/done/000002.bak", store.read(q.done_key("j1", 2))[0])  # a copy: unit 2 twice?
    store.put("j1/done/3", store.read(q.done_key("j1", 2))[0])  # unit 3 "done"?
    store.put(q.lease_key("j1", 3), b'{"unit": 3, "expires": ')  # torn mid-write
    r = run_status(config, env, "--json")
    assert r.returncode == 0, r.stderr
    job = json.loads(r.stdout)["job"]
    assert (job["units_done"], job["tokens"], job["complete"], job["foreign"]) == (3, 3000, False, 2)
    assert job["units_leased"] == 0
    human = run_status(config, env).stdout
    assert "3/4 units (75.0%)" in human and "not counted: 2 foreign objects" in human
