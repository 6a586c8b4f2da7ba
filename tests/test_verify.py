"""verify proves a job's output: run the real work loop (over the stand-in extractor, tests/fakes/
standin_extractor.py) into a filesystem store, then damage the output in each way verify must catch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from actfleet import work_queue as q
from actfleet.errors import InputError
from actfleet.job_options import JobOptions
from actfleet.store import open_store
from actfleet.worker.verify import verify
from actfleet.worker.work_loop import Worker
from tests.fakes import standin_extractor as sx


def run_job(tmp_path: Path, rows=40, unit_rows=7, store=None, **dataset):
    data = sx.write_dataset(tmp_path / "data.jsonl", rows, **dataset)
    store = store or open_store(str(tmp_path / "bucket"))
    spec, _ = q.prepare(
        store,
        "job",
        input=str(data),
        fingerprint=sx.fingerprint(data),
        rows=sx.count_rows(data),
        unit_rows=unit_rows,
        options={"model": "standin"},
    )
    result = Worker(store, spec, sx.StandinExtractor(data), "w0", lease_seconds=30).run()
    return store, spec, result


def test_a_clean_job_verifies_and_accounts_for_every_row(tmp_path):
    store, spec, result = run_job(tmp_path, bad_every=9, empty_every=11)
    assert result.job_complete and result.units_committed == spec.units == 6
    rep = verify(store, "job")
    assert rep.ok, rep.problems
    assert rep.units_done == 6 and rep.rows == 40
    assert rep.rows_skipped == {"malformed JSON": 4, "no tokens stored": 3}
    assert rep.rows_stored + sum(rep.rows_skipped.values()) == 40
    assert rep.tokens == sum(q.read_done(store, "job", u).tokens for u in range(6)) > 0
    assert rep.shards == len(list(store.list("job/shards/")))


def first_shard(store, unit=2) -> str:
    rec = q.read_done(store, "job", unit)
    return "job/" + rec.shards[0].name


def test_a_corrupted_shard_is_caught(tmp_path):
    store, _, _ = run_job(tmp_path)
    key = first_shard(store)
    path = store.local_path(key)
    blob = bytearray(path.read_bytes())
    blob[-3] ^= 0x40  # one flipped bit in the activations
    path.write_bytes(bytes(blob))
    rep = verify(store, "job")
    assert not rep.ok
    assert [(p.kind, p.key) for p in rep.problems] == [("corrupt-shard", key)]


def test_a_missing_shard_is_caught(tmp_path):
    store, _, _ = run_job(tmp_path)
    key = first_shard(store, 4)
    store.delete(key)
    rep = verify(store, "job")
    assert [(p.kind, p.unit) for p in rep.problems] == [("missing-shard", 4)]


def test_a_missing_done_record_and_unaccounted_rows_are_caught(tmp_path):
    store, _, _ = run_job(tmp_path, unit_rows=20)
    store.delete(q.done_key("job", 0))
    # A done record that forgot one of its shards: those rows are neither stored nor skipped.
    rec = q.read_done(store, "job", 1)
    assert len(rec.shards) > 1
    dropped = rec.shards.pop(0)
    store.delete(q.done_key("job", 1))
    store.create(q.done_key("job", 1), rec.to_json())
    rep = verify(store, "job")
    found = {(p.kind, p.unit) for p in rep.problems}
    assert ("not-done", 0) in found
    assert ("rows", 1) in found
    assert any(p.kind == "garbage" and p.key == "job/" + dropped.name for p in rep.problems)
    assert any("neither stored nor skipped" in p.message for p in rep.problems)


def test_garbage_is_reported_and_clean_removes_only_garbage(tmp_path):
    store, _, _ = run_job(tmp_path)
    real = first_shard(store, 0)
    store.put(q.shard_key("job", 0, 99), store.read(real)[0])  # a dead attempt's extra part
    store.put(q.shard_key("job", 5, 7), b"half-written")
    rep = verify(store, "job")
    assert sorted(p.key for p in rep.problems) == sorted([q.shard_key("job", 0, 99), q.shard_key("job", 5, 7)])
    assert {p.kind for p in rep.problems} == {"garbage"}
    listed_before = sorted(store.list("job/"))
    cleaned = verify(store, "job", clean=True)
    assert cleaned.ok and sorted(cleaned.cleaned) == sorted([q.shard_key("job", 0, 99), q.shard_key("job", 5, 7)])
    assert sorted(store.list("job/")) == [k for k in listed_before if k not in cleaned.cleaned]
    assert verify(store, "job").ok


def test_clean_keeps_the_shards_of_a_unit_in_progress(tmp_path):
    data = sx.write_dataset(tmp_path / "data.jsonl", 10)
    store = open_store(str(tmp_path / "bucket"))
    q.prepare(store, "job", input=str(data), fingerprint=sx.fingerprint(data), rows=10, unit_rows=5, options={})
    q.claim(store, "job", 0, "busy-worker", 300)
    store.put(q.shard_key("job", 0, 0), b"being written")
    store.put(q.shard_key("job", 1, 0), b"dead attempt")
    rep = verify(store, "job", clean=True)
    # Neither unit is done, so some attempt may still commit either shard (a stalled "dead" one too): both
    # stay, each with its reason, until their unit is done.
    assert rep.cleaned == []
    assert rep.in_progress == [0]
    assert store.generation(q.shard_key("job", 0, 0)) is not None
    assert store.generation(q.shard_key("job", 1, 0)) is not None
    assert sorted(k["key"] for k in rep.kept) == [q.shard_key("job", 0, 0), q.shard_key("job", 1, 0)]
    assert {p.kind for p in rep.problems} == {"not-done"}
    # Once the units are done (the busy worker gave up; another finished the job) both are garbage.
    store.delete(q.lease_key("job", 0))
    spec = q.read_job(store, "job")
    assert Worker(store, spec, sx.StandinExtractor(data), "w1", lease_seconds=30).run().job_complete
    rep = verify(store, "job", clean=True)
    assert sorted(rep.cleaned) == [q.shard_key("job", 0, 0), q.shard_key("job", 1, 0)]
    assert rep.ok and verify(store, "job").ok


# ---------------------------------------------------------------------------------------------------
# job.json's totals are derived from its pinned input files, and every unit record is checked (issue 27)
# ---------------------------------------------------------------------------------------------------


def run_pinned_job(tmp_path: Path, monkeypatch, rows=40, unit_rows=7):
    """run_job with job.json pinning its input file as `actfleet prepare` does (worker/pinning.py)."""
    from actfleet.worker import pinning, sources

    monkeypatch.setenv("ACTFLEET_DATA_CACHE", str(tmp_path / "cache"))
    data = sx.write_dataset(tmp_path / "data.jsonl", rows)
    files, _ = pinning.pin_files([str(data)])
    store = open_store(str(tmp_path / "bucket"))
    spec, _ = q.prepare(
        store,
        "job",
        input=str(data),
        fingerprint=sources.fingerprint(files),
        rows=q.sample_count(JobOptions(), (f.rows for f in files)),
        unit_rows=unit_rows,
        options={"model": "standin"},
        input_files=[f.to_json() for f in files],
    )
    return store, spec, data


def edit_job(store, **changes):
    data, gen = store.read(q.job_key("job"))
    store.replace(q.job_key("job"), json.dumps({**json.loads(data), **changes}).encode(), gen)


def test_edited_rows_and_units_cannot_hide_a_unit(tmp_path, monkeypatch):
    store, spec, data = run_pinned_job(tmp_path, monkeypatch)
    assert spec.units == 6 and spec.rows == 40
    # Units 0-4 done; unit 5 (rows 35-39) not. Editing rows and units together "completes" the job.
    assert Worker(store, spec, sx.StandinExtractor(data), "w0", lease_seconds=30).run().job_complete
    store.delete(q.done_key("job", 5))
    edit_job(store, rows=35, units=5)
    rep = verify(store, "job")
    assert not rep.ok and (rep.rows, rep.units_total) == (40, 6)
    kinds = {(p.kind, p.unit) for p in rep.problems}
    assert ("bad-job", None) in kinds and ("not-done", 5) in kinds
    assert any("rows=35, but its 1 pinned input files hold 40 rows" in p.message for p in rep.problems)
    # Every other reader refuses it by name: the work loop, status, reconcile's job-complete check.
    for read in (q.read_job, q.job_progress, q.job_complete):
        with pytest.raises(InputError, match=r"job\.json: rows=35, but its 1 pinned input files hold 40 rows"):
            read(store, "job")


def test_units_edited_alone_and_a_stale_fingerprint_are_bad_job(tmp_path, monkeypatch):
    store, spec, data = run_pinned_job(tmp_path, monkeypatch, rows=20, unit_rows=5)
    assert Worker(store, spec, sx.StandinExtractor(data), "w0", lease_seconds=30).run().job_complete
    assert verify(store, "job").ok
    edit_job(store, units=3)
    rep = verify(store, "job")
    assert [p.kind for p in rep.problems] == ["bad-job"] and "units=3 for rows=20" in rep.problems[0].message
    edit_job(store, units=4, input_files=[{**spec.input_files[0], "sha256": "ab" * 32}])
    assert {p.kind for p in verify(store, "job").problems} == {"bad-job"}


def test_a_unit_record_that_disagrees_with_job_json_is_caught(tmp_path):
    store, _, _ = run_job(tmp_path, rows=20, unit_rows=5)
    key = q.unit_key("job", 2)
    store.put(key, json.dumps({"unit": 2, "start": 14, "stop": 21}).encode())  # another prepare's range
    store.put(q.unit_key("job", 6), json.dumps({"unit": 6, "start": 18, "stop": 21}).encode())
    rep = verify(store, "job")
    assert {(p.kind, p.key) for p in rep.problems} == {("bad-unit", key), ("foreign", q.unit_key("job", 6))}


@pytest.mark.parametrize(
    "field,value",
    [("rows", "40"), ("unit_rows", 0), ("units", None), ("input_files", [{"path": 1}]), ("model_pin", [])],
)
def test_a_wrong_typed_job_json_is_one_line_exit_2(tmp_path, field, value):
    import subprocess
    import sys

    store, _, _ = run_job(tmp_path, rows=10, unit_rows=5)
    edit_job(store, **{field: value})
    for read in (q.read_job, q.job_progress, q.job_complete):  # work, status, reconcile
        with pytest.raises(InputError, match=rf"job\.json: field {field} has the wrong type"):
            read(store, "job")
    r = subprocess.run(
        [sys.executable, "-c", "from actfleet.cli import main; main()", "verify", "--store", str(tmp_path / "bucket")]
        + ["--job", "job"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"field {field} has the wrong type" in r.stderr
