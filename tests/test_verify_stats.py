"""`actfleet verify` and the statistics objects (stats/, worker/stats.py): the one each done record lists is
checked like a shard (present, size, sha256, and readable as statistics); a dead attempt's are garbage that
`--clean` removes; anything under stats/ that is not exactly a name stats_key spells is foreign: reported, never
read, never deleted (the rule units/, leases/, done/ and shards/ follow: tests/test_foreign_objects.py).

Real jobs: the real work loop over the stand-in extractor into a filesystem store, and GCS through
google-cloud-storage against the fake server for names a filesystem cannot hold."""

from __future__ import annotations

import hashlib
import json

import pytest

from actfleet import work_queue as q
from actfleet.store import open_store
from actfleet.worker.verify import verify
from tests.fakes.gcs_server import fake_gcs  # noqa: F401  (fixture)
from tests.test_verify import run_job


class ReadSpy:
    """The store, recording every key read (verify must never read a foreign object)."""

    def __init__(self, store):
        self._store, self.reads = store, []

    def __getattr__(self, name):
        return getattr(self._store, name)

    def read(self, key, *a, **kw):
        self.reads.append(key)
        return self._store.read(key, *a, **kw)


def stats_of(store, unit: int) -> str:
    rec = q.read_done(store, "job", unit)
    assert rec.stats is not None  # the job computes statistics (the default, --stats moments)
    return q.in_job("job", rec.stats.name)


DEAD = "a9-0123abcd"  # another attempt's tag (attempt 9, nonce 0123abcd)


def test_a_dead_attempts_statistics_are_garbage_and_clean_removes_only_them(tmp_path):
    store, spec, _ = run_job(tmp_path)
    committed = [stats_of(store, u) for u in range(spec.units)]
    dead = q.stats_key("job", 1, DEAD)
    store.put(dead, store.read(committed[1])[0])  # attempt 9 computed unit 1 too, then lost its lease
    rep = verify(store, "job")
    assert [(p.kind, p.key) for p in rep.problems] == [("garbage", dead)] and dead in rep.garbage
    rep = verify(store, "job", clean=True)
    assert rep.ok and rep.cleaned == [dead]
    assert store.generation(dead) is None
    assert all(store.generation(k) is not None for k in committed)  # the committed ones stay
    assert verify(store, "job").ok


def test_the_statistics_of_a_unit_not_done_are_kept(tmp_path):
    store, spec, _ = run_job(tmp_path)
    store.delete(q.done_key("job", 2))  # unit 2 undone: an attempt may still commit its statistics
    early = q.stats_key("job", 2, DEAD)
    store.put(early, b"an attempt's statistics")
    rep = verify(store, "job", clean=True)
    assert early not in rep.cleaned and store.generation(early) is not None
    assert {"key": early, "reason": "unit 2 is not done: an attempt may still commit it"} in rep.kept


@pytest.mark.parametrize("damage", ["flip", "truncate", "remove"])
def test_a_committed_statistics_object_is_checked_by_size_and_sha256(tmp_path, damage):
    store, spec, _ = run_job(tmp_path)
    key = stats_of(store, 3)
    blob = store.read(key)[0]
    if damage == "flip":
        store.put(key, blob[:-1] + bytes([blob[-1] ^ 1]))
    elif damage == "truncate":
        store.put(key, blob[: len(blob) // 2])
    else:
        store.delete(key)
    rep = verify(store, "job", clean=True)
    kind = "missing-stats" if damage == "remove" else "corrupt-stats"
    assert [(p.kind, p.unit, p.key) for p in rep.problems] == [(kind, 3, key)], rep.problems
    assert not rep.ok and rep.cleaned == []


def test_a_listed_object_that_is_no_statistics_object_is_corrupt(tmp_path):
    """Bytes whose size and sha256 the record agrees with, but that are no statistics (a record and object
    replaced together): verify reads them as statistics, as `actfleet stats` would."""
    import hashlib

    store, spec, _ = run_job(tmp_path)
    key = stats_of(store, 0)
    junk = b"not a safetensors object"
    store.put(key, junk)
    data, gen = store.read(q.done_key("job", 0))
    rec = json.loads(data)
    rec["stats"].update(bytes=len(junk), sha256=hashlib.sha256(junk).hexdigest())
    store.replace(q.done_key("job", 0), json.dumps(rec).encode(), gen)
    rep = verify(store, "job")
    assert [(p.kind, p.unit) for p in rep.problems] == [("corrupt-stats", 0)]
    assert "not a readable statistics object" in rep.problems[0].message


@pytest.mark.parametrize(
    "name",
    [
        "../done/000001",  # climbs out of stats/
        "stats/000002.stats.safetensors",  # another unit's
        "stats/000001.stats.safetensors.bak",  # not spelled as stats_key spells it
        "shards/000001-0000.safetensors",  # a shard as its statistics
    ],
)
def test_a_record_listing_no_statistics_name_of_its_unit_is_a_problem_and_is_never_read(tmp_path, name):
    store, spec, _ = run_job(tmp_path)
    real = stats_of(store, 1)
    data, gen = store.read(q.done_key("job", 1))
    rec = json.loads(data)
    rec["stats"]["name"] = name
    store.replace(q.done_key("job", 1), json.dumps(rec).encode(), gen)
    spy = ReadSpy(store)
    rep = verify(spy, "job", clean=True)
    assert ("bad-record", 1) in {(p.kind, p.unit) for p in rep.problems}
    assert any("as its statistics, no statistics name of it" in p.message for p in rep.problems)
    assert q.in_job("job", name) not in spy.reads
    # Unit 1's record is faulty: its real statistics (now listed by nobody) are kept, not cleaned as garbage.
    assert store.generation(real) is not None and real not in rep.cleaned


FOREIGN = [
    "job/stats/000001.stats.safetensors.bak",
    "job/stats/1.stats.safetensors",
    "job/stats/0000001.stats.safetensors",
    "job/stats/000001.a1-xyz.stats.safetensors",  # not an attempt tag
    "job/stats/000001.safetensors",  # a shard-like name
    "job/stats/000099.stats.safetensors",  # a unit the job does not have
    "job/stats/sub/000001.stats.safetensors",  # in a subfolder
    "job/stats/notes.txt",
]


def test_foreign_objects_under_stats_are_reported_never_read_never_deleted(tmp_path):
    store, spec, _ = run_job(tmp_path)
    for k in FOREIGN:
        store.put(k, b"someone else's")
    before = sorted(store.list("job/"))
    spy = ReadSpy(store)
    rep = verify(spy, "job", clean=True)
    assert sorted(rep.foreign) == sorted(FOREIGN) and rep.cleaned == []
    assert {p.kind for p in rep.problems} == {"foreign"}
    assert not set(FOREIGN) & set(spy.reads)
    assert sorted(store.list("job/")) == before


def test_gcs_foreign_statistics_names_are_reported_not_read_or_deleted(tmp_path, fake_gcs):  # noqa: F811
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    store, spec, _ = run_job(tmp_path, store=open_store("gs://acts/prefix"))
    names = [
        "job/stats/000001.stats.safetensors/x",  # an object "below" another: only an object store holds both
        "job/stats//000001.stats.safetensors",
        "job/stats/../stats/000001.stats.safetensors",
    ]
    bucket = storage.Client(
        project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": fake_gcs.url}
    ).bucket("acts")
    for k in names:  # written around the store (its keys refuse ".."), as another tool would
        bucket.blob(f"prefix/{k}").upload_from_string(b"someone else's")
    dead = q.stats_key("job", 1, DEAD)
    store.put(dead, store.read(stats_of(store, 1))[0])
    rep = verify(store, "job", clean=True)
    assert sorted(rep.foreign) == sorted(names) and rep.cleaned == [dead]
    assert all(bucket.get_blob(f"prefix/{k}") is not None for k in names)
    assert store.generation(dead) is None


@pytest.mark.parametrize("what", ["another unit's statistics", "a shard of its own"])
def test_actfleet_stats_refuses_a_record_listing_no_statistics_name_of_its_unit_and_never_reads_it(tmp_path, what):
    from actfleet.errors import InputError
    from actfleet.worker.stats import job_totals

    store, spec, _ = run_job(tmp_path)
    data, gen = store.read(q.done_key("job", 1))
    rec = json.loads(data)
    other = json.loads(store.read(q.done_key("job", 2))[0])["stats"]["name"]
    name = other if what.startswith("another") else rec["shards"][0]["name"]
    blob, _ = store.read(q.in_job("job", name))  # the record's size and sha256 match what it now names
    rec["stats"].update(name=name, bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest())
    store.replace(q.done_key("job", 1), json.dumps(rec).encode(), gen)
    spy = ReadSpy(store)
    with pytest.raises(InputError, match="unit 1's done record lists .*, not its statistics"):
        job_totals(spy, "job", spec.units, where="job")
    assert q.in_job("job", name) not in spy.reads
