"""read_worker_records(known=...): a record whose write time has not changed is not read again (a converged
reconcile pass at 10,000 workers read every record, tens of seconds against GCS: bench/reconcile.py), and
one that changed, appeared or vanished is seen as it is now."""

from __future__ import annotations

import pytest

from actfleet import work_queue as q
from actfleet.store import open_store
from tests.fakes.gcs_server import fake_gcs  # noqa: F401  (fixture)


def counting(store):
    reads: list[str] = []
    real = store.read_stamped

    def read_stamped(key):
        reads.append(key)
        return real(key)

    store.read_stamped = read_stamped
    return reads


@pytest.fixture(params=["local", "gcs"])
def store(request, tmp_path):
    if request.param == "gcs":
        request.getfixturevalue("fake_gcs")
        return open_store("gs://kept-records/jobs")
    return open_store(str(tmp_path / "store"))


def test_only_records_written_since_the_last_read_are_read_again(store):
    for i in range(6):
        q.write_worker_record(store, "j", q.WorkerProgress(f"w-{i}", state="working"))
    reads, known = counting(store), {}
    first = q.read_worker_records(store, "j", known)
    assert sorted(first) == [f"w-{i}" for i in range(6)] and len(reads) == 6
    reads.clear()
    assert {w: (r.state, r.last_heartbeat) for w, r in q.read_worker_records(store, "j", known).items()} == {
        w: (r.state, r.last_heartbeat) for w, r in first.items()
    }
    assert reads == []  # nothing was written since: nothing read
    q.write_worker_record(store, "j", q.WorkerProgress("w-2", state="drained"))
    q.write_worker_record(store, "j", q.WorkerProgress("w-9", state="starting"))
    store.delete(q.worker_key("j", "w-4"))
    again = q.read_worker_records(store, "j", known)
    assert sorted(reads) == [q.worker_key("j", "w-2"), q.worker_key("j", "w-9")]
    assert again["w-2"].state == "drained" and again["w-2"].last_heartbeat > first["w-2"].last_heartbeat
    assert again["w-9"].state == "starting" and "w-4" not in again
    # The same answer as reading every record.
    every = q.read_worker_records(store, "j")
    assert {w: (r.state, r.last_heartbeat) for w, r in every.items()} == {
        w: (r.state, r.last_heartbeat) for w, r in again.items()
    }
