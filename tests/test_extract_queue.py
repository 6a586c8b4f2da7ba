"""`actfleet extract`'s local queue under --out (worker/commands/extract.py): records under .extract/, shards in
--out under their (unit, part) names, and resuming from the queue's done records (no engine: fast)."""

from __future__ import annotations

import hashlib
import time

import pytest

from actfleet import work_queue as q
from actfleet.errors import InputError
from actfleet.job_options import JobOptions
from actfleet.worker.commands.extract import JOB, STATE, OutStore, _lock, _resume_state

OPTIONS = JobOptions(model="m", shard_mb=0.01)


def wanted(options=OPTIONS):
    return {
        "input": "d.jsonl",
        "input_sha256": "0" * 64,
        "rows": 6,
        "unit_rows": 2,
        "model_sha256": "",
        "options": options.to_json(),
    }


def prepared(out):
    store = OutStore(out)
    _resume_state(out, store, False, wanted())
    spec, _ = q.prepare(store, JOB, input="d.jsonl", fingerprint="0" * 64, rows=6, unit_rows=2, options=OPTIONS)
    return store, spec


def commit_unit(store, unit, parts=2):
    """What the Worker does for one unit: claim, upload its attempt's shards, commit the done record."""
    lease = q.claim(store, JOB, unit, "extract", 60)
    shards = []
    for part in range(parts):
        data = f"unit {unit} part {part}".encode()
        key = q.shard_key(JOB, unit, part, lease.tag)
        store.put(key, data)
        shards.append(
            q.ShardInfo(name=key[len(JOB) + 1 :], bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), tokens=1)
        )
    rec = q.DoneRecord(
        unit=unit,
        start=2 * unit,
        stop=2 * unit + 2,
        worker="extract",
        attempt=lease.attempt,
        rows_stored=2,
        tokens=parts,
        skipped={},
        shards=shards,
        committed_at=time.time(),
        seconds=0.1,
    )
    assert q.commit(store, lease, rec, 60)


def test_shards_land_in_out_under_their_unit_part_names_and_records_under_the_queue(tmp_path):
    out = tmp_path / "out"
    store, spec = prepared(out)
    commit_unit(store, 0)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["000000-0000.safetensors", "000000-0001.safetensors"]
    assert (out / STATE / JOB / "job.json").is_file() and (out / STATE / JOB / "done" / "000000").is_file()
    rec = q.read_done(store, JOB, 0)
    assert rec.shards[0].name.startswith("shards/000000-0000.a1-")  # the record keeps the attempt's key
    assert store.size(f"{JOB}/{rec.shards[0].name}") == rec.shards[0].bytes


def test_resume_keeps_done_units_drops_leases_and_what_no_record_lists(tmp_path):
    out = tmp_path / "out"
    store, spec = prepared(out)
    commit_unit(store, 0)
    commit_unit(store, 1)
    lease = q.claim(store, JOB, 2, "extract", 300)  # a run killed in unit 2: its lease and one shard remain
    store.put(q.shard_key(JOB, 2, 0, lease.tag), b"cut short")
    (out / "000001-0001.safetensors").unlink()  # unit 1 lost a shard since: redone
    done = _resume_state(out, store, False, wanted())
    assert sorted(done) == [0]
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["000000-0000.safetensors", "000000-0001.safetensors"]
    assert q.read_lease(store, JOB, 2) is None and q.read_done(store, JOB, 1) is None
    assert q.next_unit(store, spec, "extract", 60).lease.unit == 1  # at once: no wait for the dead lease


def test_other_options_are_refused_naming_them_and_overwrite_starts_over(tmp_path):
    out = tmp_path / "out"
    store, _ = prepared(out)
    commit_unit(store, 0)
    with pytest.raises(
        InputError, match=r"made with different options \(--positions was non-special, now all\); .* --overwrite"
    ):
        _resume_state(out, store, False, wanted(OPTIONS.replace(positions="all")))
    fd = _lock(out)
    try:
        with pytest.raises(InputError, match="another `actfleet extract` is working on it"):
            _lock(out)
        assert _resume_state(out, store, True, wanted(OPTIONS.replace(positions="all"))) == {}
    finally:
        import os

        os.close(fd)
    assert not list(out.glob("*.safetensors")) and not (out / STATE / JOB).exists()
    assert (out / STATE / ".lock").exists()  # the lock the run holds is never deleted under it


def test_an_older_extracts_out_is_refused_until_overwrite(tmp_path):
    out = tmp_path / "out"
    (out / ".extract").mkdir(parents=True)
    (out / ".extract" / "run.json").write_text("{}")
    (out / "000000-0000.safetensors").write_bytes(b"old")
    with pytest.raises(InputError, match="cannot resume .* pass --overwrite"):
        _resume_state(out, OutStore(out), False, wanted())
    assert _resume_state(out, OutStore(out), True, wanted()) == {}
    assert not (out / ".extract" / "run.json").exists() and not (out / "000000-0000.safetensors").exists()
